"""Structured (channel) pruning on the exported graph, over many generated architectures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from core.errors import InvalidSpec
from core.formats.pt2.program import load_program
from core.pipeline import MeasureConfig, run
from core.spec import JobSpec, PruningSpec
from core.structure import analyze, plan_channels, prune_program
from core.structure.slicing import apply_channels, mask_channels, reexport
from examples.models import SmallTransformer
from tests.core.archs import ARCHS, MLP, ResidualCNN, export

FEW = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def channel(**kw: object) -> PruningSpec:
    return PruningSpec(**{"criterion": "l1", "granularity": "channel", "sparsity": 0.5, **kw})


def n_params(program: torch.export.ExportedProgram) -> int:
    return sum(p.numel() for p in program.parameters())


@FEW
@given(
    arch=st.sampled_from(sorted(ARCHS)),
    width=st.integers(1, 2),
    sparsity=st.floats(0.1, 0.8),
    criterion=st.sampled_from(["l1", "l2", "random"]),
    granularity=st.sampled_from(["channel", "head"]),
)
def test_smaller_program_computes_what_the_masked_one_does(
    arch: str, width: int, sparsity: float, criterion: str, granularity: str
) -> None:
    torch.manual_seed(width)
    spec = ARCHS[arch]
    program = export(spec.build(width), spec.input_shape)
    gm = program.module()
    analysis = analyze(gm, heads=granularity == "head")
    pruning = channel(sparsity=sparsity, criterion=criterion, granularity=granularity)
    plan = plan_channels(gm, analysis, pruning)
    # LayerNorm statistics over pruned channels change by design; compare the rest exactly.
    keep = {g: m for g, m in plan.keep.items() if not analysis.groups_by_id[g].normalized}
    reference = program.module()
    mask_channels(reference, analysis, keep)
    apply_channels(gm, analysis, keep)
    pruned = reexport(gm, program)

    assert pruned.range_constraints.keys() == program.range_constraints.keys()
    for batch in (1, 3, 9):  # batch sizes never exported: the dynamic dim survived
        x = torch.randn(batch, *spec.input_shape)
        with torch.no_grad():
            torch.testing.assert_close(pruned.module()(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_half_the_channels_leaves_at_most_0_6_of_the_parameters(arch: str) -> None:
    # Grouped and depthwise convolutions included: they lose channels block by block.
    spec = ARCHS[arch]
    program = export(spec.build(2), spec.input_shape)
    # Attention alone has no channels to remove (its residual reaches the input): heads go.
    granularity = "head" if arch in ("causal", "timm") else "channel"
    result = prune_program(program, channel(sparsity=0.5, granularity=granularity))
    x = torch.randn(5, *spec.input_shape)
    assert result.program.module()(x).shape == program.module()(x).shape
    ratio = n_params(result.program) / n_params(program)
    assert ratio <= 0.6, ratio


def op_nodes(program: torch.export.ExportedProgram) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def assert_no_slower_path(
    program: torch.export.ExportedProgram, pruned: torch.export.ExportedProgram
) -> None:
    """What the smaller program runs: the dense graph's ops, none added (no gathers, slices or
    copies left from slicing), and contiguous weights, also after a save/load round trip: a
    strided weight sends linear/conv to a slower kernel path, which costs latency per call."""
    dense, small = op_nodes(program), op_nodes(pruned)
    assert all(small.get(op, 0) <= n for op, n in dense.items()), (dense, small)
    assert set(small) <= set(dense), set(small) - set(dense)
    buffer = io.BytesIO()
    torch.export.save(pruned, buffer)
    buffer.seek(0)
    for form in (pruned, torch.export.load(buffer)):
        strided = [n for n, t in form.state_dict.items() if not t.is_contiguous()]
        assert not strided, strided


@FEW
@given(arch=st.sampled_from(sorted(ARCHS)), granularity=st.sampled_from(["channel", "head"]))
def test_the_smaller_program_runs_no_extra_ops_on_contiguous_weights(
    arch: str, granularity: str
) -> None:
    spec = ARCHS[arch]
    program = export(spec.build(2), spec.input_shape)
    pruned = prune_program(program, channel(granularity=granularity)).program
    assert_no_slower_path(program, pruned)


def test_the_small_latency_transformer_shrinks_every_linear_it_can() -> None:
    """The hand-written-attention transformer of the latency benchmark (issue 12): 50% channels
    halves the residual stream and the MLP, adds no op, and leaves the attention's head
    reshapes valid (the batch size stays dynamic)."""
    torch.manual_seed(0)
    program = export(SmallTransformer(dim=32, heads=4, hidden=64, depth=2, features=8), (8, 8))
    result = prune_program(program, channel())
    assert_no_slower_path(program, result.program)
    shapes = {n: tuple(t.shape) for n, t in result.program.state_dict.items()}
    assert shapes["blocks.0.up.weight"] == (32, 16)
    assert shapes["blocks.0.attn.qkv.weight"] == (96, 16)  # heads are `head` pruning's
    assert shapes["blocks.1.attn.proj.weight"] == (16, 32)
    for batch in (1, 7):
        assert result.program.module()(torch.randn(batch, 8, 8)).shape == (batch, 10)


@pytest.mark.parametrize("arch", ["residual", "transformer"])
def test_sparsity_zero_is_the_identity(arch: str) -> None:
    spec = ARCHS[arch]
    program = export(spec.build(1), spec.input_shape)
    result = prune_program(program, channel(sparsity=0.0))
    assert result.program is program
    assert not result.kept_out
    assert all(d.remove == 0 for d in result.plan.decisions)


def test_channels_that_reach_the_outputs_are_never_removed() -> None:
    program = export(MLP(16), (12,))
    result = prune_program(program, channel(sparsity=0.7))
    out = next(d for d in result.plan.decisions if "out" in d.group.layers)
    assert out.remove == 0
    assert "reaches the model's outputs" in out.group.blocked
    assert result.program.module()(torch.randn(2, 12)).shape == (2, 4)


def test_residual_adds_couple_every_layer_writing_to_the_stream() -> None:
    program = export(ResidualCNN(8, blocks=2), (3, 8, 8))
    analysis = analyze(program.module())
    stream = analysis.group_of_layer("stem")
    assert stream is not None
    assert set(stream.layers) == {"stem", "blocks.0.3", "blocks.1.3"}
    members = {m.target for m in stream.members}
    assert {"bn.weight", "bn.running_var", "blocks.0.4.weight", "head.weight"} <= members


class Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cumsum over the channels is not understood: those channels must stay.
        return self.c(F.relu(self.b(torch.cumsum(self.a(x), dim=-1))))


def test_an_op_it_does_not_understand_blocks_its_group_with_a_reason() -> None:
    program = export(Cumsum(), (4,))
    result = prune_program(program, channel(sparsity=0.5))
    a = next(d for d in result.plan.decisions if d.group.layers == ["a"])
    b = next(d for d in result.plan.decisions if d.group.layers == ["b"])
    assert a.remove == 0
    assert any("cumsum" in r for r in a.group.blocked)
    assert b.remove == 4  # the rest still shrinks
    x = torch.randn(3, 4)
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    torch.testing.assert_close(result.program.module()(x), reference(x))


def test_exclude_and_overrides_apply_by_layer_name() -> None:
    program = export(MLP(16, depth=3), (12,))
    spec = channel(sparsity=0.5, exclude=["layers.0"], layer_sparsity={"layers.2": 0.25})
    result = prune_program(program, spec)
    removed = {d.group.layers[0]: d.remove for d in result.plan.decisions}
    assert removed == {"layers.0": 0, "layers.1": 8, "layers.2": 4, "out": 0}
    with pytest.raises(InvalidSpec, match="nothing"):
        prune_program(program, channel(exclude=["nothing"]))


def test_global_scope_removes_exactly_its_share_of_all_channels() -> None:
    program = export(ARCHS["concat"].build(2), (3, 8, 8))
    result = prune_program(program, channel(sparsity=0.4, scope="global"))
    pool = [d for d in result.plan.decisions if d.group.prunable]
    assert sum(d.remove for d in pool) == round(0.4 * sum(d.group.size for d in pool))
    assert all(d.remove < d.group.size for d in pool)


def _mlp_with(plant: str) -> MLP:
    torch.manual_seed(0)
    model = MLP(16, depth=1)
    with torch.no_grad():
        if plant == "zero_filter":
            model.layers[0].weight[5].zero_()
        else:
            model.layers[0].weight[5] *= 1e-3
    return model


@pytest.mark.parametrize("criterion", ["l1", "l2", "lp"])
def test_magnitude_ranks_a_zeroed_filter_last(criterion: str) -> None:
    program = export(_mlp_with("zero_filter"), (12,))
    spec = channel(criterion=criterion, sparsity=1 / 16, p=3.0 if criterion == "lp" else None)
    result = prune_program(program, spec)
    assert result.kept_out["layers.0"] == [i for i in range(16) if i != 5]


def test_bn_scale_ranks_a_zero_gamma_last() -> None:
    torch.manual_seed(0)
    model = ResidualCNN(8, blocks=1)
    with torch.no_grad():
        model.blocks[0][1].weight[3] = 0.0  # the BN after blocks.0.0
    program = export(model, (3, 8, 8))
    result = prune_program(program, channel(criterion="bn_scale", sparsity=1 / 8))
    assert result.kept_out["blocks.0.0"] == [0, 1, 2, 4, 5, 6, 7]


def test_random_is_seeded_per_spec() -> None:
    program = export(MLP(16), (12,))
    a = prune_program(program, channel(criterion="random", seed=1)).kept_out
    b = prune_program(program, channel(criterion="random", seed=1)).kept_out
    c = prune_program(program, channel(criterion="random", seed=2)).kept_out
    assert a == b
    assert a != c


FAST = MeasureConfig(batch_size=8, warmup=0, repeats=1)


def _save(program: torch.export.ExportedProgram, path: Path) -> Path:
    torch.export.save(program, str(path))
    return path


def test_pipeline_writes_a_smaller_program_and_the_kept_channels(tmp_path: Path) -> None:
    # Wide enough that the weights, not the archive's metadata, dominate the file size.
    model_path = _save(export(ResidualCNN(32, blocks=1), (3, 8, 8)), tmp_path / "m.pt2")
    result = run(JobSpec(pruning=channel(sparsity=0.5)), model_path, tmp_path / "out", measure=FAST)
    m = result.metrics
    assert m.params_after < 0.6 * m.params_before
    assert m.macs_after < 0.5 * m.macs_before
    assert m.size_bytes_after is not None
    assert m.size_bytes_after < m.size_bytes_before
    assert result.model_path is not None
    pruned, info = load_program(result.model_path)
    assert info.inputs[0].dynamic_dims[0].dim == 0
    assert pruned.module()(torch.randn(11, 3, 8, 8)).shape == (11, 10)
    layers = {layer.name: layer for layer in result.layers}
    assert layers["stem"].shape_after == (16, 3, 3, 3)
    assert layers["head"].shape_after == (10, 16)
    report = json.loads(result.report_path.read_text())
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert len(by_name["stem"]["kept_channels"]) == 16
    assert len(by_name["head"]["kept_input_channels"]) == 16
    assert by_name["head"]["kept_channels"] is None
    assert any(not g["prunable"] for g in report["groups"])


def test_dry_run_reports_the_groups_and_prunes_nothing(tmp_path: Path) -> None:
    model_path = _save(export(ARCHS["grouped"].build(1), (3, 8, 8)), tmp_path / "m.pt2")
    spec = JobSpec(pruning=channel(sparsity=0.5), dry_run=True)
    result = run(spec, model_path, tmp_path / "out", measure=FAST)
    assert result.model_path is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]
    report = json.loads(result.report_path.read_text())
    groups = {tuple(g["layers"]): g for g in report["groups"]}
    assert groups[("mid",)]["remove"] == 4
    assert groups[("mid",)]["keep"] == 4
    # The grouped convolution's input and output lose the same number per block (2 groups).
    assert groups[("stem",)]["equal_blocks"] == 2
    assert groups[("stem",)]["remove"] == 4
    assert groups[("grouped",)]["remove"] == 8
    blocked = groups[("head",)]
    assert not blocked["prunable"]
    assert blocked["remove"] == 0
    assert blocked["blocked"] == ["reaches the model's outputs"]
    assert result.metrics.params_after < result.metrics.params_before


def test_bn_scale_needs_a_structured_granularity() -> None:
    with pytest.raises(ValueError, match="channel"):
        PruningSpec(criterion="bn_scale", granularity="unstructured", sparsity=0.5)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_head_pruning_removes_whole_heads(attention: str) -> None:
    from tests.core.archs import CausalSelfAttention, Transformer

    torch.manual_seed(0)
    if attention == "sdpa":
        model: nn.Module = Transformer(16, 4, 32)
        q_weights, proj = ["attn.qkv.weight"], "attn.proj.weight"
    else:
        model = CausalSelfAttention(16, 4)
        q_weights, proj = ["q.weight", "k.weight", "v.weight"], "proj.weight"
    with torch.no_grad():  # plant a useless head: head 2 of q, k and v produce nothing
        for name in q_weights:
            w = model.get_parameter(name)
            for part in range(w.shape[0] // 16):
                w[part * 16 + 8 : part * 16 + 12] = 0.0
    shape = (5, 6) if attention == "sdpa" else (5, 16)
    program = export(model, shape)
    result = prune_program(program, channel(granularity="head", sparsity=0.25))
    heads = [d for d in result.plan.decisions if d.group.unit > 1]
    assert [(d.units, d.remove) for d in heads] == [(4, 1)]
    assert heads[0].describe()["unit"] == "head"
    state = result.program.state_dict
    for name in q_weights:
        assert state[name].shape[0] == program.state_dict[name].shape[0] * 3 // 4
    assert state[proj].shape == (16, 12)
    kept = result.kept_in[proj.removesuffix(".weight")]
    assert kept == [*range(8), *range(12, 16)]  # the planted head went
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    for batch in (1, 6):
        x = torch.randn(batch, *shape)
        torch.testing.assert_close(result.program.module()(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("pick", ["unbind", "index"])
def test_timm_attention_loses_the_same_heads_from_q_k_and_v(pick: str, fused: bool) -> None:
    from tests.core.archs import TimmAttention

    torch.manual_seed(0)
    model = TimmAttention(16, 4, pick=pick, fused=fused)
    with torch.no_grad():  # plant a useless head: head 2 of q, k and v produce nothing
        for part in range(3):
            model.qkv.weight[part * 16 + 8 : part * 16 + 12] = 0.0
    program = export(model, (5, 16))
    result = prune_program(program, channel(granularity="head", sparsity=0.5))
    heads = [d for d in result.plan.decisions if d.group.unit > 1]
    assert [(d.units, d.remove) for d in heads] == [(4, 2)]
    kept_heads = sorted({c // 4 for c in result.kept_in["proj"]})
    assert len(kept_heads) == 2
    assert 2 not in kept_heads
    channels = [h * 4 + i for h in kept_heads for i in range(4)]
    assert result.kept_in["proj"] == channels
    # q, k and v: three slices of the fused rows, each losing the same heads
    assert result.kept_out["qkv"] == [part * 16 + c for part in range(3) for c in channels]

    buffer = io.BytesIO()
    torch.export.save(result.program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    state = loaded.state_dict
    assert state["qkv.weight"].shape == (24, 16)
    assert state["qkv.bias"].shape == (24,)
    assert state["proj.weight"].shape == (16, 8)
    assert loaded.range_constraints.keys() == program.range_constraints.keys()
    assert loaded.call_spec.in_spec == program.call_spec.in_spec
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    for batch in (1, 3, 9):  # batch sizes never exported: the dynamic dim survived
        x = torch.randn(batch, 5, 16)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_stacked_q_k_and_v_used_as_one_tensor_block_their_heads() -> None:
    class Summed(nn.Module):  # reads the stacked parts whole: their heads cannot be followed
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
            return x + self.proj(qkv.sum(0).transpose(1, 2).reshape(b, n, c))

    program = export(Summed(), (5, 16))
    analysis = analyze(program.module(), heads=True)
    group = analysis.group_of_layer("qkv")
    assert group is not None
    assert not group.prunable
    assert any("stacks q, k and v" in reason for reason in group.blocked), group.blocked
    result = prune_program(program, channel(granularity="head", sparsity=0.5))
    assert result.program.state_dict["qkv.weight"].shape == (48, 16)


@pytest.mark.parametrize("dynamic", [True, False])
def test_multihead_attention_module_loses_whole_heads(dynamic: bool) -> None:
    from tests.core.archs import Transformer

    torch.manual_seed(0)
    model = Transformer(16, 4, 32, mha=True).eval()
    with torch.no_grad():  # plant a useless head: head 1 of q, k and v
        for part in range(3):
            model.attn.in_proj_weight[part * 16 + 4 : part * 16 + 8] = 0.0
    if dynamic:
        program = export(model, (5, 6))
    else:  # a static batch: B*H is a literal in the graph, rewritten as B*H'
        program = torch.export.export(model, (torch.randn(4, 5, 6),))
    result = prune_program(program, channel(granularity="head", sparsity=0.25))
    heads = [d for d in result.plan.decisions if d.group.unit > 1]
    assert [(d.units, d.remove) for d in heads] == [(4, 1)]
    state = result.program.state_dict
    assert state["attn.in_proj_weight"].shape == (36, 16)
    assert state["attn.out_proj.weight"].shape == (16, 12)
    assert result.kept_in["attn.out_proj"] == [*range(4), *range(8, 16)]
    x = torch.randn(6 if dynamic else 4, 5, 6)
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    torch.testing.assert_close(result.program.module()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_grouped_convolution_keeps_every_block_balanced() -> None:
    from tests.core.archs import GroupedCNN

    torch.manual_seed(3)
    program = export(GroupedCNN(8, groups=4), (3, 8, 8))  # stem 8 -> grouped 16 in 4 groups
    result = prune_program(program, channel(sparsity=0.5, criterion="random", seed=3))
    stem = result.kept_out["stem"]
    assert [sum(1 for c in stem if c // 2 == block) for block in range(4)] == [1, 1, 1, 1]
    grouped = result.kept_out["grouped"]
    assert [sum(1 for c in grouped if c // 4 == block) for block in range(4)] == [2, 2, 2, 2]
    assert result.program.state_dict["grouped.weight"].shape == (8, 1, 3, 3)
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(result.program.module()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_a_wrong_smaller_program_is_caught_before_anyone_gets_it(monkeypatch) -> None:
    from core.errors import PruningError
    from core.structure import prune as prune_module

    def broken(gm, analysis, keep) -> None:  # a slicing bug: right shapes, wrong weights
        apply_channels(gm, analysis, keep)
        with torch.no_grad():
            gm.get_submodule("layers.1")._parameters["weight"] = nn.Parameter(
                gm.get_parameter("layers.1.weight").flip(1)
            )

    monkeypatch.setattr(prune_module, "apply_channels", broken)
    program = export(MLP(16), (12,))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    with pytest.raises(PruningError, match="does not compute"):
        prune_program(program, channel(sparsity=0.5))
    for name, tensor in program.state_dict.items():  # and the original is untouched
        assert torch.equal(tensor, before[name]), name


def test_a_dynamic_sequence_length_survives_head_pruning() -> None:
    from tests.core.archs import CausalSelfAttention

    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=15)
    model = CausalSelfAttention(16, 4, tokens=16).eval()
    program = torch.export.export(
        model, (torch.randn(4, 6, 16),), dynamic_shapes=({0: batch, 1: seq},)
    )
    result = prune_program(program, channel(granularity="head", sparsity=0.5))
    assert [str(r) for r in result.program.range_constraints.values()] == [
        str(r) for r in program.range_constraints.values()
    ]
    for t in (2, 9, 15):
        assert result.program.module()(torch.randn(3, t, 16)).shape == (3, t, 16)
    assert n_params(result.program) < 0.6 * n_params(program)


def test_dropout_in_training_mode_does_not_trip_the_check() -> None:
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)).train()
    # Exported in training mode: dropout draws random masks, so runs differ anyway.
    batch = torch.export.Dim("b", max=64)
    program = torch.export.export(model, (torch.randn(4, 12),), dynamic_shapes=({0: batch},))
    result = prune_program(program, channel(sparsity=0.5))
    assert result.program.state_dict["0.weight"].shape == (8, 12)
