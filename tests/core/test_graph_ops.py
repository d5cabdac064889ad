"""The op-handler registry of the channel analysis: extending it for an op it does not know."""

from __future__ import annotations

from collections.abc import Iterator

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
