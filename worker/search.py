"""The search stage of a job with a ``pruning.target``: the sensitivity scan fanned out over the
workers, its cells stored, the ratios chosen.

The job's own task (holding the job's lease) creates one row per (unit, ratio) cell, publishes
scan subtasks to the queue, and then scans too: every worker that receives a subtask, and the job's
task itself, claims cells one at a time with a lease (:mod:`shears.db.scans`) until none is left.
So the scan spreads over every worker listening, a worker that dies loses only the cell it was
scoring (its lease runs out and another takes it), and a job that resumes finds its finished cells
in the database and does not score them again. The job's task alone writes the job's events and
progress, as the lifecycle does for every other stage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from core.device import pick_device
from core.errors import Cancelled, InvalidDataset, InvalidSpec
from core.formats.base import MeasureConfig
from core.pipeline import PipelineResult, ProgressCallback
from core.progress import FRACTION, between
from core.search import Scanning, open_scanner
from core.search.allocate import Choice, Curve, damage_budgets, predicted_damage
from core.search.cost import CostModel
from core.search.targets import (
    TargetKind,
    check_target,
    choose_measured,
    curves_from_cells,
    judge,
    sensitivity_document,
    targets,
    within_damage,
)
from core.spec import JobSpec, PruningSpec
from shears.db import repository as repo
from shears.db import scans
from shears.db.tables import Artifact, Model, new_id, utcnow
from shears.jobspec import parse_stored
from shears.settings import Settings, get_settings
from shears.storage import Storage, StoredFile, storage_from_settings
from worker.db import sessions
from worker.periodic import Periodic

log = structlog.get_logger("shears.search")

SCAN_TASK = "shears.scan_cells"
# Subtasks published per job: enough for every worker of a modest pool to join in; a worker that
# finds nothing left to claim returns at once.
_MAX_SUBTASKS = 16
_POLL_S = 0.25


def node_name() -> str:
    """This process, as scan rows and events name it (unique per process, like Celery's node
    names ``shears-<pid>@<host>``)."""
    return f"shears-{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True)
class Searched:
    """What the search chose, and the spec the pipeline prunes with; the curves the target is
    judged on and the cost model stay for a step back, with how the scanner turns ratios into a
    spec (``resolve``) and re-estimates a pruned model as it did every cell (``reestimate``)."""

    spec: JobSpec
    summary: dict[str, Any]
    sensitivity: Path
    curves: list[Curve]
    cost: CostModel
    resolve: Callable[[PruningSpec, Mapping[str, float]], PruningSpec]
    reestimate: Callable[[Any], int]

    def after_prune(self, progress: ProgressCallback) -> Callable[[Any], None]:
        """Re-estimate the pruned model's BatchNorm statistics on the search data, as the scan
        did for every cell (the predictions assume it)."""

        def hook(program: Any) -> None:
            count = self.reestimate(program)
            if count:
                progress(
                    "pruning",
                    FRACTION["prune"],
                    f"re-estimated {count} BatchNorm statistics on the search data",
                    {"batchnorms": count},
                )

        return hook


class _CellLease(Periodic):
    """Renews one cell's lease from a thread while it is scored (a long cell is not stolen)."""

    def __init__(self, cell_id: int, worker: str, attempts: int, lease_s: float) -> None:
        super().__init__(max(lease_s / 4, 0.2), name=f"cell-{cell_id}")
        self._args = (cell_id, worker, attempts, lease_s)

    def beat(self) -> None:
        with sessions().begin() as session:
            scans.renew_cell(session, *self._args)


def scan_some(
    job_id: str, scanner: Scanning, worker: str, lease_s: float, limit: int | None
) -> int:
    """Claim and score up to ``limit`` cells (all that are left with None); how many were scored."""
    done = 0
    while limit is None or done < limit:
        with sessions().begin() as session:
            cell = scans.claim_cell(session, job_id, worker, lease_s)
            claimed = None if cell is None else (cell.id, cell.unit, cell.ratio, cell.attempts)
        if claimed is None:
            break
        cell_id, unit, ratio, attempts = claimed
        with _CellLease(cell_id, worker, attempts, lease_s):
            scores = scanner.score(unit, ratio)
        with sessions().begin() as session:
            scans.finish_cell(session, cell_id, worker, attempts, scores)
        done += 1
    return done


# One scanner per process, for the job it last scanned: a worker that takes several subtasks of
# one job loads the model once. Its local copies live in a scratch folder replaced with it.
_cached: tuple[str, Scanning, Path] | None = None


