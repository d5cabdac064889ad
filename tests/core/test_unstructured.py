"""Exact counts, global ranking, caps, overrides and exclusions of unstructured masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.allocation import allocate, removal_count
from core.errors import InvalidSpec
from core.spec import PruningSpec
from core.unstructured import lowest_k_mask, unstructured_masks


def spec(**kw) -> PruningSpec:
    return PruningSpec(**{"criterion": "l1", "granularity": "unstructured", **kw})


def test_removal_count_rounds_half_up() -> None:
    assert removal_count(0.5, 3) == 2
    assert removal_count(0.8, 10) == 8
    assert removal_count(0.0, 10) == 0


def test_lowest_k_drops_exactly_k_even_with_ties() -> None:
    scores = torch.zeros(5, 7)  # all tied
    keep = lowest_k_mask(scores, 11)
    assert int((~keep).sum()) == 11


@st.composite
def layer_scores(draw):
    n_layers = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 60)) for _ in range(n_layers)]
    # few distinct values force ties at the threshold
    distinct = draw(st.sampled_from([3, 1000]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return {
        f"l{i}": (
            torch.randint(0, distinct, (n,), generator=gen).float() * draw(st.floats(0.1, 10))
        )
        for i, n in enumerate(sizes)
    }


@settings(max_examples=150, deadline=None)
@given(scores=layer_scores(), sparsity=st.floats(0, 0.98), cap=st.floats(0.5, 1.0))
def test_global_masks_remove_exact_count_within_caps(scores, sparsity, cap) -> None:
    sizes = {n: s.numel() for n, s in scores.items()}
    try:
        allocation = allocate(
            spec(scope="global", sparsity=sparsity, max_layer_sparsity=cap), sizes
        )
    except InvalidSpec:
        assert sum(int(cap * n) for n in sizes.values()) < removal_count(
            sparsity, sum(sizes.values())
        )
        return
    masks = unstructured_masks(scores, allocation)
    removed = {n: int((~m).sum()) for n, m in masks.items()}
    assert sum(removed.values()) == removal_count(sparsity, sum(sizes.values()))
    for n, count in removed.items():
        assert count <= int(cap * sizes[n])
    # Global ranking: nothing kept in an uncapped layer scores below anything removed.
    removed_max = max(
        (float(scores[n][~masks[n]].max()) for n in scores if removed[n]), default=None
    )
    if removed_max is not None:
        for n in scores:
            if removed[n] < int(cap * sizes[n]) and bool(masks[n].any()):
                assert float(scores[n][masks[n]].min()) >= removed_max


@settings(max_examples=80, deadline=None)
@given(scores=layer_scores(), sparsity=st.floats(0, 0.99))
def test_layer_scope_prunes_each_layer_to_its_own_count(scores, sparsity) -> None:
    allocation = allocate(spec(sparsity=sparsity), {n: s.numel() for n, s in scores.items()})
    masks = unstructured_masks(scores, allocation)
    for n, s in scores.items():
        assert int((~masks[n]).sum()) == removal_count(sparsity, s.numel())


def test_overrides_first_match_wins_and_exclusions_keep_everything() -> None:
    scores = {"features.0": torch.rand(100), "features.1": torch.rand(100), "fc": torch.rand(50)}
    allocation = allocate(
        spec(
            scope="global",
            sparsity=0.5,
            layer_sparsity={"features.0": 0.1, "features.*": 0.9},
            exclude=["fc"],
        ),
        {n: s.numel() for n, s in scores.items()},
    )
    masks = unstructured_masks(scores, allocation)
    assert "fc" not in masks
    assert int((~masks["features.0"]).sum()) == 10
    assert int((~masks["features.1"]).sum()) == 90


@pytest.mark.parametrize("field", ["exclude", "layer_sparsity"])
def test_pattern_matching_nothing_is_an_error_naming_the_layers(field) -> None:
    value = ["classifer"] if field == "exclude" else {"classifer": 0.5}
    with pytest.raises(InvalidSpec, match=r"classifer.*match no prunable layer.*fc"):
        allocate(spec(sparsity=0.5, **{field: value}), {"conv": 10, "fc": 10})


def test_global_sparsity_beyond_caps_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="max_layer_sparsity"):
        allocate(spec(scope="global", sparsity=0.9, max_layer_sparsity=0.5), {"a": 10, "b": 10})


def test_lp_needs_p() -> None:
    with pytest.raises(ValueError, match="needs 'p'"):
        spec(criterion="lp", sparsity=0.5)
    with pytest.raises(ValueError, match="only applies"):
        spec(criterion="l1", p=2, sparsity=0.5)


@settings(max_examples=60, deadline=None)
@given(
    scores=layer_scores(),
    sparsity=st.floats(0, 0.98),
    cap=st.floats(0.5, 1.0),
    scope=st.sampled_from(["layer", "global"]),
    chunk=st.sampled_from([3, 7, 64, 1 << 22]),
    negate=st.booleans(),
)
def test_in_place_magnitude_pruning_matches_the_masks(
    scores, sparsity, cap, scope, chunk, negate
) -> None:
    from core.unstructured import prune_magnitude_in_place

    weights = {n: (-s if negate else s).clone() for n, s in scores.items()}
    sizes = {n: w.numel() for n, w in weights.items()}
    try:
        allocation = allocate(spec(scope=scope, sparsity=sparsity, max_layer_sparsity=cap), sizes)
    except InvalidSpec:
        return
    masks = unstructured_masks({n: w.abs() for n, w in weights.items()}, allocation)
    before = {n: w.clone() for n, w in weights.items()}
    planned = prune_magnitude_in_place(weights, allocation, apply=False, chunk=chunk)
    assert all(torch.equal(weights[n], before[n]) for n in weights)  # a dry run changes nothing
    counts = prune_magnitude_in_place(weights, allocation, chunk=chunk)
    assert counts == planned == {n: int((~m).sum()) for n, m in masks.items()}
    for n, removed in counts.items():
        zeroed = weights[n] == 0
        # Zeros include weights that were zero already; they are always among the lowest.
        assert int(zeroed.sum()) == max(removed, int((before[n] == 0).sum()))
        if removed and bool((~zeroed).any()):
            assert float(before[n][zeroed].abs().max()) <= float(before[n][~zeroed].abs().min())


def test_in_place_pruning_removes_the_same_weights_as_the_masks_without_ties() -> None:
    from core.unstructured import prune_magnitude_in_place

    gen = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(n, generator=gen) for i, n in enumerate([50, 300, 1000])}
    allocation = allocate(
        spec(scope="global", sparsity=0.7), {n: w.numel() for n, w in weights.items()}
    )
    masks = unstructured_masks({n: w.abs() for n, w in weights.items()}, allocation)
    prune_magnitude_in_place(weights, allocation, chunk=33)
    for n, keep in masks.items():
        assert torch.equal(weights[n] != 0, keep)
