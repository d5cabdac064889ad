"""core.pipeline.run with evaluation and fine-tuning: prune 90%, recover, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import Cancelled, DatasetMismatch, InvalidSpec
from core.formats.pt2.program import load_program
from core.pipeline import MeasureConfig, PipelineData, PipelineResult, TrainingConfig, run
from core.spec import CalibrationSpec, EvaluationSpec, FineTuneSpec, JobSpec, PruningSpec
from tests.factories import DIGITS_PRUNABLE, Digits, save_npz

FAST = MeasureConfig(batch_size=8, warmup=0, repeats=1)
PRUNE_90 = PruningSpec(criterion="l1", granularity="unstructured", sparsity=0.9, scope="global")
RECOVER = FineTuneSpec(epochs=8, batch_size=32, lr=5e-3, warmup_steps=10)


def run_digits(
    spec: JobSpec, digits: Digits, out: Path, training: TrainingConfig | None = None
) -> tuple[PipelineResult, list[tuple]]:
    """``spec`` through the pipeline on the digits; the result and every progress call."""
    calls: list[tuple] = []
    result = run(
        spec,
        digits.model_path,
        out,
        measure=FAST,
        on_progress=lambda *args: calls.append(args),
        data=PipelineData(fine_tune=digits.train, evaluation=digits.test),
        training=training,
    )
    return result, calls


def test_prune_fine_tune_evaluate(digits: Digits, tmp_path: Path) -> None:
    spec = JobSpec(pruning=PRUNE_90, fine_tune=RECOVER, evaluation=EvaluationSpec())
    training = TrainingConfig(checkpoint=tmp_path / "ckpt" / "ft.pt", checkpoint_every_steps=20)
    result, calls = run_digits(spec, digits, tmp_path / "out", training)
    m = result.metrics
    assert m.eval_before["accuracy"] == pytest.approx(digits.dense_accuracy, abs=1e-6)
    assert m.eval_after_pruning["accuracy"] < m.eval_before["accuracy"] - 0.05
    assert m.eval_after_fine_tune["accuracy"] >= m.eval_before["accuracy"] - 0.01
    assert m.sparsity >= 0.895

    stages = [c[0] for c in calls]
    assert stages.index("fine_tuning") > stages.index("pruning")
    # BatchNorm statistics were measured again right after pruning, before the evaluation.
    refreshed = [
        i for i, c in enumerate(calls) if len(c) > 3 and c[3] and "batchnorm_layers" in c[3]
    ]
    assert [calls[i][3]["batchnorm_layers"] for i in refreshed] == [3.0]
    assert refreshed[0] < stages.index("evaluating", stages.index("pruning"))
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)  # progress only moves forward
    epochs = [c[3] for c in calls if c[0] == "fine_tuning" and c[3]]
    assert [e["epoch"] for e in epochs] == [float(i) for i in range(1, 9)]
    # One call before the first step and one after each (at an epoch's end, with its summary).
    assert len([c for c in calls if c[0] == "fine_tuning"]) == epochs[-1]["step"] + 1

    # The exported program holds the fine-tuned weights, still 90% zeros, with eval-mode BN.
    program, _ = load_program(result.model_path)
    weights = [program.state_dict[f"{n}.weight"] for n in DIGITS_PRUNABLE]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.895
    x = torch.from_numpy(np.load(digits.test)["inputs"][:5])
    torch.testing.assert_close(program.module()(x)[:1], program.module()(x[:1]))
    report = json.loads(result.report_path.read_text())
    assert report["metrics"]["eval_after_fine_tune"] == m.eval_after_fine_tune
    assert len(report["fine_tune"]["history"]) == 8


def test_cancel_during_training_stops_at_the_step(digits: Digits, tmp_path: Path) -> None:
    spec = JobSpec(pruning=PRUNE_90, fine_tune=FineTuneSpec(steps=1000, batch_size=8))
    steps = []

    def progress(stage, fraction, message, data=None) -> None:
        if stage == "fine_tuning":
            steps.append(message)
            if len(steps) == 4:
                raise Cancelled("the job was cancelled")

    with pytest.raises(Cancelled):
        run(
            spec,
            digits.model_path,
            tmp_path / "out",
            measure=FAST,
            on_progress=progress,
            data=PipelineData(fine_tune=digits.train),
        )
    assert steps[-1] == "step 3/1000"
    assert not (tmp_path / "out" / "model.pt2").exists()


def test_dataset_problems_fail_before_pruning(digits: Digits, tmp_path: Path) -> None:
    flat = save_npz(
        tmp_path / "flat.npz", inputs=np.zeros((10, 64), np.float32), targets=np.zeros(10)
    )
    unlabelled = save_npz(tmp_path / "x.npz", inputs=np.zeros((10, 1, 8, 8), np.float32))
    spec = JobSpec(pruning=PRUNE_90, fine_tune=RECOVER)
    stages: list[str] = []

    def record(stage, fraction, message, data=None) -> None:
        stages.append(stage)

    with pytest.raises(DatasetMismatch, match=r"\[\*, 1, 8, 8\].*\[\*, 64\]"):
        run(
            spec,
            digits.model_path,
            tmp_path,
            measure=FAST,
            on_progress=record,
            data=PipelineData(fine_tune=flat),
        )
    assert "pruning" not in stages
    with pytest.raises(InvalidSpec, match="targets"):
        run(
            spec, digits.model_path, tmp_path, measure=FAST, data=PipelineData(fine_tune=unlabelled)
        )
    with pytest.raises(InvalidSpec, match="needs a dataset"):
        run(spec, digits.model_path, tmp_path, measure=FAST)
    calibrated = JobSpec(pruning=PRUNE_90, calibration=CalibrationSpec(num_samples=8))
    with pytest.raises(DatasetMismatch, match=r"\[\*, 64\]"):
        run(
            calibrated,
            digits.model_path,
            tmp_path,
            measure=FAST,
            data=PipelineData(calibration=flat),
        )


def test_round_hook_evaluates_and_trains_a_share_between_rounds(digits: Digits) -> None:
    from core.formats.pt2.program import load_program as load
    from core.recovery import Recovery, load_feeds

    spec = JobSpec(pruning=PRUNE_90, fine_tune=RECOVER, evaluation=EvaluationSpec())
    program, info = load(digits.model_path)
    with torch.no_grad():  # what a first round leaves: half of every layer's weights zeroed
        for name in DIGITS_PRUNABLE:
            weight = program.state_dict[f"{name}.weight"]
            weight.mul_((weight.abs() > weight.abs().median()).to(weight.dtype))
    zeros = {n: program.state_dict[f"{n}.weight"] == 0 for n in DIGITS_PRUNABLE}
    feeds = load_feeds(spec, PipelineData(fine_tune=digits.train, evaluation=digits.test), info)
    calls: list[tuple] = []
    progress = lambda *a: calls.append(a)  # noqa: E731
    hook = Recovery(spec, info, feeds, None, TrainingConfig(), progress).round_hook(4)
    hook(1, 4, program)

    (evaluated,) = [c[3] for c in calls if len(c) > 3 and c[3] and "round" in c[3]]
    assert evaluated["round"] == 1
    assert evaluated["rounds"] == 4
    assert 0 < evaluated["accuracy"] <= 1
    steps = [c for c in calls if c[0] == "fine_tuning"]
    assert steps[-1][2] == "round 1: step 86/86"  # a quarter of 8 epochs x 43 batches
    for name, was_zero in zeros.items():
        assert torch.all(program.state_dict[f"{name}.weight"][was_zero] == 0)


def test_a_shared_budget_spends_the_fine_tunes_steps_across_the_rounds(
    digits: Digits, tmp_path: Path
) -> None:
    gradual = PruningSpec(
        **{
            **PRUNE_90.model_dump(),
            "schedule": {"kind": "iterative", "rounds": 3, "fine_tune_budget": "shared"},
        }
    )
    spec = JobSpec(
        pruning=gradual,
        fine_tune=FineTuneSpec(epochs=2, batch_size=32, lr=5e-3),
        evaluation=EvaluationSpec(),
    )
    result, calls = run_digits(spec, digits, tmp_path / "out")
    # 2 epochs x 43 batches = 86 steps: 21 after each of the first two rounds, 44 after the
    # last, and no more.
    messages = [c[2] for c in calls if c[0] == "fine_tuning"]
    assert [m for m in messages if m.endswith("/21")][-1] == "round 2: step 21/21"
    assert "round 1: step 21/21" in messages
    final = [m for m in messages if not m.startswith("round")]
    assert len(final) == 44 + 1  # one call before the first step, one after each
    assert "step 42/44" in final
    assert not any(m.startswith("round 3") for m in messages)
    rounds = [
        c[3] for c in calls if c[0] == "pruning" and len(c) > 3 and c[3] and "sparsity" in c[3]
    ]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["sparsity"] < rounds[1]["sparsity"] < 0.9
    assert result.metrics.sparsity == pytest.approx(0.9, abs=1e-3)
    program, _ = load_program(result.model_path)
    weights = [program.state_dict[f"{n}.weight"] for n in DIGITS_PRUNABLE]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.9, abs=1e-3)
    assert result.metrics.eval_after_fine_tune["accuracy"] > 0.8


def test_channel_pruning_fine_tunes_the_smaller_program(digits: Digits, tmp_path: Path) -> None:
    spec = JobSpec(
        pruning=PruningSpec(criterion="l1", granularity="channel", sparsity=0.5),
        fine_tune=FineTuneSpec(epochs=3, batch_size=32, lr=5e-3),
        evaluation=EvaluationSpec(),
    )
    result = run(
        spec,
        digits.model_path,
        tmp_path,
        measure=FAST,
        data=PipelineData(fine_tune=digits.train, evaluation=digits.test),
    )
    m = result.metrics
    assert m.params_after < m.params_before  # structured models stay small
    assert m.eval_after_fine_tune["accuracy"] > m.eval_after_pruning["accuracy"]
    program, _ = load_program(result.model_path)
    assert sum(p.numel() for p in program.parameters()) == m.params_after
    x = torch.from_numpy(np.load(digits.test)["inputs"][:3])
    torch.testing.assert_close(program.module()(x)[:1], program.module()(x[:1]))
