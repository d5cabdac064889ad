"""Request bodies the API and e2e tiers both send."""

from __future__ import annotations


def global_l1(model_id: str, sparsity: float = 0.8, **pruning: object) -> dict:
    """``POST /v1/jobs``: unstructured L1 at ``sparsity``, one ranking across layers."""
    return {
        "model_id": model_id,
        "pruning": {
            "criterion": "l1",
            "granularity": "unstructured",
            "sparsity": sparsity,
            "scope": "global",
            **pruning,
        },
    }
