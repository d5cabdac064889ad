"""What the language-model search tests share: a whole scan gathered as the worker gathers it."""

from __future__ import annotations

from types import SimpleNamespace

from core.search import open_scanner
from core.search.targets import curves_from_cells
from core.spec import JobSpec


def scan(spec: JobSpec, lm: SimpleNamespace) -> SimpleNamespace:
    """Every cell of the scan of ``lm.checkpoint`` on ``lm.search`` (calibrated on
    ``lm.train``), the loss curves and the cost model."""
    scanner = open_scanner(spec, lm.checkpoint, lm.search, lm.train)
    baseline = scanner.score(None, 0.0)
    keys = [u.key for u in scanner.units()]
    cells = {(k, r): scanner.score(k, r) for k in keys for r in scanner.grid}
    curves = curves_from_cells(keys, baseline, cells, "loss", higher_is_better=False)
    return SimpleNamespace(
        scanner=scanner, keys=keys, cells=cells, curves=curves, cost=scanner.cost_model()
    )
