"""Hugging Face language models through the service: a checkpoint and a text dataset in, pruned by
Wanda with layer-by-layer calibration, or narrowed (width) and distilled from the dense model,
scored by perplexity, a standard checkpoint out."""

from __future__ import annotations

import inspect
import json
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from core.lm_recovery import evaluate_perplexity
from core.text import token_blocks
from tests.e2e.service import Service
from tests.e2e.test_walkthrough import submit, upload
from tests.hf_factories import EOS, archive_folder, save_checkpoint, write_archive
from tests.problems import assert_problem

SEQ_LEN = 32


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    folder = tmp_path_factory.mktemp("llama")
    model, checkpoint = save_checkpoint("llama", folder / "checkpoint")
    return model, archive_folder(checkpoint, folder / "llama.tar.gz", top="llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents separated by blank lines: the standard library's own source."""
    import json as json_module

    source = inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(textwrap.dedent(source))
    return path


def _evaluation(dataset_id: str) -> dict[str, object]:
    return {"dataset_id": dataset_id, "task": "perplexity", "seq_len": SEQ_LEN, "max_samples": 8}


def _score(folder: Path, model: torch.nn.Module, text: Path) -> float:
    """Perplexity of ``model`` on the job's evaluation blocks, tokenized with the downloaded
    tokenizer in ``folder``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    blocks = token_blocks(text, tokenizer, SEQ_LEN, tokenizer.token_to_id(EOS), 8)
    return float(evaluate_perplexity(model, blocks, batch_size=8, device="cpu")["perplexity"])


def _download(service: Service, job: dict, folder: Path) -> Path:
    (artifact,) = [a for a in job["artifacts"] if a["kind"] == "model"]
    assert artifact["format"] == "hf"
    tar_path = folder / "model.tar"
    tar_path.write_bytes(service.client.get(artifact["download_url"]).content)
    out = folder / "model"
    with tarfile.open(tar_path) as tar:
        tar.extractall(out, filter="data")
    return out


def test_prune_a_language_model_with_wanda(
    service: Service, llama: tuple[torch.nn.Module, Path], text: Path, tmp_path: Path
) -> None:
    dense, archive = llama
    model = upload(service, archive)
    assert (model["format"], model["architecture"], model["has_tokenizer"]) == (
        "hf",
        "LlamaForCausalLM",
        True,
    )
    assert model["config"]["num_key_value_heads"] == 2
    assert model["num_parameters"] == sum(p.numel() for p in dense.parameters())
    dataset = upload(service, text, collection="datasets")
    assert (dataset["format"], dataset["has_targets"]) == ("text", False)

    body = {
        "model_id": model["id"],
        "pruning": {"criterion": "wanda", "granularity": "unstructured", "sparsity": 0.5},
        "calibration": {"dataset_id": dataset["id"], "num_samples": 8, "seq_len": SEQ_LEN},
        "evaluation": _evaluation(dataset["id"]),
    }
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["sparsity"] == pytest.approx(0.5)
    assert m["eval_before"]["seq_len"] == SEQ_LEN
    assert m["eval_after_pruning"]["num_tokens"] == 8 * (SEQ_LEN - 1)
    assert m["tokens_per_second_before"] > 0
    assert m["tokens_per_second_after"] > 0
    assert m["device"] == "cpu"
    layers = service.client.get(f"/v1/jobs/{job['id']}/layers").json()["items"]
    assert {layer["name"] for layer in layers} >= {"model.layers.0.mlp.down_proj"}
    assert all(layer["sparsity"] == pytest.approx(0.5) for layer in layers)

    # The artifact is a standard checkpoint: stock transformers loads it, without custom code,
    # and scores what the job reported.
    from transformers import AutoModelForCausalLM

    out = _download(service, job, tmp_path)
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    reported = m["eval_after_pruning"]["perplexity"]
    assert _score(out, pruned, text) == pytest.approx(reported, rel=0.01)
    down = pruned.model.layers[0].mlp.down_proj.weight
    assert int((down == 0).sum(dim=1).min()) == down.shape[1] // 2  # every row, exactly half

    registered = service.client.get(f"/v1/models/{job['result_model_id']}").json()
    assert registered["format"] == "hf"


def test_width_pruning_with_distillation_gives_a_smaller_stock_checkpoint(
    service: Service, llama: tuple[torch.nn.Module, Path], text: Path, tmp_path: Path
) -> None:
    dense, archive = llama
    model = upload(service, archive)
    dataset = upload(service, text, collection="datasets")
    body = {
        "model_id": model["id"],
        "pruning": {
            "criterion": "activation",
            "granularity": "width",
            "width": {"mlp": 0.5, "heads": 0.5},
        },
        "calibration": {"dataset_id": dataset["id"], "num_samples": 8, "seq_len": SEQ_LEN},
        "fine_tune": {
            "dataset_id": dataset["id"],
            "steps": 4,
            "batch_size": 4,
            "lr": 1e-3,
            "loss": "distillation",
            "seq_len": SEQ_LEN,
        },
        "evaluation": _evaluation(dataset["id"]),
    }
    job = service.wait_for_job(submit(service, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["params_before"] == sum(p.numel() for p in dense.parameters())
    assert m["params_after"] < m["params_before"]
    assert m["macs_after"] < m["macs_before"]
    assert m["eval_after_fine_tune"] is not None

    from transformers import AutoModelForCausalLM

    out = _download(service, job, tmp_path)
    config = json.loads((out / "config.json").read_text())
    dense_config = dense.config
    assert config["intermediate_size"] == dense_config.intermediate_size // 2
    assert config["num_key_value_heads"] == dense_config.num_key_value_heads // 2
    assert config["num_attention_heads"] == dense_config.num_attention_heads // 2
    narrowed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert sum(p.numel() for p in narrowed.parameters()) == m["params_after"]
    # The distilled weights are what was saved: the download scores what the job reported.
    reported = m["eval_after_fine_tune"]["perplexity"]
    assert _score(out, narrowed, text) == pytest.approx(reported, rel=0.01)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    generated = narrowed.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_checkpoints_that_could_run_code_are_refused(
    service: Service, llama: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    _, archive = llama
    with tarfile.open(archive) as tar:
        members = {
            m.name.removeprefix("llama/"): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile()
        }
    config = json.loads(members["config.json"])
    crafted = {
        **members,
        "config.json": json.dumps({**config, "auto_map": {"AutoModel": "x.Model"}}).encode(),
        "x.py": b"open('canary', 'w')\n",
    }
    path = write_archive(tmp_path / "remote-code.tar", crafted)
    with path.open("rb") as f:
        response = service.client.post("/v1/models", files={"file": (path.name, f)})
    assert_problem(response, 415, "unsupported-format")
    traversal = write_archive(tmp_path / "escape.zip", {**members, "../evil": b"x"})
    with traversal.open("rb") as f:
        response = service.client.post("/v1/models", files={"file": (traversal.name, f)})
    assert_problem(response, 422, "unsafe-archive")
