"""Head pruning through the attention layouts of transformers' decoders and vision models that
timm-style code never produces: q, k and v interleaved per head in one fused projection, a
relative position bias table reshaped before it is gathered, a single token per sequence, and
an output layout that depends on the attention kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core.spec import PruningSpec
from core.structure import StructuredResult, analyze, prune_program
from core.structure.slicing import mask_channels
from tests.core.archs import (
    CosineAttention,
    FusedHeadsAttention,
    InterpolatedBiasAttention,
    export,
)


def heads(sparsity: float = 0.5) -> PruningSpec:
    return PruningSpec(criterion="l1", granularity="head", sparsity=sparsity)


def assert_matches_masked(
    program: torch.export.ExportedProgram, result: StructuredResult, shape: tuple[int, ...]
) -> None:
    """The smaller program computes what ``program`` does with the removed heads zeroed."""
    reference = program.module()
    mask_channels(reference, result.analysis, result.plan.keep)
    pruned = result.program.module()
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["neox", "per_head", "bloom", "grouped"])
def test_interleaved_q_k_v_lose_whole_heads_from_the_fused_rows(layout: str) -> None:
    torch.manual_seed(0)
    model = FusedHeadsAttention(16, 4, layout=layout)
    useless = 1  # plant a unit (head, or key/value group) whose q, k and v produce nothing
    with torch.no_grad():
        model.qkv.weight[model.block(useless)] = 0.0
        model.qkv.bias[model.block(useless)] = 0.0
    program = export(model, (5, 16))
    result = prune_program(program, heads())

    units, per_unit = model.kv, model.qkv.out_features // model.kv
    fused_rows = result.kept_out["qkv"]
    kept = sorted({r // per_unit for r in fused_rows})
    assert len(kept) == units - units // 2
    assert useless not in kept
    # Whole units went: every fused row of a kept unit stays (its q, k and v), and the output
    # projection keeps exactly the columns those units' heads feed.
    assert fused_rows == [u * per_unit + i for u in kept for i in range(per_unit)]
    assert result.kept_in["proj"] == [c for u in kept for c in model.columns(u)]
    state = result.program.state_dict
    assert state["qkv.weight"].shape == (len(kept) * per_unit, 16)
    assert state["proj.weight"].shape == (16, 8)
    assert_matches_masked(program, result, (5, 16))


def test_a_bias_table_reshaped_before_the_gather_loses_the_pruned_heads_columns() -> None:
    torch.manual_seed(0)
    model = InterpolatedBiasAttention(16, 4)
    program = export(model, (5, 16))
    group = analyze(program.module(), heads=True).group_of_layer("q")
    assert group is not None
    assert group.prunable, group.blocked
    result = prune_program(program, heads())
    state = result.program.state_dict
    assert state["table"].shape == (10, 2)
    kept_heads = sorted({c // 4 for c in result.kept_in["proj"]})
    torch.testing.assert_close(state["table"], program.state_dict["table"][:, kept_heads])
    assert_matches_masked(program, result, (5, 16))


def test_cosine_attention_loses_its_heads_scales_and_mlp_bias_rows_together() -> None:
    torch.manual_seed(0)
    model = CosineAttention(16, 4)
    program = export(model, (5, 16))
    result = prune_program(program, heads())
    kept_heads = sorted({c // 4 for c in result.kept_in["proj"]})
    assert len(kept_heads) == 2
    state = result.program.state_dict
    # The per-head scale (a parameter seen through clamp and exp) and the MLP's output rows
    # (the per-head bias) keep the same heads as q, k and v.
    torch.testing.assert_close(state["logit_scale"], model.logit_scale[kept_heads].detach())
    torch.testing.assert_close(state["mlp.2.weight"], model.mlp[2].weight[kept_heads].detach())
    assert state["qkv.weight"].shape == (24, 16)
    assert_matches_masked(program, result, (5, 16))


class MultiQuery(nn.Module):
    """One key and one value head read by every query head. ``falcon``: Falcon-7B's fused
    projection of H query heads then the key and the value head, split apart along the heads and
    expanded; ``repeat_kv``: Gemma-2B's separate projections, the key/value head viewed with an
    inferred head count (``view(B, N, -1, D)``) and repeated by transformers' ``repeat_kv``."""

    def __init__(self, dim: int = 16, heads: int = 4, layout: str = "falcon") -> None:
        super().__init__()
        self.heads, self.head_dim, self.layout = heads, dim // heads, layout
        if layout == "falcon":
            self.qkv = nn.Linear(dim, (heads + 2) * self.head_dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def query_rows(self, head: int) -> slice:
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, self.head_dim
        if self.layout == "falcon":
            fused = self.qkv(x).view(b, n, -1, d)
            q, k, v = (t.transpose(1, 2) for t in fused.split([h, 1, 1], dim=2))
            k, v = (t.expand(b, h, n, d) for t in (k, v))
        else:
            q = self.q(x).view(b, n, -1, d).transpose(1, 2)
            k, v = (t.view(b, n, -1, d).transpose(1, 2) for t in self.kv(x).chunk(2, dim=-1))
            k, v = (t[:, :, None].expand(b, 1, h, n, d).reshape(b, h, n, d) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("layout", ["falcon", "repeat_kv"])
def test_multi_query_attention_loses_query_heads_and_keeps_its_key_value_head(
    layout: str,
) -> None:
    torch.manual_seed(0)
    model = MultiQuery(layout=layout)
    query = model.qkv if layout == "falcon" else model.q
    useless = 2  # a query head that produces nothing
    with torch.no_grad():
        query.weight[model.query_rows(useless)] = 0.0
        query.bias[model.query_rows(useless)] = 0.0
    program = export(model, (5, 16))
    analysis = analyze(program.module(), heads=True)
    reasons = {r for g in analysis.groups for r in g.blocked}
    assert any("the one key/value head of multi-query attention stays" in r for r in reasons)

    result = prune_program(program, heads())
    kept_heads = sorted({c // 4 for c in result.kept_in["proj"]})
    assert len(kept_heads) == 2
    assert useless not in kept_heads
    state = result.program.state_dict
    if layout == "falcon":
        # Two query heads' rows went; the key and value rows (the last 8) all stay.
        assert result.kept_out["qkv"] == [
            r for h in kept_heads for r in range(4 * h, 4 * h + 4)
        ] + [*range(16, 24)]
        assert state["qkv.weight"].shape == (16, 16)
    else:
        assert state["q.weight"].shape == (8, 16)
        assert state["kv.weight"].shape == (8, 16)
    assert state["proj.weight"].shape == (16, 8)
    assert_matches_masked(program, result, (5, 16))


class OneToken(nn.Module):
    """MobileViT at its last stage: a sequence of one token, so (B, 1, C) -> (B, 1, H, D)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            m(x).view(b, n, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        y = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_a_single_token_sequence_splits_channels_into_heads() -> None:
    program = export(OneToken(), (1, 16))
    result = prune_program(program, heads())
    assert result.program.state_dict["proj.weight"].shape == (16, 8)
    assert_matches_masked(program, result, (1, 16))


class KernelLayout(nn.Module):
    """``permute(...).contiguous().view(...)`` after SDPA with a mask over the batch: traced
    under ``no_grad`` the CPU kernel returns a (B, N, H, D) layout already, export drops the
    no-op ``contiguous`` and keeps a bare ``view`` that the kernel used with gradients on (as
    re-export traces) cannot take (Data2VecVision's relative position bias)."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        mask = self.bias.unsqueeze(0) + torch.zeros(b, 1, n, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.permute(0, 2, 1, 3).contiguous().view(b, n, c)
        return y + self.down(F.gelu(self.up(y)))


def test_a_view_that_only_held_for_the_traced_kernel_layout_re_exports() -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(
            KernelLayout().eval(), (torch.randn(2, 5, 16),), dynamic_shapes=({0: batch},)
        )
    channels = PruningSpec(criterion="l1", granularity="channel", sparsity=0.5)
    result = prune_program(program, channels)
    assert result.program.state_dict["up.weight"].shape == (16, 16)
    assert_matches_masked(program, result, (5, 16))
