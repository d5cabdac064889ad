"""The pruning spec as clients see it: its published schema agrees with what it accepts."""

from __future__ import annotations

import pytest

from core.spec import PruningSpec


def test_sparsity_is_optional_in_the_schema_only_where_n_m_fills_it_in() -> None:
    assert "sparsity" not in PruningSpec.model_json_schema()["required"]
    assert PruningSpec(criterion="l1", granularity="n:m").sparsity == 0.5
    with pytest.raises(ValueError, match="sparsity"):
        PruningSpec(criterion="l1", granularity="unstructured")
