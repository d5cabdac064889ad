"""Pruning quality (issue 12): BatchNorm statistics re-estimated after pruning, and group
importance that aggregates every coupled layer of a channel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.batchnorm import reestimate_batchnorm
from core.spec import FineTuneSpec, PruningSpec
from core.structure import analyze, prune_program
from core.structure.importance import group_scores


class ConvBnNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> flatten -> linear: one coupled group per
    hidden channel space, with a producer, a norm and a consumer each."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(x, 1))


def _net(seed: int = 0) -> ConvBnNet:
    torch.manual_seed(seed)
    model = ConvBnNet().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.weight.uniform_(0.2, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 3.0)
    return model


def _export(model: nn.Module) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model, (torch.randn(4, 1, 4, 4),), dynamic_shapes=({0: batch},))


def _prune_half_of_c1(program: torch.export.ExportedProgram) -> None:
    with torch.no_grad():
        w = program.state_dict["c1.weight"]
        w.view(-1)[: w.numel() // 2] = 0.0


def test_batchnorm_reestimation_measures_the_pruned_activations() -> None:
    model = _net()
    program = _export(model)
    _prune_half_of_c1(program)
    x = torch.randn(64, 1, 4, 4)
    dense_mean = program.state_dict["b1.running_mean"].clone()

    changed = reestimate_batchnorm(program, (x,), batch_size=64)

    # By hand: the pruned conv's output, its per-channel mean and unbiased variance.
    with torch.no_grad():
        pruned = model.c1.weight.clone()
        pruned.view(-1)[: pruned.numel() // 2] = 0.0
        a = nn.functional.conv2d(x, pruned, padding=1)
    state = program.state_dict
    assert changed == 2
    torch.testing.assert_close(state["b1.running_mean"], a.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(state["b1.running_var"], a.var(dim=(0, 2, 3), unbiased=True))
    # The dense model's statistics were different: the check above is not vacuous.
    assert not torch.allclose(dense_mean, state["b1.running_mean"])
    # The graph is the program's own, still eval mode: two calls agree and batch size does not
    # change a sample's output.
    module = program.module()
    torch.testing.assert_close(module(x[:3])[0], module(x[:1])[0])


def test_batchnorm_reestimation_averages_chunks_by_size() -> None:
    model = _net()
    program = _export(model)
    x = torch.randn(10, 1, 4, 4)
    reestimate_batchnorm(program, (x,), batch_size=4)  # chunks of 4, 3, 3
    with torch.no_grad():
        a = model.c1(x)
    parts = a.tensor_split(3)
    mean = sum(p.mean(dim=(0, 2, 3)) * p.shape[0] for p in parts) / 10
    var = sum(p.var(dim=(0, 2, 3), unbiased=True) * p.shape[0] for p in parts) / 10
    torch.testing.assert_close(program.state_dict["b1.running_mean"], mean)
    torch.testing.assert_close(program.state_dict["b1.running_var"], var)


def test_batchnorm_reestimation_leaves_programs_without_batchnorm_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    program = torch.export.export(model, (torch.randn(2, 3),))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    assert reestimate_batchnorm(program, (torch.randn(2, 3),), batch_size=2) == 0
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())


def test_fine_tune_spec_reestimates_batchnorm_by_default() -> None:
    assert FineTuneSpec(epochs=1).batchnorm_samples > 0
    assert FineTuneSpec(epochs=1, batchnorm_samples=0).batchnorm_samples == 0


@pytest.mark.parametrize(("criterion", "p"), [("group_l1", 1.0), ("group_l2", 2.0)])
def test_group_magnitude_aggregates_every_coupled_tensor(criterion: str, p: float) -> None:
    model = _net()
    program = _export(model)
    gm = program.module()
    analysis = analyze(gm)
    spec = PruningSpec(criterion=criterion, granularity="channel", sparsity=0.5)
    scores = group_scores(gm, analysis, spec)

    def power(t: torch.Tensor) -> torch.Tensor:
        return t.detach().abs().pow(p)

    # c1's channels: its filters, b1's scale, c2's input columns; mean over the three tensors.
    c1 = (
        power(model.c1.weight).sum(dim=(1, 2, 3))
        + power(model.b1.weight)
        + power(model.c2.weight).sum(dim=(0, 2, 3))
    ) / 3
    # c2's channels: its filters, b2's scale, and fc's 16 input columns per channel.
    fc_in = power(model.fc.weight).reshape(5, 3, 16).sum(dim=(0, 2))
    c2 = (power(model.c2.weight).sum(dim=(1, 2, 3)) + power(model.b2.weight) + fc_in) / 3
    by_size = {s.shape[0]: s for s in scores.values() if s is not None}
    torch.testing.assert_close(by_size[4], c1)
    torch.testing.assert_close(by_size[3], c2)


def _channel(criterion: str) -> PruningSpec:
    return PruningSpec(criterion=criterion, granularity="channel", sparsity=0.25)


def test_group_magnitude_keeps_a_channel_its_consumer_leans_on() -> None:
    """A channel with the smallest filter but the largest consumer column: l2 removes it,
    group_l2 keeps it."""
    model = _net()
    with torch.no_grad():
        model.c1.weight[2] *= 0.05
        model.c2.weight[:, 2] *= 50.0
    program = _export(model)
    l2 = prune_program(program, _channel("l2")).kept_out["c1"]
    group = prune_program(program, _channel("group_l2")).kept_out["c1"]
    assert 2 not in l2
    assert 2 in group
