"""``pruning.target``: what ``POST /v1/jobs`` refuses before anything is queued, and what it
stores (the API runs in-process; no worker is needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.api.conftest import Api, upload
from tests.factories import save_npz
from tests.problems import assert_problem

CHANNEL = {"criterion": "l1", "granularity": "channel", "target": {"macs": 0.5}}


@pytest.fixture(scope="module")
def model(api: Api, resnet_pt2: Path) -> dict:
    return upload(api.client, resnet_pt2)


@pytest.fixture(scope="module")
def data(api: Api, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("search-data")
    x = np.zeros((8, 1, 8, 8), np.float32)
    labelled = save_npz(root / "xy.npz", inputs=x, targets=np.zeros(8, np.int64))
    return {
        "labelled": upload(api.client, labelled, "datasets")["id"],
        "unlabelled": upload(api.client, save_npz(root / "x.npz", inputs=x), "datasets")["id"],
    }


def job_ids(api: Api) -> list[str]:
    return [j["id"] for j in api.client.get("/v1/jobs", params={"limit": 200}).json()["items"]]


def post(api: Api, body: dict):
    return api.client.post("/v1/jobs", json=body)


def with_eval(model: dict, data: dict, pruning: dict, **extra: object) -> dict:
    return {
        "model_id": model["id"],
        "pruning": pruning,
        "evaluation": {"dataset_id": data["labelled"]},
        **extra,
    }


@pytest.mark.parametrize(
    ("pruning", "loc", "words"),
    [
        ({**CHANNEL, "sparsity": 0.5}, ["body", "pruning"], "not both"),
        ({**CHANNEL, "target": {"flops": 0.5}}, ["body", "pruning", "target", "flops"], "Extra"),
        ({**CHANNEL, "target": {}}, ["body", "pruning", "target"], "exactly one"),
        (
            {**CHANNEL, "target": {"macs": 0.5, "params": 0.5}},
            ["body", "pruning", "target"],
            "exactly one",
        ),
        ({**CHANNEL, "target": {"macs": 1.5}}, ["body", "pruning", "target", "macs"], "1"),
        ({**CHANNEL, "scope": "global"}, ["body", "pruning"], "scope"),
        ({**CHANNEL, "search": {"grid": [0.5, 0.2]}}, ["body", "pruning", "search"], "increasing"),
        (
            {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5, "search": {}},
            ["body", "pruning"],
            "target",
        ),
    ],
)
def test_malformed_targets_are_422_at_their_field(
    api: Api, model: dict, data: dict, pruning: dict, loc: list, words: str
) -> None:
    before = job_ids(api)
    body = assert_problem(post(api, with_eval(model, data, pruning)), 422, "validation-error")
    assert body["errors"][0]["loc"] == loc, body
    assert words in body["detail"], body
    assert job_ids(api) == before


def test_a_target_the_granularity_cannot_reach_is_422(api: Api, model: dict, data: dict) -> None:
    before = job_ids(api)
    unstructured = {"criterion": "l1", "granularity": "unstructured", "target": {"macs": 0.5}}
    body = assert_problem(post(api, with_eval(model, data, unstructured)), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["body", "pruning", "target"]
    assert "unstructured" in body["detail"]
    assert "channel" in body["detail"]
    # n:m and block zeros leave the MACs (and so the latency) of dense kernels as they were.
    for granularity in ("n:m", "block"):
        for kind in ("macs", "latency"):
            zeros = {"criterion": "l1", "granularity": granularity, "target": {kind: 0.5}}
            body = assert_problem(post(api, with_eval(model, data, zeros)), 422, "validation-error")
            assert body["errors"][0]["loc"] == ["body", "pruning", "target"]
            assert f"'{granularity}'" in body["detail"]
            assert "MACs of the dense kernels" in body["detail"]
    language = {**CHANNEL, "target": {"max_perplexity_increase": 0.05}}
    body = assert_problem(post(api, with_eval(model, data, language)), 422, "validation-error")
    assert "pt2" in body["detail"]
    assert job_ids(api) == before


def test_a_target_needs_data_to_search_on(api: Api, model: dict, data: dict) -> None:
    before = job_ids(api)
    bare = {"model_id": model["id"], "pruning": CHANNEL}
    body = assert_problem(post(api, bare), 422, "validation-error")
    assert "search" in body["detail"]
    drop = {**CHANNEL, "target": {"max_accuracy_drop": 0.01}}
    searched = {**drop, "search": {"dataset_id": data["labelled"]}}
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": searched}), 422, "validation-error"
    )
    assert body["errors"][0]["loc"] == ["body", "evaluation"]
    unlabelled = {**CHANNEL, "search": {"dataset_id": data["unlabelled"]}}
    body = assert_problem(post(api, with_eval(model, data, unlabelled)), 422, "validation-error")
    assert "targets" in body["detail"]
    missing = {**CHANNEL, "search": {"dataset_id": "dst_nope"}}
    assert_problem(post(api, with_eval(model, data, missing)), 404, "not-found")
    only = {"model_id": model["id"], "pruning": {**GOOD_SPARSITY}, "sensitivity_only": True}
    body = assert_problem(post(api, only), 422, "validation-error")
    assert "target" in body["detail"]
    assert job_ids(api) == before


GOOD_SPARSITY = {"criterion": "l1", "granularity": "channel", "sparsity": 0.5}


@pytest.mark.parametrize(
    ("granularity", "shape", "default", "given"),
    [("n:m", "n_m", [2, 4], [4, 8]), ("block", "block", [1, 4], [2, 2])],
)
def test_weight_targets_are_accepted_and_stored(
    api: Api, model: dict, data: dict, granularity: str, shape: str, default: list, given: list
) -> None:
    """``params`` and ``max_accuracy_drop`` at ``n:m`` and ``block`` on a ``pt2`` model: the
    pattern or block shape is stored (its default where left out), the target's placeholder
    sparsity is not."""
    for target, chosen in (({"params": 0.6}, None), ({"max_accuracy_drop": 0.01}, given)):
        pruning = {"criterion": "l1", "granularity": granularity, "target": target}
        if chosen is not None:
            pruning[shape] = chosen
        response = post(api, with_eval(model, data, pruning, sensitivity_only=True))
        assert response.status_code == 202, response.text
        stored = response.json()["spec"]["pruning"]
        assert stored[shape] == (chosen or default)
        assert "sparsity" not in stored
        assert {k: v for k, v in stored["target"].items() if v is not None} == target
        job_id = response.json()["id"]
        assert api.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202


def test_a_grid_at_nm_is_422_at_its_field(api: Api, model: dict, data: dict) -> None:
    before = job_ids(api)
    pruning = {
        "criterion": "l1",
        "granularity": "n:m",
        "target": {"params": 0.6},
        "search": {"grid": [0.25, 0.5]},
    }
    body = assert_problem(post(api, with_eval(model, data, pruning)), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["body", "pruning", "search", "grid"], body
    assert "0.5" in body["detail"]
    assert job_ids(api) == before


def test_a_target_job_is_stored_as_asked(api: Api, model: dict, data: dict) -> None:
    pruning = {**CHANNEL, "search": {"dataset_id": data["labelled"], "grid": [0.25, 0.5]}}
    response = post(api, with_eval(model, data, pruning, sensitivity_only=True))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["pruning"]["target"]["macs"] == 0.5
    assert "sparsity" not in job["spec"]["pruning"]  # the target replaced it
    assert job["spec"]["pruning"]["search"] == {
        "dataset_id": data["labelled"],
        "grid": [0.25, 0.5],
        "num_samples": 512,
    }
    assert job["spec"]["sensitivity_only"] is True
    assert job["search"] is None  # nothing searched yet
    again = api.client.get(f"/v1/jobs/{job['id']}").json()
    assert again["spec"] == job["spec"]
    for name in ("sensitivity", "layer_sparsity", "accuracy"):
        assert_problem(api.client.get(f"/v1/jobs/{job['id']}/plots/{name}.svg"), 404, "not-found")
    assert_problem(api.client.get("/v1/jobs/job_nope/plots/sensitivity.svg"), 404, "not-found")


@pytest.fixture(scope="module")
def language(api: Api, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama checkpoint and a text dataset (text has no targets)."""
    from tests.hf_factories import archive_folder, save_checkpoint

    root = tmp_path_factory.mktemp("search-hf")
    _, folder = save_checkpoint("llama", root / "llama")
    text = root / "corpus.txt"
    text.write_text("one document\n\nanother one\n")
    return {
        "model": upload(api.client, archive_folder(folder, root / "llama.tar")),
        "text": upload(api.client, text, "datasets")["id"],
    }


