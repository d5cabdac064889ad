"""A language model's ratios found through the service: a ``params`` target on a Llama checkpoint,
its decoder layers scanned by perplexity on a text dataset, the job body's ``search`` and the
``sensitivity`` artifact.

The scan's fan-out over the broker and the database is tested on both backends by
``test_search.py``; what is particular to language models here runs on the embedded default."""

from __future__ import annotations

import inspect
import json
import textwrap
from typing import Any

import pytest

from tests.e2e.service import Service
from tests.e2e.test_walkthrough import submit, upload
from tests.hf_factories import archive_folder, save_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("service", ["embedded"], indirect=True)]


@pytest.fixture(scope="module")
def uploaded(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("search-hf")
    _, folder = save_checkpoint("llama", root / "checkpoint")
    text = root / "corpus.txt"
    text.write_text(textwrap.dedent(inspect.getsource(json.decoder)))
    return {
        "model": upload(service, archive_folder(folder, root / "llama.tar"))["id"],
        "text": upload(service, text, collection="datasets")["id"],
    }


def target_job(uploaded: dict[str, str], target: dict[str, float]) -> dict[str, Any]:
    """A magnitude job on the uploaded Llama with ``target``, scanned and judged on its text."""
    return {
        "model_id": uploaded["model"],
        "pruning": {
            "criterion": "magnitude",
            "granularity": "unstructured",
            "target": target,
            "search": {"grid": [0.25, 0.5, 0.75], "num_samples": 4},
        },
        "evaluation": {
            "dataset_id": uploaded["text"],
            "task": "perplexity",
            "seq_len": 32,
            "max_samples": 8,
        },
    }


def test_a_params_target_on_a_language_model(service: Service, uploaded: dict[str, str]) -> None:
    body = target_job(uploaded, {"params": 0.8})
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job
    search = job["search"]
    assert search["status"] == "done"
    assert set(search["chosen"]) == {"model.layers.0", "model.layers.1"}
    assert search["layers_scanned"] == search["layers_total"] == 2
    kept = job["metrics"]["nonzero_params_after"] / job["metrics"]["params_before"]
    assert search["achieved"]["params"] == pytest.approx(kept)
    assert 0.78 <= kept <= 0.8 + 1e-9
    assert search["achieved"]["met"] is True
    assert search["predicted"]["params"] == pytest.approx(kept)
    kinds = {a["kind"]: a for a in job["artifacts"]}
    assert {"model", "report", "sensitivity"} <= set(kinds)
    curves = service.client.get(kinds["sensitivity"]["download_url"]).json()
    assert [u["unit"] for u in curves["units"]] == ["model.layers.0", "model.layers.1"]
    assert all(len(u["curve"]) == 3 and "perplexity" in u["curve"][0] for u in curves["units"])
    svg = service.client.get(f"/v1/jobs/{job['id']}/plots/sensitivity.svg")
    assert svg.status_code == 200


def test_a_perplexity_target_is_judged_after_fine_tuning(
    service: Service, uploaded: dict[str, str]
) -> None:
    """``max_perplexity_increase`` with a fine-tune: chosen on the search text, judged on the
    evaluation text after the fine-tune, stepped back (at most twice) where it misses."""
    body = target_job(uploaded, {"max_perplexity_increase": 0.05})
    body["fine_tune"] = {
        "dataset_id": uploaded["text"],
        "loss": "causal_lm",
        "steps": 2,
        "batch_size": 2,
        "seq_len": 32,
    }
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job
    metrics, search = job["metrics"], job["search"]
    before = metrics["eval_before"]["perplexity"]
    after = metrics["eval_after_fine_tune"]["perplexity"]
    achieved = search["achieved"]
    assert achieved["perplexity_after_fine_tune"] == pytest.approx(after)
    assert achieved["max_perplexity_increase"] == pytest.approx(after / before - 1)
    assert achieved["met"] is (after / before - 1 <= 0.05 + 1e-9)
    assert achieved["met"] or search["step_backs"] == 2
    assert set(search["chosen"]) == {"model.layers.0", "model.layers.1"}


def test_a_macs_target_at_width(service: Service, uploaded: dict[str, str]) -> None:
    """``macs`` at ``width``: the width kinds are the units, and the fractions chosen for them
    give exactly the MACs per token predicted."""
    body = target_job(uploaded, {"macs": 0.7})
    body["pruning"]["granularity"] = "width"
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job
    search = job["search"]
    assert set(search["chosen"]) == {"mlp", "heads", "hidden"}
    assert search["layers_scanned"] == search["layers_total"] == 3
    kept = job["metrics"]["macs_after"] / job["metrics"]["macs_before"]
    # Within the target; how close depends on the coarse steps (of two key/value groups, of
    # eight steps of four hidden channels: the random model chose heads and hidden).
    assert 0.6 <= kept <= 0.7 + 1e-9, search["chosen"]
    assert search["predicted"]["macs"] == pytest.approx(kept, abs=1e-12)
    assert search["achieved"]["macs"] == pytest.approx(kept)
    assert search["achieved"]["met"] is True


def test_a_params_target_at_nm_makes_whole_decoder_layers_nm(
    service: Service, uploaded: dict[str, str]
) -> None:
    """At ``n:m`` each decoder layer is scanned once, at 2:4, and the search picks which are
    2:4 (the others stay dense) until the parameters fall under the target."""
    body = target_job(uploaded, {"params": 0.9})
    body["pruning"]["granularity"] = "n:m"
    del body["pruning"]["search"]["grid"]  # n:m has one ratio: a grid is refused
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job
    search = job["search"]
    assert set(search["chosen"]) == {"model.layers.0", "model.layers.1"}
    assert set(search["chosen"].values()) <= {0.0, 0.5}
    kept = job["metrics"]["nonzero_params_after"] / job["metrics"]["params_before"]
    assert kept <= 0.9 + 1e-9
    assert search["predicted"]["params"] == pytest.approx(kept)
    assert search["achieved"]["met"] is True
    layers = service.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    for layer in layers:
        unit = layer["name"].rsplit(".", 2)[0]
        # 2:4 halves a layer exactly (widths are multiples of 4); a dense one keeps every weight.
        expected = layer["params"] // 2 if search["chosen"][unit] > 0 else layer["params"]
        assert layer["nonzero"] == expected, layer
    kinds = {a["kind"]: a for a in job["artifacts"]}
    curves = service.client.get(kinds["sensitivity"]["download_url"]).json()
    assert all([c["ratio"] for c in u["curve"]] == [0.5] for u in curves["units"])
    for name in ("sensitivity", "layer_sparsity"):
        assert service.client.get(f"/v1/jobs/{job['id']}/plots/{name}.png").status_code == 200
