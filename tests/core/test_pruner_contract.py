"""One contract for every registered pruner: shapes, exact removal counts, the result reloads.

A pruner registered without a case here fails ``test_every_registered_pruner_has_a_case``: a new
pruner is not done until it passes the same contract as the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.allocation import removal_count
from core.criteria import CRITERIA, WEIGHT_GRANULARITIES
from core.errors import InvalidSpec
from core.formats import get_format
from core.importance import element_scorers
from core.pruning import PruneContext, PruneOutcome, preflight, pruner_for, pruners, run_rounds
from core.spec import PruningSpec
from core.structure.importance import group_scorers
from tests.core.archs import MLP, Transformer, export
from tests.hf_factories import archive_folder, save_checkpoint


@dataclass(frozen=True)
class Case:
    """A model file to prune, a spec, and the removal each prunable layer must show afterwards
    (computed from the layer's shape before, independently of the pruner)."""

    write: Callable[[Path], Path]  # writes the model file into a folder, returns its path
    spec: PruningSpec
    expect: Callable[[str, tuple[int, ...], tuple[int, ...], int], None]


def _program(build: Callable[[], torch.nn.Module], input_shape: tuple[int, ...]):
    def write(folder: Path) -> Path:
        torch.manual_seed(0)
        path = folder / "model.pt2"
        torch.export.save(export(build(), input_shape), str(path))
        return path

    return write


def _checkpoint(arch: str):
    def write(folder: Path) -> Path:
        _, checkpoint = save_checkpoint(arch, folder / "checkpoint")
        return archive_folder(checkpoint, folder / "model.tar")

    return write


def _weights(model: object) -> dict[str, torch.Tensor]:
    """Every parameter of a loaded model of either format, by name."""
    if isinstance(model, torch.export.ExportedProgram):
        return dict(model.state_dict)
    return dict(model.model.named_parameters())  # hf: the transformers model inside


def _run(model: object, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()(inputs["x"])
    return model.model(input_ids=inputs["ids"]).logits


def _rows_half(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
    # Language models rank within each output row: every row loses round(s x in).
    assert after == before
    assert zeros == before[0] * removal_count(0.5, before[1]), name


def _zeros_exact(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
    assert after == before
    assert zeros == removal_count(0.5, torch.Size(before).numel()), name


def _half_of_each_run(
    name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int
) -> None:
    assert after == before
    assert before[1] % 4 == 0
    assert zeros == torch.Size(before).numel() // 2, name  # 2 of every 4 along the inputs


def _whole_blocks(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
    assert after == before
    rows, cols = before[0], before[1]
    assert zeros == 4 * removal_count(0.5, rows * cols // 4), name


def _half_the_outputs(
    output_layers: set[str],
) -> Callable[[str, tuple[int, ...], tuple[int, ...], int], None]:
    def check(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
        if name in output_layers:  # channels that reach the model's outputs stay
            assert after[0] == before[0], name
        else:
            assert after[0] == before[0] - removal_count(0.5, before[0]), name

    return check


def _half_the_heads(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
    # Transformer(16, 4 heads of 4): qkv loses 2 heads of q, k and v; proj their inputs.
    if name == "attn.qkv":
        assert after == (before[0] // 2, before[1])
    elif name == "attn.proj":
        assert after == (before[0], before[1] // 2)
    else:
        assert after == before, name


def _narrower(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
    # Tiny Llama (hidden 32, MLP 64, 4 heads of 8 in 2 key/value groups) at width mlp 0.5 and
    # heads 0.5: every layer keeps 32 neurons and 1 group (2 query heads); nothing is zeroed.
    out, inp = before
    short = name.rsplit(".", 1)[-1]
    expected = {
        "gate_proj": (out - removal_count(0.5, out), inp),
        "up_proj": (out - removal_count(0.5, out), inp),
        "down_proj": (out, inp - removal_count(0.5, inp)),
        "q_proj": (out // 2, inp),
        "k_proj": (out // 2, inp),
        "v_proj": (out // 2, inp),
        "o_proj": (out, inp // 2),
    }
    assert after == expected[short], name
    assert zeros == 0, name


def _one_layer_gone(name: str, before: tuple[int, ...], after: tuple[int, ...], zeros: int) -> None:
    # depth 1 of 2 layers: a removed layer's linears report (0, 0), the kept ones are untouched.
    assert after in ((0, 0), before), name
    assert zeros == 0, name


CASES: dict[tuple[str, str], Case] = {
    ("pt2", "unstructured"): Case(
        _program(lambda: MLP(32, 2), (12,)),
        PruningSpec(criterion="l1", granularity="unstructured", sparsity=0.5),
        _zeros_exact,
    ),
    ("pt2", "n:m"): Case(
        _program(lambda: MLP(32, 2), (12,)),
        PruningSpec(criterion="l2", granularity="n:m", n_m=(2, 4)),
        _half_of_each_run,
    ),
    ("pt2", "block"): Case(
        _program(lambda: MLP(32, 2), (12,)),
        PruningSpec(criterion="l1", granularity="block", block=(1, 4), sparsity=0.5),
        _whole_blocks,
    ),
    ("pt2", "channel"): Case(
        _program(lambda: MLP(32, 2), (12,)),
        PruningSpec(criterion="l1", granularity="channel", sparsity=0.5),
        _half_the_outputs({"out"}),
    ),
    ("pt2", "head"): Case(
        _program(lambda: Transformer(16, 4, 32), (5, 6)),
        PruningSpec(criterion="l1", granularity="head", sparsity=0.5),
        _half_the_heads,
    ),
    ("hf", "unstructured"): Case(
        _checkpoint("llama"),
        PruningSpec(criterion="magnitude", granularity="unstructured", sparsity=0.5),
        _rows_half,
    ),
    ("hf", "n:m"): Case(
        _checkpoint("llama"),
        PruningSpec(criterion="magnitude", granularity="n:m", n_m=(2, 4)),
        _half_of_each_run,
    ),
    ("hf", "width"): Case(
        _checkpoint("llama"),
        PruningSpec(criterion="magnitude", granularity="width", width={"mlp": 0.5, "heads": 0.5}),
        _narrower,
    ),
    ("hf", "depth"): Case(
        _checkpoint("llama"),
        PruningSpec(criterion="random", granularity="depth", depth={"layers": 1}),
        _one_layer_gone,
    ),
}


def test_every_registered_pruner_has_a_case() -> None:
    assert set(pruners()) == set(CASES)


def test_every_criterion_has_a_scorer_for_what_it_claims() -> None:
    for name, info in CRITERIA.items():
        if "pt2" not in info.formats:
            continue  # language-model criteria are the hf pruners' own
        if info.granularities & WEIGHT_GRANULARITIES:
            assert name in element_scorers(), name
        if info.granularities & {"channel", "head"}:
            assert name in group_scorers(), name


@pytest.mark.parametrize("key", sorted(CASES), ids="-".join)
def test_pruner_contract(key: tuple[str, str], tmp_path: Path) -> None:
    fmt_name, granularity = key
    case = CASES[key]
    fmt = get_format(fmt_name)
    model, info = fmt.load(case.write(tmp_path))
    first = info.inputs[0]
    inputs = {
        "x": torch.randn(3, *first.shape[1:]),
        "ids": torch.randint(0, 200, (3, 16)),
    }

    outcome: PruneOutcome = run_rounds(
        pruner_for(fmt_name, granularity), model, info, case.spec, PruneContext()
    )

    # Shapes and counts: every prunable layer reported, each as the spec says.
    state = _weights(outcome.model)
    assert [layer.name for layer in outcome.layers] == [p.name for p in info.prunable_layers]
    renamed = outcome.details.get("renamed", {})  # depth renumbers the decoder layers it keeps
    for layer, before in zip(outcome.layers, info.prunable_layers, strict=True):
        if layer.shape_after == (0, 0):  # removed with its decoder layer
            assert (layer.params, layer.nonzero) == (0, 0)
            case.expect(layer.name, before.shape, layer.shape_after, 0)
            continue
        prefix = next((old for old in renamed if layer.name.startswith(old + ".")), None)
        current = renamed[prefix] + layer.name[len(prefix) :] if prefix else layer.name
        weight = state[f"{current}.weight"]
        assert layer.shape_before == before.shape
        assert layer.shape_after == tuple(weight.shape)
        assert layer.nonzero == int(weight.count_nonzero())
        zeros = weight.numel() - layer.nonzero
        case.expect(layer.name, before.shape, layer.shape_after, zeros)
    assert outcome.params_after == fmt.count_parameters(outcome.model)

    # The result reloads through the format's own gate, computes the same and keeps its
    # interface (a batch size never exported).
    out = tmp_path / "out"
    out.mkdir()
    written = fmt.save(outcome.model, out)
    reloaded, reloaded_info = fmt.load(written["model"])
    assert reloaded_info.inputs == info.inputs
    with torch.no_grad():
        torch.testing.assert_close(_run(reloaded, inputs), _run(outcome.model, inputs))
    assert fmt.count_parameters(reloaded) == outcome.params_after


def test_preflight_checks_what_metadata_can_tell() -> None:
    layers = {"a": 3, "b": 3}
    unreachable = {"scope": "global", "sparsity": 0.5, "max_layer_sparsity": 0.5}
    # Weights: the caps are known from the layer sizes (1 + 1 of the 3 needed).
    with pytest.raises(InvalidSpec, match="allows only 2"):
        preflight(
            "pt2", PruningSpec(criterion="l1", granularity="unstructured", **unreachable), layers
        )
    # Channels: group sizes need the graph, so only the globs are checked before the worker.
    preflight("pt2", PruningSpec(criterion="l1", granularity="channel", **unreachable), layers)
    with pytest.raises(InvalidSpec, match="match no prunable layer"):
        preflight(
            "pt2",
            PruningSpec(criterion="l1", granularity="channel", sparsity=0.5, exclude=("c",)),
            layers,
        )
    # A criterion of another format's pruners.
    with pytest.raises(InvalidSpec, match="'l1' is not available for 'hf' models"):
        preflight(
            "hf", PruningSpec(criterion="l1", granularity="unstructured", sparsity=0.5), layers
        )
