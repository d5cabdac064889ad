"""Real-world architectures (tiny transformers configs, random weights) through upload, pruning
and reload: every granularity either shrinks the model as promised or says why not.

Per model: the upload passes the format gate; global 50% unstructured zeroes exactly half of
every prunable weight together, and every matrix-multiplying weight is prunable; channel and head
pruning return a program that reloads, keeps its interface (inputs, dynamic batch, output shape),
computes what the original computes with the removed units masked, never holds more parameters
than the upload, and is smaller where structure was removed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from core.formats.pt2.describe import Pt2Info
from core.formats.pt2.gate import inspect_archive
from core.formats.pt2.program import load_program
from core.metrics import distinct_numel
from core.pipeline import MeasureConfig, run
from core.spec import JobSpec, PruningSpec
from core.structure import StructuredResult, prune_program
from core.structure.graph import GraphAnalysis
from core.structure.slicing import apply_channels, mask_channels
from examples.zoo import ZOO, ZooModel
from tests.zoo.conftest import Exported

MODELS = sorted(ZOO)
ATTENTION = sorted(n for n, m in ZOO.items() if m.attention and not m.heads_blocked)
HEADS_BLOCKED = sorted(n for n, m in ZOO.items() if m.heads_blocked)
QUICK = MeasureConfig(batch_size=2, warmup=0, repeats=1)
# Ops whose weight operand is a dense matrix product: none of their weights may be left out.
_MATMULS = {"linear", "addmm", "mm", "matmul", "einsum", "conv1d", "conv2d", "conv3d"}
# A weight may reach them transposed (Falcon's ``x @ W.T``).
_TRANSPOSES = {"t", "numpy_T", "transpose", "permute"}


def params(program: torch.export.ExportedProgram) -> int:
    return distinct_numel(program.state_dict[name] for name in program.graph_signature.parameters)


def outputs(
    program: torch.export.ExportedProgram | torch.nn.Module, x: torch.Tensor
) -> list[torch.Tensor]:
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(module(x)) if isinstance(t, torch.Tensor)]


@functools.cache
def upload_info(upload: Path) -> Pt2Info:
    """What the format gate reads from an upload: the gate alone (``load_program`` returns the
    same description after a ``torch.export.load`` that takes seconds per model here)."""
    return inspect_archive(upload)


def check_interface(
    model: ZooModel, original: torch.export.ExportedProgram, upload: Path, path: Path
) -> torch.export.ExportedProgram:
    """The written program passes the gate, reloads, and is called as the upload is."""
    reloaded, info = load_program(path)
    assert info.inputs == upload_info(upload).inputs  # names, dtypes, shapes and the dynamic batch
    for batch in (1, 3):  # batch sizes never exported
        x = model.example(batch)
        got, expected = outputs(reloaded, x), outputs(original, x)
        assert [t.shape for t in got] == [t.shape for t in expected]
    return reloaded


def _op(node: torch.fx.Node) -> str:
    return str(getattr(getattr(node.target, "overloadpacket", None), "__name__", ""))


def matmul_weights(program: torch.export.ExportedProgram) -> set[int]:
    """Storages of every parameter a dense matrix product multiplies by."""
    found: set[int] = set()
    params_by_node = program.graph_signature.inputs_to_parameters
    for node in program.graph.nodes:
        if node.op != "call_function" or _op(node) not in _MATMULS:
            continue
        for arg in pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(arg, torch.fx.Node) and _op(arg) in _TRANSPOSES:
                arg = arg.args[0]
            name = params_by_node.get(getattr(arg, "name", ""))
            if name is not None and program.state_dict[name].dim() >= 2:
                found.add(program.state_dict[name].untyped_storage().data_ptr())
    return found


@pytest.mark.parametrize("name", MODELS)
def test_global_half_unstructured_is_exact_over_every_matrix_weight(
    name: str, exported: Exported, tmp_path: Path
) -> None:
    program, path = exported(name)
    info = upload_info(path)
    state = program.state_dict
    listed = {
        state[f"{layer.name}.weight"].untyped_storage().data_ptr() for layer in info.prunable_layers
    }
    assert matmul_weights(program) <= listed, "a matrix-multiplying weight is not prunable"

    spec = JobSpec(
        pruning=PruningSpec(
            criterion="l1", granularity="unstructured", sparsity=0.5, scope="global"
        )
    )
    result = run(spec, path, tmp_path, measure=QUICK)
    assert result.model_path is not None
    pruned = check_interface(ZOO[name], program, path, result.model_path)
    weights = [pruned.state_dict[f"{layer.name}.weight"] for layer in info.prunable_layers]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * total)
    assert result.metrics.sparsity == pytest.approx(0.5, abs=1 / total)
    assert params(pruned) == params(program)
    # Only weights were zeroed: the original with those zeros computes the same.
    reference = program.module()
    with torch.no_grad():
        for key, value in reference.state_dict().items():
            if key in pruned.state_dict:
                value.mul_((pruned.state_dict[key] != 0).to(value.dtype))
    x = ZOO[name].example(3)
    for got, expected in zip(outputs(pruned, x), outputs(reference, x), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def assert_matches_masked(
    model: ZooModel,
    program: torch.export.ExportedProgram,
    pruned: torch.export.ExportedProgram,
    analysis: GraphAnalysis,
    keep: dict[int, torch.Tensor],
) -> None:
    """``pruned`` computes what ``program`` computes with the removed units' weights zeroed.

    Where a LayerNorm renormalises over channels that went, the masked model differs by design:
    the slicing is then checked exactly on the groups no LayerNorm touches (sliced again), and the
    whole result only for its shape and finiteness."""
    exact = {g: m for g, m in keep.items() if not analysis.groups_by_id[g].normalized}
    reference = program.module()
    mask_channels(reference, analysis, exact)
    x = model.example(3)
    candidate: torch.export.ExportedProgram | torch.nn.Module = pruned
    if len(exact) != len(keep):
        # The sliced module runs as it is: re-exporting it (seconds per model) would test
        # re-export again, which ``pruned`` already went through.
        candidate = program.module()
        apply_channels(candidate, analysis, exact)
        assert all(torch.isfinite(t).all() for t in outputs(pruned, x))
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(outputs(candidate, x)[0], expected, atol=1e-4, rtol=1e-4)


def structured(
    name: str, granularity: str, exported: Exported, tmp_path: Path
) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram, StructuredResult]:
    program, upload = exported(name)
    spec = PruningSpec(criterion="l1", granularity=granularity, sparsity=0.5)
    result = prune_program(program, spec)
    path = tmp_path / "pruned.pt2"
    torch.export.save(result.program, str(path))
    pruned = check_interface(ZOO[name], program, upload, path)
    assert params(pruned) <= params(program)
    if result.plan.keep:
        assert_matches_masked(ZOO[name], program, pruned, result.analysis, result.plan.keep)
    for decision in result.plan.decisions:  # whatever is left says why
        if decision.remove == 0 and not decision.group.prunable:
            assert decision.group.blocked
            assert all(isinstance(r, str) and r for r in decision.group.blocked)
    return program, pruned, result


@pytest.mark.parametrize("name", MODELS)
def test_half_the_channels_leaves_at_most_0_85_of_the_parameters(
    name: str, exported: Exported, tmp_path: Path
) -> None:
    program, pruned, _ = structured(name, "channel", exported, tmp_path)
    assert params(pruned) <= 0.85 * params(program)


def attention_projections(result: StructuredResult) -> set[str]:
    """Every weight and bias that loses heads' channels: the q, k, v and output projections."""
    analysis = result.analysis
    names: set[str] = set()
    for group in analysis.groups:
        if group.unit > 1 or group.follows is not None:
            names |= {m.target for m in group.members if m.role in ("in", "out", "bias")}
    return names


