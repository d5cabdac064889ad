"""Unstructured masks: remove exactly ``round(sparsity x N)`` weights from each ranking pool."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from core.allocation import Allocation, removal_count


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask (bool, ``scores``' shape) that drops exactly the ``k`` lowest scores.

    Ties are broken by position, so the count is exact whatever the values.
    """
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k > 0:
        # topk on the negated scores is the k smallest; it never sorts the whole tensor.
        drop = torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices
        keep[drop] = False
    return keep.reshape(scores.shape)


def _global_counts(
    scores: Mapping[str, torch.Tensor], k: int, caps: Mapping[str, int]
) -> dict[str, int]:
    """How many weights each layer gives up so the pool loses its ``k`` lowest, within caps.

    Water-filling: rank the free layers together; a layer that would exceed its cap is fixed at the
    cap and the rest are ranked again for what is left. Each round fixes at least one layer.
    """
    counts = dict.fromkeys(scores, 0)
    free = list(scores)
    remaining = k
    while remaining > 0 and free:
        flat = torch.cat([scores[n].reshape(-1) for n in free])
        threshold = torch.kthvalue(flat, remaining).values
        del flat
        below = {n: int((scores[n] < threshold).sum()) for n in free}
        over = [n for n in free if below[n] > caps[n]]
        if over:
            for n in over:
                counts[n] = caps[n]
                remaining -= caps[n]
                free.remove(n)
            continue
        # Everything strictly below the threshold goes; ties at the threshold fill the rest in layer
        # order, as far as each cap allows.
        for n in free:
            counts[n] = below[n]
        need = remaining - sum(below.values())
        saturated = []
        for n in free:
            if need == 0:
                break
            ties = int((scores[n] == threshold).sum())
            take = min(need, ties, caps[n] - counts[n])
            counts[n] += take
            need -= take
            if counts[n] == caps[n]:
                saturated.append(n)
        if need == 0:
            return counts
        # Ties were left in capped layers: fix those at their cap and rank the rest again.
        for n in free:
            counts[n] = 0
        for n in saturated:
            counts[n] = caps[n]
            remaining -= caps[n]
            free.remove(n)
    return counts


def unstructured_masks(
    scores: Mapping[str, torch.Tensor], allocation: Allocation
) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer in ``allocation``; excluded layers get none."""
    masks: dict[str, torch.Tensor] = {}
    for name, sparsity in allocation.per_layer.items():
        masks[name] = lowest_k_mask(scores[name], removal_count(sparsity, scores[name].numel()))

    if allocation.global_pool:
        pool = {n: scores[n] for n in allocation.global_pool}
        counts = _global_counts(pool, allocation.global_removals, allocation.global_caps)
        for name, count in counts.items():
            masks[name] = lowest_k_mask(pool[name], count)
    return masks