def run_scan_task(job_id: str) -> None:
    """The scan subtask: score the job's cells while there are any to claim."""
    global _cached
    from worker.lifecycle import _dataset_keys as dataset_keys  # the job's own resolution

    settings = get_settings()
    with sessions().begin() as session:
        job = repo.get_job_any_tenant(session, job_id)
        if job is None or job.status != "running":
            return
        model = session.get(Model, job.model_id)
        spec_data, tenant = job.spec, job.tenant
        if model is None or model.deleted_at is not None:
            return
        model_file = (model.storage_key, model.sha256)
        keys = dataset_keys(session, tenant, spec_data)
    storage = storage_from_settings(settings)
    spec, _ = parse_stored(spec_data)
    if _cached is None or _cached[0] != job_id:
        if _cached is not None:
            shutil.rmtree(_cached[2], ignore_errors=True)
        scratch = storage.temp_path(f".scan-{job_id}-{os.getpid()}")
        model_path = storage.materialize(*model_file, scratch)
        paths = data_paths(storage, keys, scratch)
        _cached = (job_id, _open(spec, model_path, paths), scratch)
    worker = node_name()
    scored = scan_some(job_id, _cached[1], worker, settings.job_lease_seconds, None)
    log.info("scan subtask done", job_id=job_id, cells=scored, worker=worker)


DataKeys = dict[str, tuple[str, str] | None]


def data_paths(storage: Storage, keys: DataKeys, scratch: Path) -> tuple[Path, Path | None]:
    """Local copies of the scan's data (``pruning.search``'s dataset, else the evaluation's) and
    of the calibration data, if any."""
    section = "search" if "search" in keys else "evaluation"
    key = keys.get(section)
    if key is None:
        raise InvalidDataset(f"the job's {section} dataset (the search data) is gone or missing")
    calibration = keys.get("calibration")
    return (
        storage.materialize(*key, scratch),
        storage.materialize(*calibration, scratch) if calibration else None,
    )


def _open(spec: JobSpec, model_path: Path, paths: tuple[Path, Path | None]) -> Scanning:
    # Cells are scored where the worker prunes and trains (a GPU worker's GPU, for hf).
    device = str(pick_device(get_settings().train_device))
    return open_scanner(spec, model_path, paths[0], paths[1], device=device)


def run_search(
    job_id: str,
    attempt: int,
    spec: JobSpec,
    model_path: Path,
    paths: tuple[Path, Path | None],
    progress: ProgressCallback,
    workdir: Path,
    fmt: str,
) -> Searched:
    """Scan (with every worker that joins in), then choose the ratios for the target."""
    from worker.celery_app import app

    check_target(fmt, spec)
    target = spec.pruning.target
    assert target is not None
    settings = get_settings()
    progress("pruning", between("load", "prune", 0.1), "searching: loading the model for the scan")
    scanner = _open(spec, model_path, paths)
    units = scanner.units()
    if not units:
        raise InvalidSpec("no layer is left for the target to prune (all excluded or fixed)")
    keys_in_order = [u.key for u in units]
    grid = scanner.grid
    with sessions().begin() as session:
        scans.ensure_cells(session, job_id, keys_in_order, grid)
        job = repo.get_job_any_tenant(session, job_id)
        stored = dict(job.search or {}) if job is not None else {}
        # The scan's subtasks go where the job went: the workers that can run it.
        queue = (job.queue if job is not None else None) or settings.queue
    baseline = stored.get("baseline") or scanner.score(None, 0.0)
    summary: dict[str, Any] = {
        "status": "scanning",
        "layers_scanned": 0,
        "layers_total": len(units),
        "target": {target.kind: target.value},
        "baseline": baseline,
        "chosen": None,
        "predicted": None,
        "achieved": None,
    }
    _write(job_id, attempt, summary)
    for _ in range(min(len(units), _MAX_SUBTASKS)):
        app.send_task(SCAN_TASK, args=[job_id], queue=queue)
    worker = node_name()
    reported: set[str] = set()
    while True:
        scored = scan_some(job_id, scanner, worker, settings.job_lease_seconds, 1)
        with sessions().begin() as session:
            rows = [
                (c.unit, c.ratio, c.status, c.worker, c.scores)
                for c in scans.cells(session, job_id)
            ]
        finished = _report_layers(rows, keys_in_order, reported, progress)
        if finished != summary["layers_scanned"]:
            summary["layers_scanned"] = finished
            _write(job_id, attempt, summary)
        if all(status == "done" for _, _, status, _, _ in rows):
            break
        if scored == 0:
            time.sleep(_POLL_S)  # the rest is being scored elsewhere
            progress("pruning", between("load", "prune", 0.2), "searching: waiting for scan cells")
    cells = {(u, r): dict(s or {}) for u, r, _, _, s in rows}
    loss_curves = curves_from_cells(keys_in_order, baseline, cells, "loss", higher_is_better=False)
    acc_curves = (
        curves_from_cells(keys_in_order, baseline, cells, "accuracy", higher_is_better=True)
        if "accuracy" in baseline
        else loss_curves
    )
    cost = scanner.cost_model()
    config = measure_config(settings)
    choice, measured = choose_measured(target, loss_curves, acc_curves, cost, scanner, config)
    predicted = _predicted(choice, cost, baseline, loss_curves, acc_curves)
    if measured is not None:
        # Measured on this worker, before export: latency on its device, a perplexity rise on
        # the search data with every chosen ratio at once.
        predicted[target.kind] = measured
    summary.update(status="chosen", chosen=choice.ratios, predicted=predicted)
    _write(job_id, attempt, summary)
    progress(
        "pruning",
        between("load", "prune", 0.9),
        f"search chose ratios for {len(choice.ratios)} layers",
        {"chosen": choice.ratios, "predicted": summary["predicted"]},
    )
    path = workdir / "sensitivity.json"
    workdir.mkdir(parents=True, exist_ok=True)
    document = sensitivity_document(units, baseline, cells)
    document.update(target={target.kind: target.value}, chosen=choice.ratios)
    path.write_text(json.dumps(document, indent=1))
    resolved = spec.model_copy(update={"pruning": scanner.with_ratios(spec.pruning, choice.ratios)})
    judged_on = loss_curves if targets()[target.kind].curves == "loss" else acc_curves
    return Searched(
        resolved, summary, path, judged_on, cost, scanner.with_ratios, scanner.reestimate
    )


