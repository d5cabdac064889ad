"""The published OpenAPI document against the running service: schemathesis generates requests
from ``/openapi.json`` (examples, coverage, fuzzing and stateful phases, every check) and finds no
server error and no answer the document does not declare: status codes, content types, headers,
bodies, auth.

Path and body ids are real half of the time (a finished job, its artifact, its model, a dataset;
a queued job and what it uses for the DELETE routes), so the answers behind the 404s are checked
too: a job's body, its events as JSON and as a stream, a file download with generated ``Range``
headers, the 409 of a delete or a cancel.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.bodies import global_l1
from tests.e2e.conftest import start_service
from tests.e2e.service import Service
from tests.factories import save_npz

pytestmark = pytest.mark.e2e

# ~1,000 requests in about a minute on this machine (2 shared cores).
MAX_EXAMPLES = 8
SEED = 20261203

# Validity that no JSON Schema can state, narrowly per operation. positive_data_acceptance
# expects 2xx/3xx/401/403/404/409/429 for a schema-valid request; these operations also answer
# a schema-valid request with a declared 4xx, by design:
POSITIVE_ALSO = {
    # A cursor is opaque: only one this service handed out is valid; any other string is 400.
    ("GET", "/v1/jobs"): ["400"],
    ("GET", "/v1/models"): ["400"],
    ("GET", "/v1/datasets"): ["400"],
    ("GET", "/v1/webhooks"): ["400"],
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): ["400"],
    # A webhook URL is valid by its scheme and by where it resolves (private addresses are
    # refused against SSRF): 422 naming the field.
    ("POST", "/v1/webhooks"): ["422"],
    # A Range is satisfiable or not by the file's size, and "start before end" is no pattern:
    # 416, or Starlette's 400 (declared, plain text).
    ("GET", "/v1/artifacts/{artifact_id}/download"): ["400", "416"],
    # A file is valid by its content (a torch.export program, an npz of samples), which a
    # schema's `format: binary` cannot describe: arbitrary bytes are 415 or 422.
    ("POST", "/v1/models"): ["415", "422"],
    ("POST", "/v1/datasets"): ["415", "422"],
    # The spec's rules across fields (exactly one of epochs/steps, a criterion's own parameters)
    # and against the model's layers are checked past the schema: 422 naming the field.
    ("POST", "/v1/jobs"): ["422"],
}


# Real ids, half of the time, per operation: reads on the finished job and what it made, deletes
# on the queued job and what it uses (so that the reads keep finding theirs).
REAL_IDS = {
    ("GET", "/v1/jobs/{job_id}"): {"path.job_id": "job"},
    ("GET", "/v1/jobs/{job_id}/layers"): {"path.job_id": "job"},
    ("GET", "/v1/jobs/{job_id}/events"): {"path.job_id": "job"},
    ("POST", "/v1/jobs/{job_id}/cancel"): {"path.job_id": "job"},
    ("GET", "/v1/artifacts/{artifact_id}/download"): {"path.artifact_id": "artifact"},
    ("GET", "/v1/models/{model_id}"): {"path.model_id": "model"},
    ("GET", "/v1/datasets/{dataset_id}"): {"path.dataset_id": "dataset"},
    ("POST", "/v1/jobs"): {"body.model_id": "model"},
    ("DELETE", "/v1/jobs/{job_id}"): {"path.job_id": "queued_job"},
    ("DELETE", "/v1/models/{model_id}"): {"path.model_id": "queued_model"},
    ("DELETE", "/v1/datasets/{dataset_id}"): {"path.dataset_id": "queued_dataset"},
}


def config(ids: dict[str, list[str]]) -> str:
    """schemathesis.toml: a dictionary per real id, bound as above, and the expected statuses of
    POSITIVE_ALSO. (JSON strings and lists are TOML values.)"""
    q = json.dumps
    lines = []
    for name, values in ids.items():
        lines += [f"[dictionaries.{name}]", f"values = {q(values)}", ""]
    for method, path in sorted(set(REAL_IDS) | set(POSITIVE_ALSO)):
        lines += ["[[operations]]", f"include-name = {q(f'{method} {path}')}"]
        for key, name in REAL_IDS.get((method, path), {}).items():
            binding = f"{{ dictionary = {q(name)}, probability = 0.5 }}"
            lines.append(f"parameters.{q(key)} = {binding}")
        if (method, path) in POSITIVE_ALSO:
            allowed = ["2xx", "3xx", "401", "403", "404", "409", "429"]
            allowed += POSITIVE_ALSO[method, path]
            lines.append(f"checks.positive_data_acceptance.expected-statuses = {q(allowed)}")
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    resnet_pt2: Path,
) -> Iterator[tuple[Service, dict[str, list[str]]]]:
    """A service with a finished job (and its artifact, model, dataset), then no worker: the
    queued job stays queued, and jobs schemathesis submits never run (no CPU spent pruning)."""
    svc = start_service(request, tmp_path_factory, "embedded")
    try:
        client = svc.client
        model = client.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
        data = save_npz(
            tmp_path_factory.mktemp("data") / "d.npz",
            inputs=np.zeros((8, 1, 8, 8), np.float32),
            targets=np.zeros(8, np.int64),
        )
        dataset = client.post("/v1/datasets", files={"file": data.read_bytes()}).json()
        job = svc.wait_for_job(client.post("/v1/jobs", json=global_l1(model["id"])).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        svc.stop_process("worker", signal.SIGKILL)  # no worker from here: the next job stays queued
        other_model = client.post("/v1/models", files={"file": resnet_pt2.read_bytes()}).json()
        other_dataset = client.post("/v1/datasets", files={"file": data.read_bytes()}).json()
        body = global_l1(other_model["id"])
        body["fine_tune"] = {"dataset_id": other_dataset["id"], "epochs": 1}
        queued = client.post("/v1/jobs", json=body).json()
        assert queued["status"] == "queued", queued
        yield (
            svc,
            {
                "job": [job["id"]],
                "artifact": [a["id"] for a in job["artifacts"]],  # a program, weights, a report
                "model": [model["id"]],
                "dataset": [dataset["id"]],
                "queued_job": [queued["id"]],
                "queued_model": [other_model["id"]],
                "queued_dataset": [other_dataset["id"]],
            },
        )
    finally:
        svc.stop()


def schemathesis(svc: Service, ids: dict[str, list[str]], out: Path, *args: str) -> dict:
    """Run schemathesis (every check) on the live service; its JSON report, and its output in
    ``out``/schemathesis.txt for whoever reads a failure."""
    (out / "schemathesis.toml").write_text(config(ids))
    report = out / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(out / "schemathesis.toml"),
            "run",
            f"http://127.0.0.1:{svc.port}/openapi.json",
            *("--checks", "all", "--seed", str(SEED), "--workers", "1", "--no-color"),
            *("--report", "json", "--report-json-path", str(report)),
            *args,
        ],
        cwd=out,  # where schemathesis keeps its cache
        capture_output=True,
        text=True,
        timeout=600,
    )
    (out / "schemathesis.txt").write_text(result.stdout + result.stderr)
    outcome = json.loads(report.read_text())
    where = f"schemathesis output: {out / 'schemathesis.txt'}"
    assert outcome["failures"] == [], where
    assert outcome["errors"] == [], where
    assert result.returncode == 0, where
    return outcome


def test_the_service_answers_only_what_its_openapi_declares(
    live: tuple[Service, dict[str, list[str]]], tmp_path: Path
) -> None:
    svc, ids = live
    outcome = schemathesis(svc, ids, tmp_path, "--max-examples", str(MAX_EXAMPLES))
    # Every operation was reached, every phase ran, and the run was not trivially small.
    assert outcome["operations"]["tested"] == outcome["operations"]["total"] >= 18
    assert {name: p["status"] for name, p in outcome["phases"].items()} == dict.fromkeys(
        ("examples", "coverage", "fuzzing", "stateful"), "success"
    )
    assert outcome["test_cases"]["generated"] >= 500, outcome["test_cases"]


def test_the_event_stream_is_as_declared(
    live: tuple[Service, dict[str, list[str]]], tmp_path: Path
) -> None:
    """schemathesis sends no Accept of its own: the events route again, asking for the stream.
    Each event of a stream is checked against the declared event, its data against
    StreamEventOut or StreamProgressOut (the schema's contentSchema)."""
    svc, ids = live
    outcome = schemathesis(
        svc,
        ids,
        tmp_path,
        *("--include-name", "GET /v1/jobs/{job_id}/events"),
        *("--header", "Accept: text/event-stream", "--max-examples", "20"),
        *("--phases", "examples,coverage,fuzzing"),
    )
    assert outcome["operations"]["tested"] == 1
    assert outcome["test_cases"]["generated"] >= 20