@pytest.mark.parametrize(
    ("granularity", "target", "width"),
    [
        ("unstructured", {"params": 0.5}, None),
        ("unstructured", {"max_perplexity_increase": 0.05}, None),
        ("n:m", {"params": 0.5}, None),
        ("n:m", {"max_perplexity_increase": 0.05}, None),
        ("width", {"macs": 0.6}, None),  # every width kind searched
        ("width", {"params": 0.6}, {"heads": 0.5}),  # heads fixed, the others searched
        ("width", {"max_perplexity_increase": 0.1}, {"hidden": 0.0}),
        ("width", {"latency": 0.7}, None),  # through MACs, then timed on the worker's device
        ("width", {"latency": 0.7}, {"mlp": 0.25, "hidden": 0.0}),  # heads left to search
    ],
)
def test_language_model_targets_are_accepted(
    api: Api, language: dict, granularity: str, target: dict, width: dict | None
) -> None:
    """On an ``hf`` model at ``unstructured``, ``n:m`` and ``width``, with a text dataset (no
    targets) as the search data; the width kinds the user fixed are stored as given."""
    text = language["text"]
    pruning: dict = {
        "criterion": "magnitude",
        "granularity": granularity,
        "target": target,
        # n:m has one ratio (1 - n/m): a grid is refused there.
        "search": {"dataset_id": text, **({} if granularity == "n:m" else {"grid": [0.25, 0.5]})},
    }
    if width is not None:
        pruning["width"] = width
    body = {
        "model_id": language["model"]["id"],
        "pruning": pruning,
        "evaluation": {"dataset_id": text, "task": "perplexity"},
        "sensitivity_only": True,
    }
    response = post(api, body)
    assert response.status_code == 202, response.text
    job = response.json()
    stored = job["spec"]["pruning"]
    assert {k: v for k, v in stored["target"].items() if v is not None} == target
    assert stored["width"] == width
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