def measure_config(settings: Settings) -> MeasureConfig:
    """How latency is measured on this worker (the pipeline measures the same way)."""
    return MeasureConfig(
        batch_size=settings.latency_batch_size,
        warmup=settings.latency_warmup,
        repeats=settings.latency_repeats,
        device=str(pick_device(settings.train_device)),
    )


_STEP_BACKS = 2


def prune_verified(
    spec: JobSpec,
    searched: Searched,
    prune: Callable[[JobSpec, bool], PipelineResult],
    progress: ProgressCallback,
) -> PipelineResult:
    """Run the pipeline at the chosen ratios. A target judged on the evaluation data after
    fine-tuning (``max_accuracy_drop``, ``max_perplexity_increase``) is then verified; where the
    result misses it, the search steps back to a smaller predicted damage budget and prunes
    again, at most twice. ``prune(spec, again)``: ``again`` is True for a step back (its
    fine-tune starts afresh).

    The curves predict the damage straight after pruning. Where a job fine-tunes and its target
    was allocated on the curves alone (accuracy), the budgets start optimistic and fall to the
    target itself (:func:`~core.search.allocate.damage_budgets`): fine-tuning wins back most of
    the predicted drop. A target already measured with every ratio applied (perplexity) starts
    at the target."""
    target = spec.pruning.target
    if target is None or target.kind not in targets():
        return prune(searched.spec, False)
    kind = targets()[target.kind]
    if kind.judge is None:
        return prune(searched.spec, False)
    optimistic = spec.fine_tune is not None and kind.refine is None
    budgets = damage_budgets(kind.damage_budget(target.value), optimistic, _STEP_BACKS + 1)
    if optimistic:
        searched = _at_budget(spec, searched, kind, budgets[0], step=0)
    result = prune(searched.spec, False)
    for step, budget in enumerate(budgets[1:], start=1):
        m = result.metrics
        measured = judge(target, m.eval_before, m.eval_after_fine_tune or m.eval_after_pruning)
        if measured is None or measured <= target.value + 1e-9:
            return result
        searched = _at_budget(spec, searched, kind, budget, step)
        progress(
            "pruning",
            between("load", "prune", 1.0),
            f"verified {target.kind.removeprefix('max_').replace('_', ' ')} {measured:.4f} > "
            f"{target.value}: stepping back ({step} of {_STEP_BACKS})",
            {"measured": measured, "chosen": searched.summary["chosen"]},
        )
        result = prune(searched.spec, True)
    return result


def _at_budget(
    spec: JobSpec, searched: Searched, kind: TargetKind, budget: float, step: int
) -> Searched:
    """The search re-chosen within ``budget`` of predicted damage; ``step`` counts step backs."""
    choice = within_damage(searched.curves, searched.cost, budget)
    searched.summary.update(chosen=choice.ratios, step_backs=step, damage_budget=budget)
    baseline, cost = searched.summary["baseline"], searched.cost
    searched.summary["predicted"].update(
        macs=cost.fraction("macs", choice.ratios), params=cost.fraction("params", choice.ratios)
    )
    if kind.curves == "loss":
        loss = baseline.get("loss", 0.0) + choice.damage
        searched.summary["predicted"].update(loss=loss, perplexity=math.exp(loss))
    else:
        searched.summary["predicted"].update(accuracy=baseline.get("accuracy", 0.0) - choice.damage)
    pruning = searched.resolve(spec.pruning, choice.ratios)
    return replace(searched, spec=spec.model_copy(update={"pruning": pruning}))


