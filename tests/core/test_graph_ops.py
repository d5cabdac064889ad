"""The op-handler registry of the channel analysis: extending it for an op it does not know."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from core.spec import PruningSpec
from core.structure import Analyzer, Label, analyze, prune_program, register_op, unregister_op
from core.structure.graph import handler_for, registered_ops
from core.structure.slicing import mask_channels
from tests.core.archs import export


@torch.library.custom_op("shears_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor) -> torch.Tensor:
    """An elementwise activation the analyzer has never heard of."""
    return 1.7159 * torch.tanh(2 / 3 * x)


@scaled_tanh.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(scaled_tanh(self.a(x)))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves the registry as it found it."""
    before = {name: handler_for(name) for name in registered_ops()}
    yield
    assert {name: handler_for(name) for name in registered_ops()} == before


def test_a_registered_handler_makes_a_custom_op_s_channels_prunable() -> None:
    program = export(CustomActivation(), (4,))
    before = analyze(program.module()).group_of_layer("a")
    assert before is not None
    assert not before.prunable
    assert "shears_test.scaled_tanh is not understood" in before.blocked

    @register_op("shears_test::scaled_tanh")
    def elementwise(analyzer: Analyzer, node: fx.Node) -> Label | None:
        return analyzer.label_of(node.args[0])  # channels pass through untouched

    try:
        after = analyze(program.module()).group_of_layer("a")
        assert after is not None
        assert after.prunable, after.blocked
        assert {m.target for m in after.members} == {"a.weight", "a.bias", "b.weight"}

        result = prune_program(
            program, PruningSpec(criterion="l1", granularity="channel", sparsity=0.5)
        )
        decision = next(d for d in result.plan.decisions if d.group.layers == ["a"])
        assert decision.remove == 4  # half of a's 8 channels
        x = torch.randn(3, 4)
        reference = program.module()
        mask_channels(reference, result.analysis, result.plan.keep)
        torch.testing.assert_close(result.program.module()(x), reference(x))
    finally:
        unregister_op("shears_test::scaled_tanh")

    blocked_again = analyze(program.module()).group_of_layer("a")
    assert blocked_again is not None
    assert not blocked_again.prunable


def test_a_handler_that_raises_blocked_blocks_with_its_reason() -> None:
    from core.structure import Blocked

    @register_op("shears_test::scaled_tanh")
    def refuse(analyzer: Analyzer, node: fx.Node) -> Label | None:
        raise Blocked(f"{node.name} is not allowed here")

    try:
        group = analyze(export(CustomActivation(), (4,)).module()).group_of_layer("a")
    finally:
        unregister_op("shears_test::scaled_tanh")
    assert group is not None
    assert any("is not allowed here" in reason for reason in group.blocked)


def test_replacing_a_built_in_handler_and_unregistering_brings_it_back() -> None:
    builtin = handler_for("relu")
    assert builtin is not None
    with pytest.raises(ValueError, match="already have a handler"):
        register_op("relu")(builtin)

    def block_relu(analyzer: Analyzer, node: fx.Node) -> Label | None:
        raise NotImplementedError

    register_op("relu", replace=True)(block_relu)
    assert handler_for("relu") is block_relu
    unregister_op("relu")
    assert handler_for("relu") is builtin


def test_a_qualified_name_wins_over_the_bare_one_only_in_its_namespace() -> None:
    def aten_only(analyzer: Analyzer, node: fx.Node) -> Label | None:
        raise NotImplementedError

    register_op("aten::relu")(aten_only)
    try:
        assert handler_for("relu", "aten") is aten_only
        assert handler_for("relu", "other") is handler_for("relu")
    finally:
        unregister_op("aten::relu")


def test_unregistering_an_unknown_op_is_an_error() -> None:
    with pytest.raises(KeyError):
        unregister_op("shears_test::never_registered")
    with pytest.raises(ValueError, match="at least one"):
        register_op()


