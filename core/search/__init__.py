"""Finding per-layer ratios for a target: the sensitivity scan, its curves, the allocation.

A pure library (no service): a caller scans cells (:class:`Scanner`), turns the scores into
curves and allocates a target over them (:mod:`core.search.allocate`), then prunes with the chosen
``layer_sparsity`` (:func:`with_ratios`) through the ordinary pipeline.
"""

from core.search.scan import (
    Scanner,
    Scanning,
    open_scanner,
    reestimate_batchnorm,
    reestimate_program_batchnorm,
    register_scanner,
    scan_reads_targets,
)
from core.search.units import ScanUnit, family_for, register_family, with_ratios

__all__ = [
    "ScanUnit",
    "Scanner",
    "Scanning",
    "family_for",
    "open_scanner",
    "reestimate_batchnorm",
    "reestimate_program_batchnorm",
    "register_family",
    "register_scanner",
    "scan_reads_targets",
    "with_ratios",
]
