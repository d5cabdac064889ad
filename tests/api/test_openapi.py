"""The published OpenAPI document (``api.openapi``): what the rules declare, and that it follows
the service's auth as it is now. The whole document against the running service is
tests/e2e/test_openapi_conformance.py (schemathesis)."""

from __future__ import annotations

from typing import Any

from api.schemas import JobCreate
from shears.auth import create_key
from tests.api.conftest import Api, MakeApi

# Not problem documents, and declared so: readiness's own JSON, Starlette's 416 for a Range.
OWN_BODIES = {("/readyz", "503"), ("/v1/artifacts/{artifact_id}/download", "416")}
PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }


def test_every_error_is_a_declared_problem_document(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    ops = operations(schema)
    for (method, path), op in ops.items():
        responses = op["responses"]
        for status, response in responses.items():
            if status.startswith(("4", "5")) and (path, status) not in OWN_BODIES:
                assert "application/problem+json" in response["content"], (method, path, status)
        if path.startswith("/v1/"):
            assert responses["401"]["content"] == PROBLEM
            assert responses["503"]["content"] == PROBLEM
        if "{" in path:
            assert responses["404"]["content"] == PROBLEM, (method, path)
    # FastAPI's own validation error schema is gone: a 422 is a problem with its `errors`.
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "errors" in schema["components"]["schemas"]["Problem"]["properties"]
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/models")):
        assert ops[method, path]["responses"]["400"]["content"] == PROBLEM
    assert {"413", "415", "422", "507"} <= set(ops["POST", "/v1/datasets"]["responses"])
    assert ops["GET", "/readyz"]["responses"]["503"]["content"]["application/json"]


def test_the_events_route_and_the_download_declare_their_forms(api: Api) -> None:
    ops = operations(api.client.get("/openapi.json").json())
    events = ops["GET", "/v1/jobs/{job_id}/events"]
    assert set(events["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"204", "400", "404"} <= set(events["responses"])
    # An optional header or query parameter is a string when sent, never null.
    params = {p["name"]: p["schema"] for p in events["parameters"]}
    for name in ("Last-Event-ID", "cursor"):
        assert params[name]["type"] == "string", name
        assert params[name]["pattern"] == "^[0-9]{1,18}$", name
        assert "anyOf" not in params[name], name
    download = ops["GET", "/v1/artifacts/{artifact_id}/download"]["responses"]
    assert "application/octet-stream" in download["200"]["content"]
    assert "multipart/byteranges" in download["206"]["content"]
    assert download["416"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    assert download["416"]["headers"]["Content-Range"]["required"] is True


def test_the_job_examples_are_valid_requests(api: Api) -> None:
    ops = operations(api.client.get("/openapi.json").json())
    examples = ops["POST", "/v1/jobs"]["requestBody"]["content"]["application/json"]["examples"]
    assert len(examples) >= 3
    for example in examples.values():
        JobCreate.model_validate(example["value"])  # raises if the document shows a bad one


def security(api: Api) -> set[str]:
    ops = operations(api.client.get("/openapi.json").json())
    return {str(op.get("security")) for (_, path), op in ops.items() if path.startswith("/v1")}


def test_auth_is_optional_while_open_and_required_once_a_key_exists(make_api: MakeApi) -> None:
    assert security(make_api()) == {"[{'HTTPBearer': []}, {}]"}  # open: a key, or nothing
    assert security(make_api(api_keys="acme:shk_0123456789abcdef")) == {"[{'HTTPBearer': []}]"}
    created = make_api()  # a key made with `shears keys create` counts as well
    with created.sessions.begin() as session:
        create_key(session, "acme")
    assert security(created) == {"[{'HTTPBearer': []}]"}


def test_a_405_allows_every_method_of_the_path(api: Api) -> None:
    answer = api.client.put("/v1/jobs/job_x")
    assert answer.status_code == 405
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["allow"] == "GET, DELETE"  # Starlette alone would name one route's
