"""Past one machine, as real processes on loopback: a moto S3 server for storage, the shared
PostgreSQL and Redis, an API, the sweeper and several workers on a CPU and a GPU queue (the "GPU"
worker is an ordinary process on this CPU machine consuming the GPU queue: what is tested is the
routing, not CUDA).

Jobs that fine-tune go to the GPU queue while a GPU worker's heartbeat is fresh and to the CPU
queue once it has gone; every byte of models, datasets, checkpoints and artifacts lands in the
bucket and nothing of them under SHEARS_DATA_DIR; two workers on one queue share its jobs; a worker
killed mid-job is taken over by the other, which resumes from the checkpoint in the bucket;
downloads stream from S3 with Range, or redirect to a presigned URL."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from examples.s3server import S3Server
from shears.cli import api_command
from shears.db.tables import WorkerHeartbeat
from tests.conftest import free_port
from tests.e2e.service import Service, service_env
from tests.e2e.test_finetune import events, prune_90, upload_dataset
from tests.e2e.test_walkthrough import submit, upload
from tests.factories import Digits, make_digits
from tests.s3 import s3_server

pytestmark = pytest.mark.e2e
__all__ = ["s3_server"]


@dataclass
class Cluster:
    svc: Service
    s3: S3Server
    bucket: str
    cpu_queue: str
    gpu_queue: str
    cache_dir: Path

    def node(self, name: str) -> str:
        """The Celery node name of worker process ``name`` (``shears-<pid>@<host>``)."""
        import socket

        return f"shears-{self.svc.procs[name].pid}@{socket.gethostname()}"

    def start_worker(self, name: str, queue: str) -> str:
        self.svc.start_worker(name, queue)
        node = self.node(name)
        engine = create_engine(self.svc.database_url)
        try:
            deadline = time.monotonic() + 90
            while True:  # announced: the API may route to it from now on
                with engine.connect() as conn:
                    rows = conn.execute(
                        select(WorkerHeartbeat.queue).where(WorkerHeartbeat.worker == node)
                    ).all()
                if [r.queue for r in rows] == [queue]:
                    return node
                assert self.svc.procs[name].poll() is None, self.svc.logs(name)
                assert time.monotonic() < deadline, self.svc.logs(name)
                time.sleep(0.2)
        finally:
            engine.dispose()

    def objects(self, prefix: str = "") -> dict[str, int]:
        client = self.s3.client()
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"shears/{prefix}"
        ):
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return found

    def object_bytes(self, key: str) -> bytes:
        body = self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"]
        return body.read()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return make_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    redis_server: str,
) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("scale-data")
    cache_dir = tmp_path_factory.mktemp("scale-cache")
    bucket = s3_server.new_bucket()
    port = free_port()
    env = service_env(
        data_dir,
        port,
        request.getfixturevalue("make_pg_database")(),
        redis_server,
        **s3_server.env(bucket),
        SHEARS_CACHE_DIR=str(cache_dir),
        SHEARS_JOB_LEASE_SECONDS="3",
        SHEARS_REQUEUE_AFTER_SECONDS="2",
        SHEARS_CHECKPOINT_EVERY_STEPS="20",
    )
    env["SHEARS_GPU_QUEUE"] = env["SHEARS_QUEUE"] + "-gpu"
    svc = Service(data_dir=data_dir, env=env, port=port, with_worker=False)
    cluster = Cluster(
        svc, s3_server, bucket, env["SHEARS_QUEUE"], env["SHEARS_GPU_QUEUE"], cache_dir
    )
    try:
        svc.start()
        cluster.start_worker("cpu-1", cluster.cpu_queue)
        cluster.start_worker("gpu-1", cluster.gpu_queue)
        yield cluster
    finally:
        svc.stop()


def fine_tune(model_id: str, dataset_id: str, steps: int) -> dict:
    return prune_90(model_id, fine_tune={"dataset_id": dataset_id, "steps": steps, "batch_size": 8})


def test_jobs_run_on_their_queue_and_every_byte_lands_in_the_bucket(
    cluster: Cluster, digits: Digits
) -> None:
    svc = cluster.svc
    model = upload(svc, digits.model_path)
    train = upload_dataset(svc, digits.train)
    pruned = svc.wait_for_job(submit(svc, prune_90(model["id"]))["id"])
    tuned = svc.wait_for_job(submit(svc, fine_tune(model["id"], train["id"], 30))["id"])
    assert pruned["status"] == "succeeded", pruned["error"]
    assert tuned["status"] == "succeeded", tuned["error"]
    assert (pruned["queue"], pruned["worker"]) == (cluster.cpu_queue, cluster.node("cpu-1"))
    assert (tuned["queue"], tuned["worker"]) == (cluster.gpu_queue, cluster.node("gpu-1"))

    stored = cluster.objects()
    expected = {
        f"shears/models/default/{model['id']}.pt2": model["size_bytes"],
        f"shears/datasets/default/{train['id']}.npz": train["size_bytes"],
    }
    for job in (pruned, tuned):
        expected[f"shears/models/default/{job['result_model_id']}.pt2"] = None
        for artifact in job["artifacts"]:
            key = f"shears/artifacts/default/{job['id']}/{artifact['kind']}."
            (match,) = [k for k in stored if k.startswith(key)]
            expected[match] = artifact["size_bytes"]
            assert hashlib.sha256(cluster.object_bytes(match)).hexdigest() == artifact["sha256"]
    assert set(stored) == set(expected)  # and no checkpoint left behind
    for key, size in expected.items():
        assert size is None or stored[key] == size, key
    assert (
        hashlib.sha256(cluster.object_bytes(f"shears/models/default/{model['id']}.pt2")).hexdigest()
        == model["sha256"]
    )

    # Nothing of a model, dataset, checkpoint or artifact under the data dir: only logs.
    left = [p for p in svc.data_dir.rglob("*") if p.is_file() and p.suffix != ".log"]
    assert left == []
    # The workers read through their cache, keyed by content.
    cached = {p.name for p in (cluster.cache_dir / "objects").rglob("*") if p.is_file()}
    assert {model["sha256"], train["sha256"]} <= cached


def test_downloads_stream_ranges_from_s3_and_presign_redirects(
    cluster: Cluster, digits: Digits
) -> None:
    svc = cluster.svc
    model = upload(svc, digits.model_path)
    job = svc.wait_for_job(submit(svc, prune_90(model["id"]))["id"])
    (artifact,) = [a for a in job["artifacts"] if a["kind"] == "model"]
    whole = svc.client.get(artifact["download_url"])
    assert whole.status_code == 200
    assert hashlib.sha256(whole.content).hexdigest() == artifact["sha256"]
    assert whole.headers["etag"] == f'"{artifact["sha256"]}"'
    part = svc.client.get(artifact["download_url"], headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.content == whole.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(whole.content)}"
    tail = svc.client.get(artifact["download_url"], headers={"Range": "bytes=-10"})
    assert tail.content == whole.content[-10:]
    beyond = svc.client.get(artifact["download_url"], headers={"Range": "bytes=99999999-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(whole.content)}"

    # A second API on the same service, handing out presigned URLs instead.
    port = free_port()
    svc.env["SHEARS_S3_PRESIGN"] = "true"
    try:
        svc._spawn("api-presign", api_command("127.0.0.1", port))
    finally:
        del svc.env["SHEARS_S3_PRESIGN"]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, svc.logs("api-presign")
            time.sleep(0.3)
        redirect = client.get(artifact["download_url"])
        assert redirect.status_code == 307
        location = redirect.headers["location"]
        assert location.startswith(cluster.s3.endpoint_url)
        direct = httpx.get(location, headers={"Range": "bytes=0-99"})
        assert direct.status_code == 206
        assert direct.content == whole.content[:100]
    svc.stop_process("api-presign")


def test_two_workers_on_one_queue_share_its_jobs(cluster: Cluster, digits: Digits) -> None:
    svc = cluster.svc
    second = cluster.start_worker("cpu-2", cluster.cpu_queue)
    model = upload(svc, digits.model_path)
    ids = [submit(svc, prune_90(model["id"]))["id"] for _ in range(6)]
    jobs = [svc.wait_for_job(job_id) for job_id in ids]
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert {j["queue"] for j in jobs} == {cluster.cpu_queue}
    # One job at a time per worker (prefetch 1, acks late): both must have taken some.
    assert {j["worker"] for j in jobs} == {cluster.node("cpu-1"), second}


def test_without_a_gpu_worker_fine_tuning_runs_on_the_cpu_queue_and_survives_a_kill(
    cluster: Cluster, digits: Digits
) -> None:
    svc = cluster.svc
    svc.stop_process("gpu-1")  # a clean stop withdraws its heartbeat at once
    model = upload(svc, digits.model_path)
    train = upload_dataset(svc, digits.train)
    job_id = submit(svc, fine_tune(model["id"], train["id"], 400))["id"]
    checkpoint = f"checkpoints/default/{job_id}/"
    deadline = time.monotonic() + 120
    while not cluster.objects(checkpoint):  # the running worker has mirrored a checkpoint
        assert time.monotonic() < deadline, svc.logs("cpu-1") + svc.logs("cpu-2")
        time.sleep(0.1)
    running = svc.client.get(f"/v1/jobs/{job_id}").json()
    assert running["queue"] == cluster.cpu_queue
    victim = next(n for n in ("cpu-1", "cpu-2") if cluster.node(n) == running["worker"])
    survivor = cluster.node("cpu-2" if victim == "cpu-1" else "cpu-1")
    svc.stop_process(victim, signal.SIGKILL)  # the main process and its pool child

    job = svc.wait_for_job(job_id, timeout=240)
    assert job["status"] == "succeeded", (job["error"], svc.logs("sweeper"))
    assert job["attempts"] == 2
    assert job["worker"] == survivor
    assert job["queue"] == cluster.cpu_queue
    messages = [e["message"] for e in events(svc, job_id)]
    assert any(m.startswith("resumed from the checkpoint at step") for m in messages), messages
    assert cluster.objects(checkpoint) == {}
