"""N:M, block and LAMP masks: the per-group properties hold exactly, on any shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core import masks
from core.allocation import allocate, removal_count
from core.formats.pt2.program import load_program
from core.importance import lamp_scores
from core.masks import block_sizes, block_tiles, nm_mask, nm_removed, weight_masks
from core.pipeline import MeasureConfig, run
from core.spec import JobSpec, PruningSpec
from tests.factories import PRUNABLE, export_resnet


@st.composite
def weights(draw):
    rank = draw(st.sampled_from([2, 4]))
    out = draw(st.integers(1, 9))
    inp = draw(st.integers(1, 19))
    shape = (out, inp) if rank == 2 else (out, inp, draw(st.integers(1, 3)), 3)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(shape, generator=gen)


@settings(max_examples=40, deadline=None)
@given(w=weights(), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]))
def test_n_m_holds_in_every_group(w: torch.Tensor, nm: tuple[int, int]) -> None:
    n, m = nm
    keep = nm_mask(w.abs(), n, m)
    runs = keep.movedim(1, -1) if w.dim() > 2 else keep
    length = runs.shape[-1]
    for start in range(0, length, m):
        run_ = runs[..., start : start + m]
        expected = n if run_.shape[-1] == m else -(-n * run_.shape[-1] // m)
        assert (run_.sum(-1) == min(expected, run_.shape[-1])).all()
    # What the search's cost model counts without building a mask.
    assert int((~keep).sum()) == w.numel() // length * nm_removed(length, n, m)
    if length % m == 0:  # and the kept ones are the largest of their run
        r = w.abs().movedim(1, -1) if w.dim() > 2 else w.abs()
        r = r.reshape(*r.shape[:-1], -1, m)
        k = runs.reshape(*runs.shape[:-1], -1, m)
        kept_min = torch.where(k, r, torch.inf).amin(-1)
        dropped_max = torch.where(~k, r, -torch.inf).amax(-1)
        assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 2), (1, 4), (3, 4), (4, 8)])
def test_n_m_keeps_what_topk_keeps_and_gives_ties_to_the_earlier_weight(n: int, m: int) -> None:
    """Short runs are ranked lane by lane, longer ones by topk: the same masks as topk's where
    no two scores of a run are equal; an equal score goes to the earlier position; NaN ranks
    highest."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 40 * m, generator=generator)
    runs = scores.reshape(64, -1, m)
    expected = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.topk(n, -1).indices, True)
    assert torch.equal(nm_mask(scores, n, m), expected.reshape(scores.shape))
    ties = torch.randint(0, 2, (64, 40 * m), generator=generator).float()
    ties[0, 1] = float("nan")
    keep = nm_mask(ties, n, m)
    assert bool(keep[0, 1])
    tied = ties.reshape(64, -1, m)
    order = torch.sort(-tied.nan_to_num(nan=torch.inf), dim=-1, stable=True).indices[..., :n]
    stable = torch.zeros_like(tied, dtype=torch.bool).scatter_(-1, order, True)
    if m <= masks.LANE_RANK_MAX_M:  # longer runs: topk's own order among equal scores
        assert torch.equal(keep, stable.reshape(ties.shape))


def test_n_m_leaves_a_layer_at_zero_dense() -> None:
    """``layer_sparsity`` 0 leaves a layer dense at n:m too; any other ratio means the pattern."""
    spec = PruningSpec(criterion="l1", granularity="n:m", layer_sparsity={"a": 0.0, "b": 0.3})
    ws = {name: torch.randn(4, 8) for name in ("a", "b", "c")}
    masks = weight_masks(spec, ws, allocate(spec, {n: w.numel() for n, w in ws.items()}))
    assert set(masks) == {"b", "c"}
    assert all(int(masks[n].sum()) == 16 for n in ("b", "c"))


