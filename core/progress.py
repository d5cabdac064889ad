"""How the pipeline tells its caller where a job is: stages, and the share of the job done."""

from __future__ import annotations

from typing import Any, Literal, Protocol

Stage = Literal["loading", "pruning", "fine_tuning", "evaluating", "exporting", "done"]


class ProgressCallback(Protocol):
    """Told where the job is: ``stage``, the fraction of the whole job done, a message, and
    optional ``data`` worth keeping as an event (an epoch's loss, say). Called often (every
    optimizer step while training), so it must be cheap; it may raise to stop the job."""

    def __call__(
        self, stage: Stage, fraction: float, message: str, data: dict[str, Any] | None = None
    ) -> None: ...


def no_progress(
    stage: Stage, fraction: float, message: str, data: dict[str, Any] | None = None
) -> None:
    """A callback that ignores everything."""


# Where each step of a job starts, as a share of the whole job: one table, so the bar only moves
# forward whatever steps a job skips. Pruning rounds fill [prune, fine_tune), training fills
# [fine_tune, fine_tune_end).
FRACTION: dict[str, float] = {
    "load": 0.0,
    "evaluate_before": 0.2,
    "prune": 0.3,
    "evaluate_after_pruning": 0.32,
    "fine_tune": 0.35,
    "fine_tune_end": 0.55,
    "evaluate_after_fine_tune": 0.57,
    "export": 0.6,
    "measure": 0.8,
    "done": 1.0,
}


def between(start: str, end: str, share: float) -> float:
    """The fraction ``share`` of the way from step ``start`` to step ``end``."""
    return FRACTION[start] + (FRACTION[end] - FRACTION[start]) * share
