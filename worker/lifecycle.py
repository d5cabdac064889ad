"""The life of a job in the worker: claim -> run the core pipeline -> store -> record.

This is the only place that moves ``Job.status`` after the API created the row. Every write is
conditional on still owning the job (status ``running`` and our attempt number), so a worker that
lost its lease can never overwrite the one that took over.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from core.device import pick_device
from core.errors import (
    Cancelled,
    InvalidDataset,
    ModelLoadError,
    ShearsError,
    TimeLimitExceeded,
)
from core.pipeline import MeasureConfig, PipelineData, PipelineResult, Stage, TrainingConfig
from core.pipeline import run as run_pipeline
from core.spec import JobSpec
from shears.db import repository as repo
from shears.db.tables import Artifact, Dataset, JobLayer, Model, new_id, utcnow
from shears.jobspec import parse_stored
from shears.settings import Settings, get_settings
from shears.storage import Storage, StorageError, StoredFile, storage_from_settings
from worker import search
from worker.celery_app import app as celery_app
from worker.checkpoints import CheckpointMirror
from worker.db import sessions
from worker.notify import JobEventType, publish_job_event
from worker.periodic import Periodic

log = structlog.get_logger("shears.worker")


class Heartbeat(Periodic):
    """Renews the job's lease from a thread while the pipeline runs; notices cancel requests."""

    def __init__(self, job_id: str, attempt: int, lease_seconds: float) -> None:
        super().__init__(max(lease_seconds / 4, 0.2), name=f"lease-{job_id}")
        self.job_id = job_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()

    def beat(self) -> None:
        with sessions().begin() as session:
            state = repo.renew_lease(session, self.job_id, self.attempt, self.lease_seconds)
        if state is None:
            self.lost.set()
        elif state:
            self.cancel_requested.set()


