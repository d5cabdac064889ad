"""Finished jobs logged to a real MLflow tracking server (``mlflow server`` on loopback, SQLite
backend) by the notify worker: uvicorn + job worker + notify worker as real processes."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from shears.settings import Settings
from tests.bodies import global_l1
from tests.conftest import free_port
from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.factories import export_resnet, save_npz
from tests.mlflow_server import MlflowServer
from tests.problems import assert_problem
from worker.celery_app import create_celery
from worker.mlflow_log import MLFLOW_LOG_TASK, unreachable

pytestmark = pytest.mark.e2e

TENANT, KEY = "acme", "acme-secret-key-0123456789"
EXPERIMENT = "shears-e2e"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_port())
    server.spawn()  # ready by the time the service is: `svc` waits for it
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def svc(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_server: MlflowServer,
) -> Iterator[Service]:
    service = start_service(
        request,
        tmp_path_factory,
        "embedded",
        SHEARS_API_KEYS=f"{TENANT}:{KEY}",
        SHEARS_MLFLOW_TRACKING_URI=mlflow_server.uri,
        SHEARS_MLFLOW_EXPERIMENT=EXPERIMENT,
        # A short retry schedule, so a server that comes back is noticed within seconds.
        SHEARS_MLFLOW_RETRY_SECONDS="1",
        SHEARS_MLFLOW_RETRY_MAX_SECONDS="2",
        SHEARS_MLFLOW_MAX_RETRIES="500",
    )
    try:
        mlflow_server.wait_ready()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def acme(svc: Service) -> Iterator[httpx.Client]:
    with svc.as_tenant(KEY) as client:
        yield client


@pytest.fixture(scope="module")
def mlflow(mlflow_server: MlflowServer) -> MlflowClient:
    mlflow_server.wait_ready()
    return MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


def upload(client: httpx.Client, path: Path, collection: str = "models") -> dict:
    with path.open("rb") as f:
        response = client.post(f"/v1/{collection}", files={"file": (path.name, f)})
    assert response.status_code == 201, response.text
    return response.json()


def run_job(svc: Service, client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return svc.wait_for_job(response.json()["id"], client=client)


def wait_for_event(
    svc: Service, client: httpx.Client, job_id: str, prefix: str, timeout: float = 120
) -> dict:
    """The first event of ``job_id`` whose message starts with ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
        for event in items:
            if event["message"].startswith(prefix):
                return event
        time.sleep(0.3)
    raise AssertionError(f"no event {prefix!r} on {job_id}: {items}\n{svc.logs('notify')}")


def logged_run(svc: Service, client: httpx.Client, mlflow: MlflowClient, job_id: str) -> Run:
    event = wait_for_event(svc, client, job_id, "mlflow: logged run ")
    run_id = event["message"].removeprefix("mlflow: logged run ")
    assert event["data"]["mlflow"]["run_id"] == run_id
    return mlflow.get_run(run_id)


def runs_of(mlflow: MlflowClient, job_id: str) -> list[Run]:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`shears.job_id` = '{job_id}'"
    )


def flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``{"a": {"b": 1}, "c": None}`` -> ``[("a.b", 1)]``."""
    items: list[tuple[str, object]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        elif value is not None:
            items.append((f"{prefix}{key}", value))
    return items


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_finished_job_is_an_mlflow_run_with_its_model_registered(
    svc: Service, acme: httpx.Client, mlflow: MlflowClient, resnet_pt2: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    data = save_npz(
        tmp_path / "eval.npz",
        inputs=rng.standard_normal((64, 1, 8, 8)).astype(np.float32),
        targets=rng.integers(0, 10, 64),
    )
    dataset = upload(acme, data, "datasets")
    model = upload(acme, resnet_pt2)
    body = {
        **global_l1(model["id"], sparsity=0.6),
        "name": "mlflow-e2e",
        "evaluation": {"dataset_id": dataset["id"], "top_k": 3},
        "mlflow": {"register_as": "resnet-pruned"},
    }
    job = run_job(svc, acme, body)
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["mlflow"] == {"register_as": "resnet-pruned"}

    run = logged_run(svc, acme, mlflow, job["id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mlflow-e2e"
    tags = run.data.tags
    assert tags["shears.job_id"] == job["id"]
    assert tags["shears.tenant"] == TENANT
    assert tags["shears.status"] == "succeeded"
    assert tags["shears.metrics.device"] == "cpu"

    # params: the stored spec, flattened
    params = run.data.params
    assert params["pruning.criterion"] == "l1"
    assert float(params["pruning.sparsity"]) == 0.6
    assert params["pruning.scope"] == "global"
    assert params["evaluation.dataset_id"] == dataset["id"]
    assert params["evaluation.top_k"] == "3"
    assert params["mlflow.register_as"] == "resnet-pruned"
    assert params == {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in flatten(job["spec"])
    }

    # metrics: every numeric metric of the job, flattened, and nothing else
    expected = {
        key: float(value)
        for key, value in flatten(job["metrics"])
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    assert "eval_after_pruning.accuracy" in expected
    assert "eval_before.top3_accuracy" in expected
    assert run.data.metrics == pytest.approx(expected)

    # artifacts: the pruned model and the report, byte for byte what Shears serves
    shears = {a["kind"]: a for a in job["artifacts"]}
    model_dir = Path(mlflow.download_artifacts(run.info.run_id, "model", str(tmp_path)))
    (model_file,) = model_dir.iterdir()
    assert model_file.suffix == ".pt2"
    assert sha256(model_file) == shears["model"]["sha256"]
    report = Path(mlflow.download_artifacts(run.info.run_id, "report.json", str(tmp_path)))
    assert sha256(report) == shears["report"]["sha256"]

    # register_as: one version of the registered model, made from this run's model
    (version,) = mlflow.search_model_versions("name = 'resnet-pruned'")
    assert version.run_id == run.info.run_id
    assert version.source == f"{run.info.artifact_uri}/model"
    event = wait_for_event(svc, acme, job["id"], "mlflow: logged run ")
    assert event["data"]["mlflow"]["model_version"] == version.version

    # A duplicated message logs nothing twice: the run is found again by its job id tag.
    settings = Settings(
        data_dir=svc.data_dir,
        broker_url=svc.env.get("SHEARS_BROKER_URL"),
        notify_queue=svc.env["SHEARS_NOTIFY_QUEUE"],
    )
    create_celery(settings).send_task(MLFLOW_LOG_TASK, args=[job["id"]])
    again = wait_for_event(svc, acme, job["id"], "mlflow: was already logged run ")
    assert again["data"]["mlflow"]["run_id"] == run.info.run_id
    assert [r.info.run_id for r in runs_of(mlflow, job["id"])] == [run.info.run_id]
    assert len(mlflow.search_model_versions("name = 'resnet-pruned'")) == 1


def test_a_failed_job_is_a_failed_run_that_says_why(
    svc: Service, acme: httpx.Client, mlflow: MlflowClient, tmp_path: Path
) -> None:
    broken = upload(acme, export_resnet(tmp_path / "broken.pt2", seed=1))
    # Damage the stored file behind the service's back: the worker's gate refuses it.
    stored = next(svc.storage_dir.rglob(f"{broken['id']}.pt2"))
    stored.write_bytes(b"PK\x03\x04 not really a zip any more")
    job = run_job(svc, acme, {**global_l1(broken["id"]), "mlflow": {"register_as": "never"}})
    assert job["status"] == "failed"

    run = logged_run(svc, acme, mlflow, job["id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["shears.status"] == "failed"
    assert run.data.tags["shears.error_type"] == job["error"]["type"]
    assert run.data.tags["shears.error_message"] == job["error"]["message"]
    assert run.data.params["pruning.criterion"] == "l1"
    assert [a.path for a in mlflow.list_artifacts(run.info.run_id)] == []
    assert mlflow.search_model_versions("name = 'never'") == []


def test_a_tracking_server_that_is_down_never_fails_the_job_and_gets_the_run_later(
    svc: Service,
    acme: httpx.Client,
    mlflow: MlflowClient,
    mlflow_server: MlflowServer,
    resnet_pt2: Path,
) -> None:
    mlflow_server.stop()
    try:
        job = run_job(svc, acme, global_l1(upload(acme, resnet_pt2)["id"]))
        assert job["status"] == "succeeded", job["error"]
        retrying = wait_for_event(
            svc, acme, job["id"], "mlflow: tracking server unreachable, retrying in "
        )
        assert retrying["data"]["mlflow"]["retry_in_s"] > 0
    finally:
        mlflow_server.start()  # same port, same store: the server came back

    run = logged_run(svc, acme, mlflow, job["id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["shears.job_id"] == job["id"]
    assert [r.info.run_id for r in runs_of(mlflow, job["id"])] == [run.info.run_id]
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} == {"model", "report.json"}
    # The job itself was never touched: still succeeded, same artifacts.
    assert acme.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"register_as": "../other tenant's model"}, "register_as"),
        ({"register_as": ""}, "register_as"),
        ({"register_as": "ok", "stage": "Production"}, "stage"),
    ],
)
def test_a_bad_mlflow_section_is_refused_before_anything_is_stored(
    acme: httpx.Client, resnet_pt2: Path, section: dict, field: str
) -> None:
    model = upload(acme, resnet_pt2)
    before = acme.get("/v1/jobs").json()["items"]
    response = acme.post("/v1/jobs", json={**global_l1(model["id"]), "mlflow": section})
    body = assert_problem(response, 422, "validation-error")
    assert field in response.text
    assert body["errors"]
    assert acme.get("/v1/jobs").json()["items"] == before


def test_only_errors_that_may_pass_are_retried(
    mlflow: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    nobody = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MlflowException) as down:
        nobody.search_experiments()
    assert unreachable(down.value)
    with pytest.raises(MlflowException) as missing:  # the real server answering "no such run"
        mlflow.get_run("0" * 32)
    assert not unreachable(missing.value)
    assert unreachable(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
