"""core.finetune and core.evaluate on a small CNN trained on scikit-learn's 8x8 digits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from core.data import BatchRange, Dataset, batch_range, load_dataset, match_program
from core.errors import DatasetMismatch
from core.evaluate import evaluate
from core.finetune import Checkpointing, fine_tune, set_training, snapshot_state
from core.formats.pt2.program import load_program
from core.spec import EvaluationSpec, FineTuneSpec
from tests.factories import DIGITS_PRUNABLE, Digits, digits_arrays, save_npz

MASKED = [f"{n}.weight" for n in DIGITS_PRUNABLE]


def pruned(path: Path, sparsity: float = 0.9):
    """The program with the smallest ``sparsity`` of its conv/linear weights (global L1) zeroed."""
    program, info = load_program(path)
    dense = snapshot_state(program)
    weights = [program.state_dict[n] for n in MASKED]
    everything = torch.cat([w.abs().flatten() for w in weights])
    threshold = everything.kthvalue(round(sparsity * everything.numel())).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return program, info, dense


def data_for(info, path: Path) -> Dataset:
    return match_program(load_dataset(path), info.inputs)


def test_set_training_switches_batch_norm_and_dropout(digits: Digits) -> None:
    program, _ = load_program(digits.model_path)
    module = program.module()
    assert set_training(module, True) == 4  # three BatchNorms and one dropout
    assert set_training(module, True) == 0
    assert set_training(module, False) == 4


def test_pruned_weights_stay_exactly_zero_after_every_step(digits: Digits, tmp_path: Path) -> None:
    program, info, _ = pruned(digits.model_path)
    zeros = {n: program.state_dict[n] == 0 for n in MASKED}
    checkpoint = Checkpointing(tmp_path / "ckpt.pt", every_steps=1)
    seen = []

    def after_step(step: int, total: int, summary: dict | None) -> None:
        if step == 0 or step == total:
            return
        # The checkpoint written after this step holds exactly what the optimizer produced.
        state = torch.load(checkpoint.path, weights_only=True)["model"]
        for name, was_zero in zeros.items():
            assert torch.all(state[name][was_zero] == 0), (name, step)
        seen.append(step)

    spec = FineTuneSpec(steps=12, batch_size=32, lr=1e-2, optimizer="sgd", weight_decay=1e-2)
    fine_tune(
        program,
        data_for(info, digits.train),
        spec,
        limits=batch_range(info.inputs),
        masked=MASKED,
        checkpoint=checkpoint,
        on_step=after_step,
    )
    assert seen == list(range(1, 12))
    for name, was_zero in zeros.items():
        assert torch.all(program.state_dict[name][was_zero] == 0), name
        assert not torch.equal(program.state_dict[name], program.state_dict[name] * 0)


def test_fine_tuning_recovers_accuracy_with_train_mode_batch_norm(digits: Digits) -> None:
    program, info, _ = pruned(digits.model_path)
    test = data_for(info, digits.test)
    limits = batch_range(info.inputs)
    after_pruning = evaluate(program.module(), test, EvaluationSpec(), limits)["accuracy"]
    mean_before = program.state_dict["b1.running_mean"].clone()
    epochs = []
    result = fine_tune(
        program,
        data_for(info, digits.train),
        FineTuneSpec(epochs=8, batch_size=32, lr=5e-3, warmup_steps=10, schedule="cosine"),
        limits=limits,
        masked=MASKED,
        on_step=lambda step, total, summary: summary and epochs.append(summary),
    )
    after = evaluate(program.module(), test, EvaluationSpec(), limits)
    assert after_pruning < digits.dense_accuracy - 0.05  # 90% unstructured hurts without training
    assert after["accuracy"] >= digits.dense_accuracy - 0.01
    # BatchNorm trained in train mode: its statistics moved, and were copied into the program.
    assert not torch.equal(program.state_dict["b1.running_mean"], mean_before)
    assert [e["epoch"] for e in epochs] == [float(i) for i in range(1, 9)]
    assert epochs == list(result.history)
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert result.device == "cpu"
    # The program itself still evaluates in eval mode: deterministic for a single sample.
    x = test.inputs[0][:2]
    torch.testing.assert_close(program.module()(x)[:1], program.module()(x[:1]))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(digits: Digits, tmp_path: Path) -> None:
    spec = FineTuneSpec(steps=12, batch_size=64, lr=2e-3, seed=7, warmup_steps=3)

    def train(checkpoint: Checkpointing | None, stop_at: int | None = None):
        program, info, _ = pruned(digits.model_path)

        def on_step(step: int, total: int, summary: dict | None) -> None:
            if step == stop_at:
                raise KeyboardInterrupt  # what a dying worker looks like from here

        result = fine_tune(
            program,
            data_for(info, digits.train),
            spec,
            limits=batch_range(info.inputs),
            masked=MASKED,
            checkpoint=checkpoint,
            on_step=on_step,
        )
        return program, result

    reference, ref_result = train(None)
    checkpoint = Checkpointing(tmp_path / "ckpt.pt", every_steps=5)
    with pytest.raises(KeyboardInterrupt):
        train(checkpoint, stop_at=7)
    assert checkpoint.path.exists()
    resumed, result = train(checkpoint)
    assert result.resumed_from_step == 5
    assert ref_result.resumed_from_step is None
    for name, tensor in reference.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name
    assert result.history == ref_result.history


def test_distillation_without_targets_recovers(digits: Digits, tmp_path: Path) -> None:
    x_train, _, _, _ = digits_arrays()
    no_targets = save_npz(tmp_path / "unlabelled.npz", inputs=x_train)
    program, info, dense = pruned(digits.model_path)
    limits = batch_range(info.inputs)
    unlabelled = data_for(info, no_targets)
    with pytest.raises(DatasetMismatch, match="targets"):
        fine_tune(program, unlabelled, FineTuneSpec(epochs=1), limits=limits, masked=MASKED)

    result = fine_tune(
        program,
        unlabelled,
        FineTuneSpec(
            epochs=8,
            batch_size=32,
            lr=5e-3,
            warmup_steps=10,
            schedule="cosine",
            loss="distillation",
        ),
        limits=limits,
        masked=MASKED,
        teacher_state=dense,
    )
    after = evaluate(program.module(), data_for(info, digits.test), EvaluationSpec(), limits)
    assert after["accuracy"] >= digits.dense_accuracy - 0.015
    assert result.history[-1]["teacher_agreement"] > 0.95


def test_evaluation_metrics_and_mismatched_targets(digits: Digits, tmp_path: Path) -> None:
    program, info = load_program(digits.model_path)
    limits = batch_range(info.inputs)
    test = data_for(info, digits.test)
    metrics = evaluate(program.module(), test, EvaluationSpec(top_k=3, batch_size=7), limits)
    assert metrics["accuracy"] == pytest.approx(digits.dense_accuracy, abs=1e-6)
    assert metrics["top3_accuracy"] >= metrics["accuracy"]
    assert metrics["num_samples"] == test.num_samples
    bad = Dataset(inputs=test.inputs, targets=test.targets + 10)
    with pytest.raises(DatasetMismatch, match="10 outputs"):
        evaluate(program.module(), bad, EvaluationSpec(), limits)
    regression = Dataset(inputs=test.inputs, targets=torch.zeros(test.num_samples, 3))
    with pytest.raises(DatasetMismatch, match="do not match"):
        evaluate(program.module(), regression, EvaluationSpec(), limits)


class _ConvBn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.b1(self.c1(x))), 1))


def test_training_the_exported_program_takes_the_eager_modules_steps() -> None:
    # Issue 12: Shears' fine-tune trailed a plain eager loop. With the same masks, optimizer and
    # batches, training the exported graph must be the eager loop: BatchNorm in train mode (batch
    # statistics, running statistics updated), pruned weights held at zero, AdamW's decay.
    # One full batch per step, so the data order cannot differ.
    torch.manual_seed(0)
    model = _ConvBn().eval()
    with torch.no_grad():
        for layer in (model.c1, model.fc):
            w = layer.weight
            w.mul_((w.abs() > w.abs().median()).to(w.dtype))
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 5, (40,))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},))
    mean_before = model.b1.running_mean.clone()
    eager = copy.deepcopy(model).train()
    masks = {layer: layer.weight != 0 for layer in (eager.c1, eager.fc)}
    optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(6):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(eager(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            for layer, keep in masks.items():
                layer.weight.mul_(keep)

    spec = FineTuneSpec(steps=6, batch_size=40, lr=1e-2, weight_decay=0.05, schedule="constant")
    fine_tune(
        program,
        Dataset(inputs=(x,), targets=y),
        spec,
        limits=BatchRange(1, 1024),
        masked=["c1.weight", "fc.weight"],
        device="cpu",
    )
    assert not torch.equal(program.state_dict["b1.running_mean"], mean_before)
    for name, tensor in eager.state_dict().items():
        if name.endswith("num_batches_tracked"):  # only read when momentum is None
            continue
        torch.testing.assert_close(program.state_dict[name], tensor, atol=1e-5, rtol=1e-4)