class Progress:
    """The pipeline's progress callback: throttled writes, and the place a cancel takes effect."""

    def __init__(
        self, job_id: str, attempt: int, heartbeat: Heartbeat, every_s: float = 0.5
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.heartbeat = heartbeat
        self.every_s = every_s
        self._stage: str | None = None
        self._last_write = 0.0

    def __call__(
        self, stage: Stage, fraction: float, message: str, data: dict[str, Any] | None = None
    ) -> None:
        if self.heartbeat.cancel_requested.is_set():
            raise Cancelled("the job was cancelled")
        if self.heartbeat.lost.is_set():
            raise Cancelled("another worker took this job over")
        # Stage changes and calls with data are events; plain progress is throttled.
        is_event = stage != self._stage or data is not None
        now = time.monotonic()
        if not is_event and now - self._last_write < self.every_s:
            return
        with sessions().begin() as session:
            cancel = repo.set_progress(session, self.job_id, self.attempt, stage, fraction)
            if is_event:
                repo.add_event(session, self.job_id, stage, message, data)
        self._stage = stage
        self._last_write = now
        # Progress is written every `every_s` while training, so a cancel takes effect
        # at the next optimizer step after that write, not at the next lease renewal.
        if cancel:
            self.heartbeat.cancel_requested.set()
            raise Cancelled("the job was cancelled")


def run_job(job_id: str, worker: str | None = None) -> None:
    """Claim and run ``job_id``; a duplicate delivery for a live or finished job does nothing.
    ``worker`` (the Celery node name) is recorded on the job with the claim."""
    settings = get_settings()
    structlog.contextvars.bind_contextvars(job_id=job_id)
    try:
        with sessions().begin() as session:
            attempt = repo.claim_job(session, job_id, settings.job_lease_seconds, worker)
            if attempt is not None:
                # In the claim's transaction: every attempt that ever ran leaves its event,
                # even one killed a moment later.
                repo.add_event(
                    session, job_id, "loading", f"attempt {attempt} started", {"attempt": attempt}
                )
        if attempt is None:
            log.info("job not claimable (finished, cancelled, owned elsewhere or gone); skipping")
            return
        if attempt > settings.max_attempts:
            with sessions().begin() as session:
                failed = repo.fail_unclaimable(
                    session,
                    job_id,
                    f"the job was started {attempt - 1} times without finishing "
                    f"(limit {settings.max_attempts}); its worker may be crashing on it",
                )
            log.error("job exceeded its attempts", attempt=attempt)
            if failed:
                _announce(job_id, "job.failed")
            return
        log.info("job claimed", attempt=attempt)
        _announce(job_id, "job.started")
        _run_claimed(job_id, attempt, settings)
    finally:
        structlog.contextvars.unbind_contextvars("job_id")


def _run_claimed(job_id: str, attempt: int, settings: Settings) -> None:
    storage = storage_from_settings(settings)
    workdir = storage.temp_path(f".job-{job_id}-{attempt}")
    # The job's local copies of what it reads (links into the read cache with object storage).
    inputs = storage.temp_path(f".inputs-{job_id}-{attempt}")
    with sessions().begin() as session:
        job = repo.get_job_any_tenant(session, job_id)
        assert job is not None  # we hold the claim, so the row exists
        model = session.get(Model, job.model_id)
        spec_data, tenant = job.spec, job.tenant
        model_file = (
            (model.storage_key, model.sha256) if model and model.deleted_at is None else None
        )
        model_format = model.format if model else ""
        dataset_keys = _dataset_keys(session, tenant, spec_data)

    stored: list[StoredFile] = []
    # Stable across attempts, so a redelivered job resumes fine-tuning where the last one saved.
    checkpoint_dir = f"checkpoints/{tenant}/{job_id}"
    checkpoint_key = f"{checkpoint_dir}/fine_tune.pt"
    finished = False
    try:
        with Heartbeat(job_id, attempt, settings.job_lease_seconds) as heartbeat:
            if model_file is None:
                raise ModelLoadError("the job's model was deleted before the job ran")
            spec, _ = parse_stored(spec_data)
            model_path = storage.materialize(*model_file, inputs)
            data = _pipeline_data(storage, dataset_keys, inputs)
            progress = Progress(job_id, attempt, heartbeat, settings.progress_every_seconds)
            searched = None
            if spec.pruning.target is not None:  # the ratios are found first (worker/search.py)
                searched = search.run_search(
                    job_id, attempt, spec, model_path,
                    search.data_paths(storage, dataset_keys, inputs),
                    progress, workdir, model_format,
                )  # fmt: skip
                if spec.sensitivity_only:
                    search.record_scan_only(job_id, attempt, tenant, searched, storage, stored)
                    finished = True
                    return
            checkpoint = storage.checkout(checkpoint_key, inputs)
            mirror = CheckpointMirror(
                storage, checkpoint, checkpoint_key, max(settings.job_lease_seconds / 4, 0.2)
            )

            def prune(spec: JobSpec, again: bool = False) -> PipelineResult:
                if again:  # a search's step back: not the last try's fine-tuning checkpoint
                    checkpoint.unlink(missing_ok=True)
                    storage.delete_prefix(checkpoint_dir)
                return run_pipeline(
                    spec,
                    model_path,
                    workdir,
                    measure=MeasureConfig(
                        batch_size=settings.latency_batch_size,
                        warmup=settings.latency_warmup,
                        repeats=settings.latency_repeats,
                        # Latency is reported on the device the worker prunes and trains on.
                        device=str(pick_device(settings.train_device)),
                    ),
                    on_progress=progress,
                    data=data,
                    training=TrainingConfig(
                        device=settings.train_device,
                        checkpoint=checkpoint,
                        checkpoint_every_steps=settings.checkpoint_every_steps,
                    ),
                    after_prune=searched.after_prune(progress) if searched else None,
                )

            with mirror:
                result = (
                    search.prune_verified(spec, searched, prune, progress)
                    if searched
                    else prune(spec)
                )
            if heartbeat.cancel_requested.is_set():
                raise Cancelled("the job was cancelled")
            if searched is not None:
                search.record_achieved(job_id, attempt, spec, searched, result)
                result.artifacts["sensitivity"] = searched.sensitivity
            _record_success(job_id, attempt, tenant, result, storage, stored, checkpoint_dir)
            finished = True
    except Cancelled as exc:
        _discard(storage, stored, workdir, inputs)
        finished = _finish(job_id, attempt, "cancelled", None, exc.message)
    except SoftTimeLimitExceeded:
        _discard(storage, stored, workdir, inputs)
        limit = TimeLimitExceeded(
            f"the job ran past its time limit of {settings.job_time_limit_seconds} s and was "
            "stopped; raise SHEARS_JOB_TIME_LIMIT_SECONDS or shrink the job"
        )
        finished = _finish(job_id, attempt, "failed", limit.code, limit.message)
    except ShearsError as exc:
        _discard(storage, stored, workdir, inputs)
        finished = _finish(job_id, attempt, "failed", exc.code, exc.message)
    except StorageError as exc:
        _discard(storage, stored, workdir, inputs)
        finished = _finish(job_id, attempt, "failed", "storage_error", str(exc))
    except Exception as exc:
        log.exception("job crashed")
        _discard(storage, stored, workdir, inputs)
        finished = _finish(
            job_id, attempt, "failed", "internal_error", f"{type(exc).__name__}: {exc}"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(inputs, ignore_errors=True)
        if finished:  # a worker that lost the job leaves the checkpoint to the one that took it
            storage.delete_prefix(checkpoint_dir)


def _finish(job_id: str, attempt: int, status: str, code: str | None, message: str) -> bool:
    """Record the final status; False when this attempt no longer owns the job."""
    values: dict[str, Any] = {"progress_stage": "done"}
    if status == "failed":
        values.update(error_type=code, error_message=message)
    with sessions().begin() as session:
        owned = repo.finish_job(session, job_id, attempt, status, values)
        if owned:
            repo.add_event(session, job_id, "done", message, {"status": status, "error": code})
    log.info("job finished", status=status, error=code, message=message)
    if owned:
        _announce(job_id, "job.cancelled" if status == "cancelled" else "job.failed")
    return owned


def _announce(job_id: str, event: JobEventType) -> None:
    """Tell the job event listeners (webhooks, ...); only ever after the change is committed."""
    publish_job_event(celery_app, sessions(), job_id, event)


def _dataset_keys(
    session: Session, tenant: str, spec: dict[str, Any]
) -> dict[str, tuple[str, str] | None]:
    """``{section: (storage key, sha256)}`` of the datasets the spec names; None for one deleted
    since."""
    keys: dict[str, tuple[str, str] | None] = {}
    for section, dataset_id in repo.dataset_ids(spec).items():
        dataset = session.get(Dataset, dataset_id)
        usable = dataset is not None and dataset.tenant == tenant and dataset.deleted_at is None
        keys[section] = (
            (dataset.storage_key, dataset.sha256) if usable and dataset is not None else None
        )
    return keys


def _pipeline_data(
    storage: Storage, keys: dict[str, tuple[str, str] | None], inputs: Path
) -> PipelineData:
    for section, key in keys.items():
        if key is None:
            raise InvalidDataset(f"the job's {section} dataset was deleted before the job ran")
    paths = {
        section: storage.materialize(*key, inputs)
        for section, key in keys.items()
        if key is not None and section != "search"  # the search stage reads its own data
    }
    return PipelineData(**paths)


def _discard(storage: Storage, stored: list[StoredFile], *scratch: Path) -> None:
    """Remove what a job that did not succeed wrote, before its final state is recorded: once a
    client sees ``failed``, nothing of the job is left half-written."""
    for item in stored:
        storage.delete(item.key)
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)


# Artifact kinds whose format is fixed; the `model` artifact has the model's own format.
_ARTIFACT_FORMATS = {"weights": "safetensors", "report": "json", "sensitivity": "json"}


def _record_success(
    job_id: str,
    attempt: int,
    tenant: str,
    result: PipelineResult,
    storage: Storage,
    stored: list[StoredFile],
    checkpoint_dir: str,
) -> None:
    """Make the files durable first, then write everything about them in one transaction; the
    fine-tuning checkpoint goes before that transaction commits."""
    files = {**result.artifacts, "report": result.report_path}
    formats = {**_ARTIFACT_FORMATS, "model": result.format}

    result_model: Model | None = None
    if result.model_path is not None and result.model_info is not None:
        # The pruned model is a model of its own, so it can be pruned again; its own copy keeps
        # it alive when the job (and its artifacts) are deleted. The pipeline already read it
        # back through the format's gate: that description is registered as is.
        model_id = new_id("mdl")
        info = result.model_info
        key = f"models/{tenant}/{model_id}{result.model_path.suffix}"
        copy = storage.put_file(result.model_path, key)
        stored.append(copy)
        result_model = repo.model_row(
            model_id,
            tenant,
            f"{job_id} pruned",
            info,
            copy.key,
            copy.size_bytes,
            copy.sha256,
            source_job_id=job_id,
        )

    artifacts = []
    for kind, path in files.items():
        fmt = formats[kind]
        item = storage.adopt(path, f"artifacts/{tenant}/{job_id}/{kind}{path.suffix}")
        stored.append(item)
        artifacts.append(
            Artifact(
                id=new_id("art"),
                tenant=tenant,
                job_id=job_id,
                kind=kind,
                format=fmt,
                size_bytes=item.size_bytes,
                sha256=item.sha256,
                storage_key=item.key,
                created_at=utcnow(),
            )
        )

    with sessions().begin() as session:
        if result_model is not None:
            session.add(result_model)
        session.add_all(artifacts)
        session.add_all(
            JobLayer(job_id=job_id, position=i, **asdict(layer))
            for i, layer in enumerate(result.layers)
        )
        session.flush()
        owned = repo.finish_job(
            session,
            job_id,
            attempt,
            "succeeded",
            {
                "metrics": asdict(result.metrics),
                "result_model_id": result_model.id if result_model else None,
                "progress_stage": "done",
                "progress_fraction": 1.0,
            },
        )
        if not owned:
            # Cancelled or taken over while we stored: the transaction rolls back, and the
            # caller's handler removes the files and records the cancel if the job is still ours.
            raise Cancelled("the job was cancelled or taken over before its results were recorded")
        repo.add_event(session, job_id, "done", "succeeded", {"status": "succeeded"})
        # The job is ours and its row locked until the commit, so no other attempt is using the
        # checkpoint; deleted after the commit, a client that read "succeeded" at once could
        # still find it in the bucket. A failure is left to the cleanup after the job.
        try:
            storage.delete_prefix(checkpoint_dir)
        except StorageError as exc:
            log.warning("checkpoint not deleted", error=str(exc))
    log.info("job succeeded", sparsity=result.metrics.sparsity, pid=os.getpid())
    _announce(job_id, "job.succeeded")