def _predicted(
    choice: Choice, cost: Any, baseline: dict[str, float], loss: Any, acc: Any
) -> dict[str, float]:
    predicted = {
        "macs": cost.fraction("macs", choice.ratios),
        "params": cost.fraction("params", choice.ratios),
        "loss": baseline["loss"] + predicted_damage(loss, choice.ratios),
    }
    if "accuracy" in baseline:
        predicted["accuracy"] = baseline["accuracy"] - predicted_damage(acc, choice.ratios)
    if "perplexity" in baseline:
        predicted["perplexity"] = math.exp(predicted["loss"])
    return predicted


def _report_layers(
    rows: list[tuple[str, float, str, str | None, Any]],
    order: list[str],
    reported: set[str],
    progress: ProgressCallback,
) -> int:
    """An event for each unit whose cells are all scored (once), naming who scored them; returns
    how many units are finished."""
    finished = 0
    for unit in order:
        mine = [r for r in rows if r[0] == unit]
        if not mine or any(status != "done" for _, _, status, _, _ in mine):
            continue
        finished += 1
        if unit in reported:
            continue
        reported.add(unit)
        workers = sorted({w for _, _, _, w, _ in mine if w})
        progress(
            "pruning",
            between("load", "prune", 0.2 + 0.6 * finished / len(order)),
            f"scanned {unit} ({finished} of {len(order)})",
            {
                "unit": unit,
                "layers_scanned": finished,
                "layers_total": len(order),
                "workers": workers,
                "curve": {str(r): s for _, r, _, _, s in mine},
            },
        )
    return finished


def _write(job_id: str, attempt: int, summary: dict[str, Any]) -> None:
    with sessions().begin() as session:
        scans.set_search(session, job_id, attempt, summary)


def record_achieved(
    job_id: str, attempt: int, spec: JobSpec, searched: Searched, result: PipelineResult
) -> None:
    """What the pruned model measured, beside what the search predicted."""
    m = result.metrics
    achieved: dict[str, Any] = {}
    if m.macs_before and m.macs_after is not None:
        achieved["macs"] = m.macs_after / m.macs_before
    if m.params_before:
        kept = m.params_after if m.params_after != m.params_before else m.nonzero_params_after
        if kept is not None:
            achieved["params"] = kept / m.params_before
    if m.latency_ms_before and m.latency_ms_after is not None:
        achieved["latency"] = m.latency_ms_after / m.latency_ms_before
    for name, scores in (("", m.eval_after_pruning), ("_after_fine_tune", m.eval_after_fine_tune)):
        if scores:
            for metric in ("accuracy", "loss", "perplexity"):
                if metric in scores:
                    achieved[f"{metric}{name}"] = scores[metric]
    target = spec.pruning.target
    if target is not None:
        measured = judge(target, m.eval_before, m.eval_after_fine_tune or m.eval_after_pruning)
        if measured is not None:
            achieved[target.kind] = measured
            achieved["met"] = measured <= target.value + 1e-9
        elif target.kind in achieved:  # a cost target: the fraction kept
            achieved["met"] = achieved[target.kind] <= target.value + 1e-9
        else:
            achieved["met"] = None
    searched.summary.update(status="done", achieved=achieved)
    _write(job_id, attempt, searched.summary)


def record_scan_only(
    job_id: str,
    attempt: int,
    tenant: str,
    searched: Searched,
    storage: Storage,
    stored: list[StoredFile],
) -> None:
    """Finish a ``sensitivity_only`` job: the sensitivity artifact, the summary, ``succeeded``."""
    item = storage.adopt(searched.sensitivity, f"artifacts/{tenant}/{job_id}/sensitivity.json")
    stored.append(item)
    searched.summary.update(status="scanned")
    with sessions().begin() as session:
        session.add(
            Artifact(
                id=new_id("art"),
                tenant=tenant,
                job_id=job_id,
                kind="sensitivity",
                format="json",
                size_bytes=item.size_bytes,
                sha256=item.sha256,
                storage_key=item.key,
                created_at=utcnow(),
            )
        )
        session.flush()
        owned = repo.finish_job(
            session,
            job_id,
            attempt,
            "succeeded",
            {"search": searched.summary, "progress_stage": "done", "progress_fraction": 1.0},
        )
        if not owned:  # the transaction rolls back; the caller removes the file
            raise Cancelled("the job was cancelled or taken over before its scan was recorded")
        repo.add_event(
            session, job_id, "done", "succeeded: sensitivity scan only", {"status": "succeeded"}
        )
    from worker.lifecycle import _announce  # after the commit, as for every finished job

    _announce(job_id, "job.succeeded")
