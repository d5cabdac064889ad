"""Export the ``.pt2`` archives once for every gate test in this package; tests rewrite copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.core.formats.pt2_archives import export_all


@pytest.fixture(scope="package")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    with torch.random.fork_rng():  # seeded exports must not shift other tests' random state
        return export_all(tmp_path_factory.mktemp("exported"))