@settings(max_examples=40, deadline=None)
@given(
    ws=st.lists(weights(), min_size=1, max_size=3),
    block=st.sampled_from([(1, 4), (4, 4), (2, 3)]),
    sparsity=st.floats(0, 0.95),
    scope=st.sampled_from(["layer", "global"]),
)
def test_block_masks_are_whole_blocks_in_exact_count(ws, block, sparsity, scope) -> None:
    spec = PruningSpec(
        criterion="l1",
        granularity="block",
        block=block,
        sparsity=sparsity,
        scope=scope,
        max_layer_sparsity=1.0,
    )
    layers = {f"l{i}": w for i, w in enumerate(ws)}
    masks = weight_masks(spec, layers, allocate(spec, {n: w.numel() for n, w in layers.items()}))
    bh, bw = block
    removed_total = tiles_total = 0
    for name, w in layers.items():
        keep = masks[name].reshape(w.shape[0], -1)
        rows, cols = keep.shape
        removed = tiles = 0
        for i in range(0, rows, bh):
            for j in range(0, cols, bw):
                tile = keep[i : i + bh, j : j + bw]
                assert tile.all() or not tile.any()  # whole blocks only
                removed += int(not tile.any())
                tiles += 1
        if scope == "layer":
            assert removed == removal_count(sparsity, tiles)
        removed_total += removed
        tiles_total += tiles
    if scope == "global":
        assert removed_total == removal_count(sparsity, tiles_total)


def test_lamp_scores_are_comparable_across_layers() -> None:
    small = torch.tensor([[0.01, 0.02, 0.03, 0.04]])
    big = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.allclose(lamp_scores(small), lamp_scores(big))  # scale-free
    assert lamp_scores(big).max() == 1.0  # every layer keeps its largest weight longest
    spec = PruningSpec(criterion="lamp", granularity="unstructured", sparsity=0.5, scope="global")
    layers = {"small": small, "big": big}
    masks = weight_masks(spec, layers, allocate(spec, {"small": 4, "big": 4}))
    # Global L1 would wipe out "small"; LAMP prunes both layers alike.
    assert int(masks["small"].sum()) == int(masks["big"].sum()) == 2


def test_lamp_ranks_a_zeroed_weight_last() -> None:
    w = torch.randn(4, 8)
    w[2, 3] = 0.0
    spec = PruningSpec(criterion="lamp", granularity="unstructured", sparsity=1 / 32)
    keep = weight_masks(spec, {"l": w}, allocate(spec, {"l": 32}))["l"]
    assert not keep[2, 3]
    assert int(keep.sum()) == 31


FAST = MeasureConfig(batch_size=8, warmup=0, repeats=1)


@pytest.mark.parametrize(
    "pruning",
    [
        {"granularity": "n:m", "n_m": [2, 4]},
        {"granularity": "block", "block": [1, 4], "sparsity": 0.5},
        {"granularity": "unstructured", "criterion": "lamp", "sparsity": 0.7, "scope": "global"},
    ],
)
def test_pipeline_prunes_at_every_weight_granularity(pruning: dict, tmp_path: Path) -> None:
    model = export_resnet(tmp_path / "m.pt2")
    spec = JobSpec(pruning=PruningSpec(**{"criterion": "l1", **pruning}))
    result = run(spec, model, tmp_path / "out", measure=FAST)
    pruned, _ = load_program(result.model_path)
    if pruning["granularity"] == "n:m":
        assert result.metrics.sparsity == pytest.approx(0.5, abs=0.02)
        w = pruned.state_dict["stage1.c1.weight"].movedim(1, -1).reshape(-1, 4)
        assert ((w != 0).sum(-1) <= 2).all()
    else:
        assert result.metrics.sparsity == pytest.approx(spec.pruning.sparsity, abs=0.02)
    assert [layer.name for layer in result.layers] == PRUNABLE


def test_block_masks_accept_an_exclude_naming_a_layer_they_do_not_score() -> None:
    """Excluded layers get no scores, so the block pools are built without them; their
    ``exclude`` glob still names a real layer and is no typo."""
    spec = PruningSpec(
        criterion="l1", granularity="block", sparsity=0.5, block=(1, 4), exclude=("b",)
    )
    weights = {"a": torch.randn(4, 8), "b": torch.randn(4, 8)}
    keep = weight_masks(spec, weights, allocate(spec, {"a": 32, "b": 32}))
    assert set(keep) == {"a"}
    assert int((~keep["a"]).sum()) == 16  # 4 of its 8 blocks of 1x4


@settings(max_examples=40, deadline=None)
@given(weights(), st.integers(1, 5), st.integers(1, 5))
def test_block_sizes_count_every_weight_once(weight: torch.Tensor, bh: int, bw: int) -> None:
    sizes = block_sizes((bh, bw), tuple(weight.shape))
    assert sizes.shape == block_tiles((bh, bw), weight).shape
    assert int(sizes.sum()) == weight.numel()
    assert int(sizes.min()) >= 1
    assert int(sizes.max()) <= bh * bw