@pytest.mark.parametrize(
    ("pruning", "loc", "words"),
    [
        # Zeroed weights leave a dense kernel's MACs as they are.
        ({"target": {"macs": 0.5}}, ["body", "pruning", "target"], "granularity 'unstructured'"),
        (
            {"target": {"max_accuracy_drop": 0.01}},
            ["body", "pruning", "target"],
            "not available for 'hf'",
        ),
        (
            {"granularity": "n:m", "search": {"grid": [0.25, 0.5]}},
            ["body", "pruning", "search", "grid"],
            "leave 'grid' out",
        ),
        # Zeros (n:m patterns too) make no dense kernel faster: latency is reached at width.
        ({"target": {"latency": 0.5}}, ["body", "pruning", "target"], "zeroed weights"),
        (
            {"granularity": "n:m", "target": {"latency": 0.5}},
            ["body", "pruning", "target"],
            "granularity 'n:m'",
        ),
        # Every width kind fixed beside the target: nothing is left to search.
        (
            {
                "granularity": "width",
                "target": {"latency": 0.5},
                "width": {"mlp": 0.5, "heads": 0.0, "hidden": 0.25},
            },
            ["body", "pruning", "width"],
            "'pruning.width' fixes every width kind",
        ),
        (
            {
                "granularity": "width",
                "target": {"macs": 0.5},
                "width": {"mlp": 0.0, "heads": 0.0, "hidden": 0.0},
            },
            ["body", "pruning", "width"],
            "nothing left to search",
        ),
        (
            {"granularity": "depth", "criterion": "random", "target": {"params": 0.5}},
            ["body", "pruning", "target"],
            "granularity 'depth'",
        ),
    ],
)
def test_language_model_targets_that_cannot_be_searched_are_422(
    api: Api, language: dict, pruning: dict, loc: list, words: str
) -> None:
    before = job_ids(api)
    spec = {
        "criterion": "magnitude",
        "granularity": "unstructured",
        "target": {"max_perplexity_increase": 0.05},
        **pruning,
    }
    body = {
        "model_id": language["model"]["id"],
        "pruning": spec,
        "evaluation": {"dataset_id": language["text"], "task": "perplexity"},
    }
    problem = assert_problem(post(api, body), 422, "validation-error")
    assert problem["errors"][0]["loc"] == loc, problem
    assert words in problem["detail"], problem
    assert job_ids(api) == before
