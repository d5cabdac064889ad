"""The pruning spec as clients see it: its published schema agrees with what it accepts."""

from __future__ import annotations

import pytest

from core.spec import PruningSpec


def test_sparsity_is_optional_in_the_schema_only_where_n_m_fills_it_in() -> None:
    assert "sparsity" not in PruningSpec.model_json_schema()["required"]
    assert PruningSpec(criterion="l1", granularity="n:m").sparsity == 0.5
    with pytest.raises(ValueError, match="sparsity"):
        PruningSpec(criterion="l1", granularity="unstructured")


def test_a_target_at_n_m_keeps_the_pattern_and_no_sparsity() -> None:
    spec = PruningSpec.model_validate(
        {"criterion": "l1", "granularity": "n:m", "target": {"params": 0.5}}
    )
    assert spec.n_m == (2, 4)  # the default pattern, stored with the job
    stored = spec.model_dump(mode="json")
    assert "sparsity" not in stored
    assert PruningSpec.model_validate(stored) == spec  # replayed as it was
    given = {"criterion": "l1", "granularity": "n:m", "n_m": [4, 8], "target": {"params": 0.5}}
    assert PruningSpec.model_validate(given).n_m == (4, 8)
    with pytest.raises(ValueError, match="not both"):
        PruningSpec.model_validate({**given, "sparsity": 0.5})