@pytest.mark.parametrize("name", ATTENTION)
def test_half_the_heads_removes_at_least_0_3_of_the_attention_projections(
    name: str, exported: Exported, tmp_path: Path
) -> None:
    program, pruned, result = structured(name, "head", exported, tmp_path)
    projections = attention_projections(result)
    assert projections, "no attention heads were found"
    before = sum(program.state_dict[n].numel() for n in projections)
    after = sum(pruned.state_dict[n].numel() for n in projections)
    assert after <= 0.7 * before, (after, before)


@pytest.mark.parametrize("name", HEADS_BLOCKED)
def test_heads_that_cannot_go_stay_and_say_why(
    name: str, exported: Exported, tmp_path: Path
) -> None:
    program, pruned, result = structured(name, "head", exported, tmp_path)
    assert params(pruned) == params(program)
    reasons = {r for d in result.plan.decisions for r in d.group.blocked}
    assert any(ZOO[name].heads_blocked in r for r in reasons), reasons


@pytest.mark.parametrize("name", sorted(n for n, m in ZOO.items() if not m.attention))
def test_head_pruning_a_model_without_attention_says_why(
    name: str, exported: Exported, tmp_path: Path
) -> None:
    program, pruned, result = structured(name, "head", exported, tmp_path)
    assert params(pruned) == params(program)
    skipped = {d.skipped for d in result.plan.decisions if d.group.prunable}
    assert skipped == {"not attention heads"}


def test_gpt2_end_to_end_keeps_its_tied_embedding_once(exported: Exported, tmp_path: Path) -> None:
    """Through the pipeline: the tied input/output embedding stays one tensor after slicing."""
    program, path = exported("gpt2")
    spec = JobSpec(pruning=PruningSpec(criterion="l1", granularity="channel", sparsity=0.5))
    result = run(spec, path, tmp_path, measure=QUICK)
    assert result.model_path is not None
    pruned = check_interface(ZOO["gpt2"], program, path, result.model_path)
    state = pruned.state_dict
    wte, head = state["model.transformer.wte.weight"], state["model.lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert wte.shape[1] < program.state_dict["model.transformer.wte.weight"].shape[1]
    assert result.metrics.params_after == params(pruned) < result.metrics.params_before
