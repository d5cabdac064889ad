"""The pipeline on a Hugging Face checkpoint, in-process: calibrate, prune, score, fine-tune with
the pruned weights held at zero, write a checkpoint that reloads."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch

from core.formats import get_format
from core.pipeline import MeasureConfig, PipelineData, run
from core.spec import CalibrationSpec, EvaluationSpec, FineTuneSpec, JobSpec, PruningSpec
from tests.hf_factories import archive_folder, save_checkpoint

FAST = MeasureConfig(batch_size=1, warmup=0, repeats=1)
SEQ = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    _, saved = save_checkpoint("llama", folder / "checkpoint")
    return archive_folder(saved, folder / "llama.tar")


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(textwrap.dedent(source))
    return path


def _rows_half_zero(model_file: Path) -> None:
    model, _ = get_format("hf").load(model_file)
    with model:
        for layer in model.model.model.layers:
            for linear in (layer.mlp.down_proj, layer.self_attn.q_proj):
                zeros = (linear.weight == 0).sum(dim=1)
                assert torch.all(zeros == linear.weight.shape[1] // 2)


def test_wanda_then_causal_lm_fine_tuning(checkpoint: Path, text: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = JobSpec(
        pruning=PruningSpec(criterion="wanda", granularity="unstructured", sparsity=0.5),
        calibration=CalibrationSpec(num_samples=8, seq_len=SEQ),
        fine_tune=FineTuneSpec(steps=30, batch_size=8, lr=3e-3, loss="causal_lm", seq_len=SEQ),
        evaluation=EvaluationSpec(task="perplexity", seq_len=SEQ, max_samples=8),
    )
    data = PipelineData(fine_tune=text, evaluation=text, calibration=text)
    result = run(spec, checkpoint, tmp_path, measure=FAST, data=data)
    m = result.metrics
    assert result.format == "hf"
    assert m.sparsity == pytest.approx(0.5)
    assert m.eval_after_fine_tune["perplexity"] < m.eval_after_pruning["perplexity"]
    assert m.tokens_per_second_before > 0
    assert m.tokens_per_second_after > 0
    report = json.loads(result.report_path.read_text())
    assert report["fine_tune"]["steps"] == 30
    _rows_half_zero(result.artifacts["model"])  # fine-tuning kept every pruned weight at zero


def test_iterative_sparsegpt_fine_tunes_between_rounds(
    checkpoint: Path, text: Path, tmp_path: Path
) -> None:
    events: list[tuple[str, str]] = []
    spec = JobSpec(
        pruning=PruningSpec(
            criterion="sparsegpt",
            granularity="unstructured",
            sparsity=0.5,
            schedule={"kind": "iterative", "rounds": 2},
        ),
        calibration=CalibrationSpec(num_samples=4, seq_len=SEQ),
        fine_tune=FineTuneSpec(steps=4, batch_size=4, loss="distillation", seq_len=SEQ),
    )
    data = PipelineData(fine_tune=text, calibration=text)
    result = run(
        spec,
        checkpoint,
        tmp_path,
        measure=FAST,
        data=data,
        on_progress=lambda stage, fraction, message, data=None: events.append((stage, message)),
    )
    assert ("pruning", "round 1 of 2: sparsity 0.438") in events
    assert any(message.startswith("round 1: step") for _, message in events)  # the share
    assert result.metrics.sparsity == pytest.approx(0.5, abs=0.005)


def test_a_language_model_is_scored_by_perplexity_only(
    checkpoint: Path, text: Path, tmp_path: Path
) -> None:
    from core.errors import InvalidSpec

    spec = JobSpec(
        pruning=PruningSpec(criterion="magnitude", granularity="unstructured", sparsity=0.5),
        evaluation=EvaluationSpec(task="classification"),
    )
    with pytest.raises(InvalidSpec, match="use 'perplexity'"):
        run(spec, checkpoint, tmp_path, measure=FAST, data=PipelineData(evaluation=text))


def test_the_job_says_what_its_sparsity_buys_here(checkpoint: Path, tmp_path: Path) -> None:
    spec = JobSpec(pruning=PruningSpec(criterion="magnitude", granularity="n:m", n_m=(2, 4)))
    events: list[tuple[str, dict | None]] = []
    result = run(
        spec,
        checkpoint,
        tmp_path,
        measure=FAST,
        on_progress=lambda stage, fraction, message, data=None: events.append((message, data)),
    )
    storage = json.loads(result.report_path.read_text())["sparse_storage"]
    # 2:4 of fp32 weights: half the values plus one bit per position.
    assert storage["sparse_bytes"] == storage["dense_bytes"] // 2 + storage["dense_bytes"] // 32
    assert storage["kernel"] == "CSR"
    assert storage["dense_ms"] > 0
    assert storage["sparse_ms"] > 0
    assert storage["faster"] == (storage["sparse_ms"] < storage["dense_ms"])
    assert storage["verdict"].startswith("smaller to store (53% of the dense weights")
    assert (f"writing the pruned model; {storage['verdict']}", storage) in events