class _Weight(nn.Module):
    """A bare ``weight`` parameter, used through a matrix product rather than ``nn.Linear``."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape) / shape[0] ** 0.5)


class Spellings(nn.Module):
    """The same kind of layer written five ways: addmm with an (in, out) weight (GPT-2's Conv1D),
    ``x @ W.t()``, an einsum projection, ``x @ W.T`` (Falcon's FalconLinear) and ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = _Weight(6, 12)  # (in, out)
        self.bias = nn.Parameter(torch.randn(12))
        self.mm = _Weight(10, 12)  # (out, in)
        self.ein = _Weight(8, 10)  # (out, in)
        self.numpy_t = _Weight(8, 8)  # (out, in)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.addmm(self.bias, x, self.conv1d.weight))
        h = torch.relu(h @ self.mm.weight.t())
        h = torch.relu(torch.einsum("bi,oi->bo", h, self.ein.weight))
        h = torch.relu(h @ self.numpy_t.weight.T)
        return self.head(h)


def test_every_spelling_of_a_linear_layer_is_one_prunable_layer(tmp_path: Path) -> None:
    from core.formats.pt2.program import load_program

    program = export(Spellings(), (6,))
    analysis = analyze(program.module())
    for layer in ("conv1d", "mm", "ein", "numpy_t"):
        group = analysis.group_of_layer(layer)
        assert group is not None
        assert group.prunable, group.blocked

    torch.export.save(program, str(tmp_path / "m.pt2"))
    _, info = load_program(tmp_path / "m.pt2")
    dims = {layer.name: (layer.kind, layer.reduction_dim) for layer in info.prunable_layers}
    assert dims == {
        "conv1d": ("linear", 0),
        "mm": ("linear", 1),
        "ein": ("linear", 1),
        "numpy_t": ("linear", 1),
        "head": ("linear", 1),
    }

    result = prune_program(
        program, PruningSpec(criterion="l1", granularity="channel", sparsity=0.5)
    )
    state = result.program.state_dict
    assert tuple(state["conv1d.weight"].shape) == (6, 6)  # its output columns went
    assert tuple(state["mm.weight"].shape) == (5, 6)
    assert tuple(state["ein.weight"].shape) == (4, 5)
    assert tuple(state["numpy_t.weight"].shape) == (4, 4)
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    x = torch.randn(5, 6)
    torch.testing.assert_close(result.program.module()(x), reference(x))


def test_n_m_runs_along_the_input_channels_of_an_in_out_weight() -> None:
    from core.allocation import allocate
    from core.masks import weight_masks

    spec = PruningSpec(criterion="l1", granularity="n:m", n_m=(2, 4))
    weight = torch.randn(8, 3)  # (in, out): every output column holds 8 inputs
    keep = weight_masks(spec, {"w": weight}, allocate(spec, {"w": 24}), {"w": 0})["w"]
    assert keep.shape == weight.shape
    runs = keep.T.reshape(3, 2, 4)  # per output, runs of 4 consecutive inputs
    assert bool((runs.sum(dim=-1) == 2).all())


class TiedLM(nn.Module):
    """An embedding whose weight is also the output projection (GPT-2's wte and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h)


def test_a_tied_weight_is_sliced_once_and_stays_tied() -> None:
    from core.metrics import distinct_numel

    batch = torch.export.Dim("batch", min=1, max=64)
    ids = torch.randint(0, 20, (2, 5))
    program = torch.export.export(TiedLM().eval(), (ids,), dynamic_shapes=({0: batch},))
    before = distinct_numel(program.parameters())
    result = prune_program(
        program, PruningSpec(criterion="l1", granularity="channel", sparsity=0.5)
    )
    state = result.program.state_dict
    wte, head = state["wte.weight"], state["lm_head.weight"]
    assert wte.shape == head.shape == (20, 4)  # the hidden width halved in both uses
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert distinct_numel(result.program.parameters()) < before
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    torch.testing.assert_close(result.program.module()(ids), reference(ids))
