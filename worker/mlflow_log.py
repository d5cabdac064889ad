"""Log finished jobs to MLflow, one run per job, on the notify queue after the job's final commit.

Every final state is logged (``succeeded`` as a FINISHED run, ``failed`` as FAILED, ``cancelled``
as KILLED, with ``shears.status`` and ``shears.error_type`` tags), so the MLflow experiment is the
whole history, failures included. A run holds: params = the stored spec flattened
(``pruning.sparsity``), metrics = the job's numeric metrics flattened
(``eval_after_pruning.accuracy``), tags ``shears.job_id``, ``shears.tenant``, ``shears.status``,
artifacts ``model/<file>`` and ``report.json``; ``mlflow.register_as`` in the spec also registers
``model/`` as a version of that registered model.

A tracking server that is down never touches the job: the job committed before this task was
enqueued. The task retries with doubling delays (``SHEARS_MLFLOW_RETRY_SECONDS`` up to
``SHEARS_MLFLOW_RETRY_MAX_SECONDS``, ``SHEARS_MLFLOW_MAX_RETRIES`` times) and says so in the
job's events; an error that would recur on every try (a refused parameter, a missing file) is
recorded as an event once, without retrying. It is idempotent: the run is found again by its
``shears.job_id`` tag, so a retried or duplicated message completes the same run instead of
creating a second one (two copies running at the very same moment could still make two).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from celery import Task, shared_task

from shears.db import repository as repo
from shears.jobspec import MlflowRequest
from shears.settings import Settings, get_settings
from shears.storage import storage_from_settings
from worker.db import sessions
from worker.notify import JobEvent, listener

if TYPE_CHECKING:  # mlflow is imported only by the task, so the job worker's start stays light
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = structlog.get_logger("shears.mlflow")

# Under shears.notify.*: routed to the notify queue with the other listeners' work.
MLFLOW_LOG_TASK = "shears.notify.mlflow_log_job"

_RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
_JOB_TAG = "shears.job_id"
_LATER = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# MLflow's limits on one log_batch call and on one param value.
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000
_PARAM_CHARS = 6000
_REASON_CHARS = 1000  # of an error quoted in a job event (MLflow's can carry a response body)


_FINAL_EVENTS = {"job.succeeded", "job.failed", "job.cancelled"}


@listener("mlflow")
def on_job_event(event: JobEvent) -> None:
    """Enqueue the MLflow run of a job whose final state just committed.

    The run is logged by a task of its own rather than here, so that its retries (minutes to
    hours while a tracking server is down) follow their own schedule without holding up the
    other listeners of the event.
    """
    settings = get_settings()
    if settings.mlflow_tracking_uri is None or event.type not in _FINAL_EVENTS:
        return
    log_job.apply_async(args=[event.job_id], queue=settings.notify_queue)


@shared_task(name=MLFLOW_LOG_TASK, bind=True)  # type: ignore[untyped-decorator]
def log_job(self: Task, job_id: str) -> None:
    """Log ``job_id`` as an MLflow run; retry later while the tracking server is unreachable."""
    settings = get_settings()
    if settings.mlflow_tracking_uri is None:
        return
    structlog.contextvars.bind_contextvars(job_id=job_id)
    try:
        logged = log_run(job_id, settings)
    except Exception as exc:
        retries: int = self.request.retries
        if not unreachable(exc):
            log.exception("MLflow refused the run")
            reason = str(exc)[:_REASON_CHARS]
            _event(job_id, f"mlflow: could not log the run: {reason}", {"error": reason})
            return
        if retries >= settings.mlflow_max_retries:
            log.error("tracking server still unreachable; giving up", tries=retries + 1)
            _event(
                job_id,
                f"mlflow: tracking server unreachable after {retries + 1} tries, giving up",
                {"tries": retries + 1},
            )
            return
        delay = min(settings.mlflow_retry_seconds * 2**retries, settings.mlflow_retry_max_seconds)
        log.warning("tracking server unreachable", retry_in_s=delay, error=str(exc))
        _event(
            job_id,
            f"mlflow: tracking server unreachable, retrying in {delay:g}s",
            {"retry_in_s": delay, "try": retries + 1},
        )
        raise self.retry(exc=exc, countdown=delay, max_retries=settings.mlflow_max_retries) from exc
    finally:
        structlog.contextvars.unbind_contextvars("job_id")
    if logged is not None:
        done = "was already logged" if logged.again else "logged"
        _event(job_id, f"mlflow: {done} run {logged.run_id}", logged.event_data())


@dataclass(frozen=True)
class Logged:
    """What a task logged: the run, and the registered model version if one was asked for."""

    run_id: str
    experiment_id: str
    model_name: str | None = None
    model_version: str | None = None
    again: bool = False  # an earlier task had logged it all: a duplicated or retried message

    def event_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"run_id": self.run_id, "experiment_id": self.experiment_id}
        if self.model_name is not None:
            data.update(registered_model=self.model_name, model_version=self.model_version)
        return data


@dataclass(frozen=True)
class _JobView:
    """The job as of its final commit, read in one transaction."""

    job_id: str
    tenant: str
    status: str
    name: str | None
    model_id: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    error_type: str | None
    error_message: str | None
    artifacts: dict[str, tuple[str, str]]  # kind -> (storage key, sha256)


def log_run(job_id: str, settings: Settings) -> Logged | None:
    """Log (or finish logging) the run of ``job_id``; None when the job is gone or not final."""
    job = _read_job(job_id)
    if job is None:
        log.info("job gone or not final; no MLflow run")
        return None
    client = _client(settings)
    experiment_id = _experiment_id(client, settings.mlflow_experiment)
    run = _existing_run(client, experiment_id, job_id)
    register_as = _register_as(job)
    if run is not None and _complete(client, run, job.status, register_as):
        log.info("MLflow run already logged", run_id=run.info.run_id)
        return Logged(run.info.run_id, experiment_id, again=True)  # a duplicate message
    if run is None:
        run = client.create_run(
            experiment_id,
            run_name=job.name or job.job_id,
            tags={_JOB_TAG: job.job_id, "shears.tenant": job.tenant},
        )
    run_id = run.info.run_id
    _log_data(client, run, job)
    _log_artifacts(client, run_id, job, settings)
    client.set_terminated(run_id, status=_RUN_STATUS[job.status])
    logged = Logged(run_id, experiment_id)
    if register_as is not None:
        version = _register(client, register_as, run)
        logged = Logged(run_id, experiment_id, register_as, version)
    log.info("MLflow run logged", run_id=run_id, model_version=logged.model_version)
    return logged


def _complete(client: MlflowClient, run: Run, status: str, register_as: str | None) -> bool:
    """Whether an earlier task finished this run: it is terminated last, registered after."""
    if run.info.status != _RUN_STATUS[status]:
        return False
    return register_as is None or bool(_versions(client, register_as, run.info.run_id))


def unreachable(exc: BaseException) -> bool:
    """True for errors that mean "try again later": no connection, a timeout, a 5xx or 429.

    Anything else (a refused parameter, a bad name) would fail the same way on every try.
    """
    import requests
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)
        ):
            return True
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        # A 5xx or 429 that outlasted MLflow's own retries arrives as a RetryError (above);
        # these codes are the server saying "later" in its own words.
        if isinstance(seen, MlflowException) and seen.error_code in _LATER:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``; lists and scalars are leaves, None is skipped."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}.")
        elif value is not None:
            yield name, value


def _client(settings: Settings) -> MlflowClient:
    # MLflow reads its HTTP retry policy only from the environment, and its default backs off
    # for minutes inside one call; the Celery retry is the policy here, so MLflow's own is
    # shortened to ride out a blip, unless the operator chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # noqa: TID251
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # noqa: TID251
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # noqa: TID251
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _read_job(job_id: str) -> _JobView | None:
    with sessions()() as session:
        job = repo.get_job_any_tenant(session, job_id)
        if job is None or job.status not in _RUN_STATUS:
            return None
        return _JobView(
            job_id=job.id,
            tenant=job.tenant,
            status=job.status,
            name=job.name,
            model_id=job.model_id,
            spec=dict(job.spec),
            metrics=dict(job.metrics or {}),
            error_type=job.error_type,
            error_message=job.error_message,
            artifacts={a.kind: (a.storage_key, a.sha256) for a in job.artifacts},
        )


def _register_as(job: _JobView) -> str | None:
    """The registered model to add a version to: only a job that produced a model has one."""
    if job.status != "succeeded" or "model" not in job.artifacts:
        return None
    return MlflowRequest.model_validate(job.spec.get("mlflow") or {}).register_as


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # another task created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _existing_run(client: MlflowClient, experiment_id: str, job_id: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{_JOB_TAG}` = '{job_id}'", max_results=1
    )
    return runs[0] if runs else None


def _log_data(client: MlflowClient, run: Run, job: _JobView) -> None:
    """Params, metrics and tags, skipping those a previous try already logged."""
    from mlflow.entities import Metric, Param, RunTag

    logged_params = run.data.params
    params = [
        Param(key, _param_value(value))
        for key, value in flatten(job.spec)
        if key not in logged_params
    ]
    metrics, text = [], {}
    now_ms = int(time.time() * 1000)
    for key, value in flatten(job.metrics):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if key not in run.data.metrics:
                metrics.append(Metric(key, float(value), now_ms, 0))
        else:
            text[f"shears.metrics.{key}"] = str(value)
    tags = {
        "shears.status": job.status,
        "shears.model_id": job.model_id,
        **({"shears.error_type": job.error_type} if job.error_type else {}),
        **({"shears.error_message": job.error_message} if job.error_message else {}),
        **text,
    }
    run_id = run.info.run_id
    for i in range(0, len(params), _BATCH_PARAMS):
        client.log_batch(run_id, params=params[i : i + _BATCH_PARAMS])
    for i in range(0, len(metrics), _BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + _BATCH_METRICS])
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_PARAM_CHARS]


def _log_artifacts(client: MlflowClient, run_id: str, job: _JobView, settings: Settings) -> None:
    # Same-named files overwrite, so a retried upload replaces a partial one. With object
    # storage the files come through the worker's read cache, linked into a scratch folder.
    storage = storage_from_settings(settings)
    with tempfile.TemporaryDirectory(prefix="shears-mlflow-") as scratch:
        if "model" in job.artifacts:
            model = storage.materialize(*job.artifacts["model"], Path(scratch))
            client.log_artifact(run_id, str(model), "model")
        if "report" in job.artifacts:
            report = storage.materialize(*job.artifacts["report"], Path(scratch))
            client.log_artifact(run_id, str(report))


def _versions(client: MlflowClient, name: str, run_id: str) -> list[str]:
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return [str(v.version) for v in found]


def _register(client: MlflowClient, name: str, run: Run) -> str:
    """The version of ``name`` made from this run's model, created once."""
    from mlflow.exceptions import MlflowException

    existing = _versions(client, name, run.info.run_id)
    if existing:
        return existing[0]
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(version.version)


def _event(job_id: str, message: str, data: dict[str, Any]) -> None:
    # The job's events are how a user learns about its run; failing to write one must not turn
    # into a retry storm or a lost run, so it is only logged.
    try:
        with sessions().begin() as session:
            if repo.get_job_any_tenant(session, job_id) is not None:
                repo.add_event(session, job_id, "done", message, {"mlflow": data})
    except Exception:
        log.warning("could not record the MLflow event", exc_info=True)
