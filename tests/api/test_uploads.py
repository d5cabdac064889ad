"""Uploads that are refused get a clear 4xx problem and leave nothing behind (moved here from the
e2e tier: the gate runs in the API process, no worker needed)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.api.conftest import Api, upload
from tests.factories import Canary, malicious_pickle, replace_member, resnet_module
from tests.problems import assert_problem


def post_file(api: Api, content: bytes, filename: str = "model.pt2", collection: str = "models"):
    return api.client.post(f"/v1/{collection}", files={"file": (filename, io.BytesIO(content))})


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_crafted_pt2_is_refused_and_runs_nothing(
    api: Api, resnet_pt2: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    crafted = replace_member(
        resnet_pt2, tmp_path / "crafted.pt2", "sample_inputs/model.pt", malicious_pickle(canary)
    )
    before = api.stored_files()
    body = assert_problem(post_file(api, crafted.read_bytes()), 422, "unsafe-archive")
    assert "sample_inputs" in body["detail"]
    assert not canary.exists()
    assert api.stored_files() == before
    assert api.client.get("/v1/models", params={"limit": 200}).status_code == 200


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_save_module", "torchscript", "garbage"])
def test_formats_other_than_torch_export_get_415_with_a_hint(
    api: Api, tmp_path: Path, kind: str
) -> None:
    canary = tmp_path / "canary"
    if kind == "raw_pickle":
        content = malicious_pickle(canary)
    elif kind == "torch_save_module":
        buffer = io.BytesIO()
        torch.save(resnet_module(), buffer)
        content = buffer.getvalue()
    elif kind == "torchscript":
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(resnet_module()), buffer)
        content = buffer.getvalue()
    else:
        content = b"\x00\x01 definitely not a model" * 10
    before = api.stored_files()
    body = assert_problem(post_file(api, content), 415, "unsupported-format")
    assert "torch.export" in body["detail"]
    assert not canary.exists()
    assert api.stored_files() == before


def test_upload_limits_and_form_errors(api: Api) -> None:
    before = api.stored_files()
    too_big = b"\0" * (4 * 1024 * 1024 + 1)
    assert_problem(post_file(api, too_big), 413, "payload-too-large")
    body = assert_problem(
        api.client.post("/v1/models", files={"other": ("x", b"abc")}), 422, "validation-error"
    )
    assert body["errors"][0]["loc"] == ["body", "file"]
    assert_problem(
        api.client.post("/v1/models", content=b"{}", headers={"content-type": "application/json"}),
        415,
        "unsupported-media-type",
    )
    assert api.stored_files() == before


def test_bad_datasets_get_4xx_and_leave_nothing(api: Api, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    before = api.stored_files()

    def post(content: bytes):
        return post_file(api, content, "data.npz", "datasets")

    evil = npz_bytes(
        inputs=np.zeros((1, 2), np.float32), targets=np.array([Canary(canary)], dtype=object)
    )
    assert "object" in assert_problem(post(evil), 422, "invalid-dataset")["detail"]
    assert not canary.exists()
    nan = npz_bytes(inputs=np.array([[np.nan]], np.float32))
    assert "NaN" in assert_problem(post(nan), 422, "invalid-dataset")["detail"]
    uneven = npz_bytes(inputs=np.zeros((3, 2), np.float32), targets=np.zeros(4, np.int64))
    assert "samples" in assert_problem(post(uneven), 422, "invalid-dataset")["detail"]
    # Binary content of another format (a pickle) is a 415; text is a text dataset now.
    assert_problem(post(pickle.dumps([1, 2, 3])), 415, "unsupported-format")
    big = npz_bytes(inputs=np.zeros((5 * 1024 * 1024 // 4 + 1,), np.float32))  # > 4 MiB limit
    assert_problem(post(big), 413, "payload-too-large")
    assert api.stored_files() == before


def test_a_commit_that_fails_leaves_no_file(api: Api, resnet_pt2: Path) -> None:
    before = api.stored_files()
    sessions = api.app.state.sessions

    class Failing:  # a session factory whose sessions cannot commit
        def __call__(self):
            session = sessions()
            session.commit = _raise  # type: ignore[method-assign]
            return session

    api.app.state.sessions = Failing()
    try:
        client = TestClient(api.app, raise_server_exceptions=False)  # no lifespan: not `with`
        with resnet_pt2.open("rb") as f:
            response = client.post("/v1/models", files={"file": ("r.pt2", f)})
    finally:
        api.app.state.sessions = sessions
    assert_problem(response, 500, "internal-error")
    assert api.stored_files() == before


def _raise() -> None:
    raise RuntimeError("commit failed")


def test_models_and_datasets_read_and_delete(api: Api, resnet_pt2: Path, tmp_path: Path) -> None:
    model = upload(api.client, resnet_pt2)
    assert api.client.get(f"/v1/models/{model['id']}").json() == model
    data = tmp_path / "d.npz"
    data.write_bytes(npz_bytes(inputs=np.zeros((3, 1, 8, 8), np.float32), targets=np.arange(3)))
    dataset = upload(api.client, data, "datasets")
    assert (dataset["format"], dataset["num_samples"], dataset["has_targets"]) == ("npz", 3, True)
    assert [a["name"] for a in dataset["arrays"]] == ["inputs", "targets"]
    files = api.stored_files()
    for collection, row in (("models", model), ("datasets", dataset)):
        assert api.client.delete(f"/v1/{collection}/{row['id']}").status_code == 204
        assert_problem(api.client.get(f"/v1/{collection}/{row['id']}"), 404, "not-found")
        assert_problem(api.client.delete(f"/v1/{collection}/{row['id']}"), 404, "not-found")
    assert len(api.stored_files()) == len(files) - 2
