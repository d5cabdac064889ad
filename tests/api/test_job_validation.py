"""``POST /v1/jobs`` refuses what cannot work, before anything is queued, with a problem that
says where (moved here from the e2e tier: none of it needs a worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.api.conftest import Api, global_l1, upload
from tests.factories import save_npz
from tests.problems import assert_problem

GOOD = {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.5}


@pytest.fixture(scope="module")
def model(api: Api, resnet_pt2: Path) -> dict:
    return upload(api.client, resnet_pt2)


def job_ids(api: Api) -> list[str]:
    return [j["id"] for j in api.client.get("/v1/jobs", params={"limit": 200}).json()["items"]]


def post(api: Api, body: dict):
    return api.client.post("/v1/jobs", json=body)


def test_unknown_model_is_404(api: Api) -> None:
    body = assert_problem(post(api, {"model_id": "mdl_nope", "pruning": GOOD}), 404, "not-found")
    assert "mdl_nope" in body["detail"]


@pytest.mark.parametrize(
    ("pruning", "loc"),
    [
        ({**GOOD, "sparsity": 1.5}, ["body", "pruning", "sparsity"]),
        ({**GOOD, "criterion": "magic"}, ["body", "pruning", "criterion"]),
        ({**GOOD, "granularity": "diagonal"}, ["body", "pruning", "granularity"]),
        ({**GOOD, "surprise": 1}, ["body", "pruning", "surprise"]),
        ({**GOOD, "criterion": "lp"}, ["body", "pruning"]),
        ({**GOOD, "criterion": "bn_scale"}, ["body", "pruning"]),
        ({**GOOD, "granularity": "n:m", "n_m": [4, 2]}, ["body", "pruning"]),
        (
            {**GOOD, "schedule": {"kind": "iterative", "fine_tune_budget": "doubled"}},
            ["body", "pruning", "schedule", "iterative", "fine_tune_budget"],
        ),
    ],
)
def test_malformed_pruning_is_422_at_its_field(
    api: Api, model: dict, pruning: dict, loc: list
) -> None:
    before = job_ids(api)
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": pruning}), 422, "validation-error"
    )
    assert body["errors"][0]["loc"] == loc, body
    assert job_ids(api) == before


def test_a_spec_that_does_not_fit_the_models_layers_is_422(api: Api, model: dict) -> None:
    before = job_ids(api)
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": {**GOOD, "exclude": ["classifier"]}}),
        422,
        "validation-error",
    )
    assert "classifier" in body["detail"]
    assert "stage1.c1" in body["detail"]  # the layers there are, so the client can fix it
    assert body["errors"][0]["loc"] == ["body", "pruning"]
    capped = {**GOOD, "scope": "global", "sparsity": 0.9, "max_layer_sparsity": 0.5}
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": capped}), 422, "validation-error"
    )
    assert "max_layer_sparsity" in body["detail"]
    assert job_ids(api) == before


def test_data_aware_criteria_need_calibration(api: Api, model: dict) -> None:
    channel = {"criterion": "apoz", "granularity": "channel", "sparsity": 0.5}
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": channel}), 422, "validation-error"
    )
    assert "calibration" in body["detail"]


def test_malformed_json_is_a_problem(api: Api) -> None:
    malformed = api.client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code in (400, 422)
    assert malformed.headers["content-type"] == "application/problem+json"


def test_unknown_ids_and_cursors(api: Api) -> None:
    assert_problem(api.client.get("/v1/jobs/job_nope"), 404, "not-found")
    assert_problem(api.client.get("/v1/jobs/job_nope/layers"), 404, "not-found")
    assert_problem(api.client.get("/v1/jobs/job_nope/events"), 404, "not-found")
    assert_problem(api.client.post("/v1/jobs/job_nope/cancel"), 404, "not-found")
    assert_problem(api.client.delete("/v1/jobs/job_nope"), 404, "not-found")
    assert_problem(api.client.get("/v1/artifacts/art_nope/download"), 404, "not-found")
    assert_problem(api.client.get("/v1/models/mdl_nope"), 404, "not-found")
    assert_problem(api.client.get("/v1/datasets/dst_nope"), 404, "not-found")
    for collection in ("jobs", "models", "datasets"):
        response = api.client.get(f"/v1/{collection}", params={"cursor": "%%%"})
        assert_problem(response, 400, "invalid-cursor")


def test_jobs_refuse_unknown_datasets_and_missing_targets(
    api: Api, model: dict, tmp_path: Path
) -> None:
    unlabelled = upload(
        api.client,
        save_npz(tmp_path / "x.npz", inputs=np.zeros((4, 1, 8, 8), np.float32)),
        "datasets",
    )
    before = job_ids(api)
    for section in ("fine_tune", "evaluation", "calibration"):
        extra = {"epochs": 1} if section == "fine_tune" else {}
        unknown = {**global_l1(model["id"]), section: {"dataset_id": "dst_nope", **extra}}
        assert "dst_nope" in assert_problem(post(api, unknown), 404, "not-found")["detail"]
    for section, loc in (
        ({"fine_tune": {"dataset_id": unlabelled["id"], "epochs": 1}}, "fine_tune"),
        ({"fine_tune": {"dataset_id": unlabelled["id"], "epochs": 1, "loss": "mse"}}, "fine_tune"),
        ({"evaluation": {"dataset_id": unlabelled["id"]}}, "evaluation"),
    ):
        problem = assert_problem(
            post(api, {**global_l1(model["id"]), **section}), 422, "validation-error"
        )
        assert "targets" in problem["detail"]
        assert problem["errors"][0]["loc"] == ["body", loc, "dataset_id"]
    for bad in (
        {"dataset_id": unlabelled["id"]},
        {"dataset_id": unlabelled["id"], "epochs": 0},
        {"dataset_id": unlabelled["id"], "epochs": 1, "optimizer": "lion"},
    ):
        assert_problem(
            post(api, {**global_l1(model["id"]), "fine_tune": bad}), 422, "validation-error"
        )
    assert job_ids(api) == before
    # Distillation reads no targets, and calibration none either: both are accepted and stored.
    distil = {"dataset_id": unlabelled["id"], "epochs": 1, "loss": "distillation"}
    accepted = post(
        api,
        {
            **global_l1(model["id"]),
            "fine_tune": distil,
            "calibration": {"dataset_id": unlabelled["id"], "num_samples": 64},
        },
    )
    assert accepted.status_code == 202, accepted.text
    spec = accepted.json()["spec"]
    assert spec["calibration"] == {
        "dataset_id": unlabelled["id"],
        "num_samples": 64,
        "seq_len": None,
    }
    assert spec["fine_tune"]["dataset_id"] == unlabelled["id"]
    assert spec["fine_tune"]["loss"] == "distillation"
    # ...and a dataset a queued job names cannot be deleted.
    assert_problem(api.client.delete(f"/v1/datasets/{unlabelled['id']}"), 409, "dataset-in-use")
    assert api.client.post(f"/v1/jobs/{accepted.json()['id']}/cancel").status_code == 202
    assert api.client.delete(f"/v1/datasets/{unlabelled['id']}").status_code == 204


def test_what_the_models_format_cannot_do_is_422_where_it_is_asked(
    api: Api, model: dict, tmp_path: Path
) -> None:
    """A program is not a language model: its format's pruners and recovery say so before
    anything is queued, pointing at the section."""
    before = job_ids(api)
    text = tmp_path / "corpus.txt"
    text.write_text("one document\n\nanother one\n")
    dataset = upload(api.client, text, "datasets")
    assert dataset["format"] == "text"
    wanda = {"criterion": "wanda", "granularity": "unstructured", "sparsity": 0.5}
    calibration = {"dataset_id": dataset["id"], "num_samples": 8}
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": wanda, "calibration": calibration}),
        422,
        "validation-error",
    )
    assert body["errors"][0]["loc"] == ["body", "pruning"]
    assert "'wanda' is not available for 'pt2' models" in body["detail"]
    body = assert_problem(
        post(
            api,
            {
                "model_id": model["id"],
                "pruning": GOOD,
                "evaluation": {"dataset_id": dataset["id"], "task": "perplexity"},
            },
        ),
        422,
        "validation-error",
    )
    assert body["errors"][0]["loc"] == ["body", "evaluation"]
    assert "language models" in body["detail"]
    width = {"criterion": "random", "granularity": "width", "width": {"mlp": 0.5}}
    body = assert_problem(
        post(api, {"model_id": model["id"], "pruning": width}), 422, "validation-error"
    )
    assert body["errors"][0]["loc"] == ["body", "pruning"]
    assert "not available for 'pt2' models" in body["detail"]
    assert job_ids(api) == before


def test_gpt2_width_takes_mlp_only(api: Api, tmp_path: Path) -> None:
    # GPT-2's head size is n_embd / n_head: a checkpoint with fewer heads has no stock config,
    # so the refusal comes before the job is queued, naming why; MLP width is accepted.
    from tests.hf_factories import archive_folder, save_checkpoint

    _, folder = save_checkpoint("gpt2", tmp_path / "gpt2")
    model = upload(api.client, archive_folder(folder, tmp_path / "gpt2.tar"))
    before = job_ids(api)
    for width in ({"heads": 0.5}, {"hidden": 0.25}):
        pruning = {"criterion": "random", "granularity": "width", "width": width}
        body = assert_problem(
            post(api, {"model_id": model["id"], "pruning": pruning}), 422, "validation-error"
        )
        assert body["errors"][0]["loc"][:2] == ["body", "pruning"]
        assert "GPT-2" in body["detail"]
    assert job_ids(api) == before
    mlp = {"criterion": "random", "granularity": "width", "width": {"mlp": 0.5}}
    assert post(api, {"model_id": model["id"], "pruning": mlp}).status_code == 202
