"""The ``hf`` format: real tiny checkpoints in, the same logits out; crafted archives refused.

Checkpoints are built here from configs with random weights (tests/hf_factories.py); nothing is
downloaded. Refusals go through ``load`` (the worker's path) with the temporary folder and the
working directory watched, so "refused" also means "nothing was unpacked".
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from core.errors import InvalidArchive, UnsafeArchive, UnsupportedFormat
from core.formats import DynamicDim, MeasureConfig, ProgramInput, detect, get_format
from core.formats.hf import HfInfo, HfModel
from core.formats.hf.container import Limits
from core.formats.hf.gate import inspect as inspect_hf
from tests.factories import export_resnet, malicious_pickle
from tests.hf_factories import (
    ARCHITECTURES,
    CONTEXT,
    HIDDEN,
    LAYERS,
    archive_folder,
    folder_members,
    safetensors_bytes,
    save_checkpoint,
    write_archive,
)

HF = get_format("hf")
VARIANTS = [(".tar", None), (".tar.gz", "ckpt"), (".zip", None), (".zip", "ckpt"), (".tar", "ckpt")]
EXPECTED = {
    # architecture, kv heads, head_dim, intermediate, tied
    "llama": ("LlamaForCausalLM", 2, 8, 64, False),
    "mistral": ("MistralForCausalLM", 2, 8, 64, False),
    "qwen2": ("Qwen2ForCausalLM", 2, 8, 64, False),
    "qwen3": ("Qwen3ForCausalLM", 2, 16, 64, True),
    "gpt2": ("GPT2LMHeadModel", 4, 8, 4 * HIDDEN, True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


def unique_params(model: torch.nn.Module) -> int:
    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    return sum(seen.values())


def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


# -- real checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("suffix", "top"), VARIANTS)
def test_inspect_describes_checkpoint(checkpoints, tmp_path, arch, suffix, top):
    model, folder = checkpoints[arch]
    upload = archive_folder(folder, tmp_path / f"upload{suffix}", top=top)
    assert detect(upload) is HF
    info = HF.inspect(upload)
    architecture, kv_heads, head_dim, intermediate, tied = EXPECTED[arch]
    assert isinstance(info, HfInfo)
    assert info.format == "hf"
    assert info.architecture == architecture
    assert info.has_tokenizer
    assert info.tie_word_embeddings is tied
    assert info.num_parameters == unique_params(model)
    assert info.config.as_dict() == {
        "model_type": arch,
        "hidden_size": HIDDEN,
        "intermediate_size": intermediate,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": model.config.vocab_size,
        "max_position_embeddings": CONTEXT,
    }
    assert info.inputs == (
        ProgramInput("input_ids", (1, 1), "int64", (DynamicDim(0, 1, None), DynamicDim(1, 1, 128))),
    )
    assert info.details()["architecture"] == architecture
    # Prunable: every 2-D weight of a linear layer inside the decoder layers, (out, in) shaped.
    linear = {
        name: (m.nf, m.nx) if type(m).__name__ == "Conv1D" else tuple(m.weight.shape)
        for name, m in model.named_modules()
        if type(m).__name__ in ("Linear", "Conv1D") and (".layers." in name or ".h." in name)
    }
    assert {layer.name: layer.shape for layer in info.prunable_layers} == linear
    assert all(layer.kind == "linear" for layer in info.prunable_layers)
    assert len(info.prunable_layers) == LAYERS * (7 if arch != "gpt2" else 4)


@pytest.mark.parametrize(("arch", "variant"), list(zip(ARCHITECTURES, VARIANTS, strict=True)))
def test_load_save_round_trip(checkpoints, tmp_path, arch, variant):
    from transformers import AutoModelForCausalLM

    model, folder = checkpoints[arch]
    suffix, top = variant
    upload = archive_folder(folder, tmp_path / f"upload{suffix}", top=top)
    vocab = model.config.vocab_size
    expected = logits(model, vocab)

    loaded, info = HF.load(upload)
    assert isinstance(loaded, HfModel)
    with loaded:
        assert torch.equal(logits(loaded.model, vocab), expected)
        assert loaded.tokenizer is not None
        assert loaded.tokenizer.token_to_id("<|endoftext|>") == loaded.eos_token_id
        assert HF.count_parameters(loaded) == info.num_parameters
        artifact = HF.save(loaded, tmp_path / "out")["model"]
        source = loaded.source_dir
    assert not source.exists()  # close() removed the unpacked upload

    assert artifact == tmp_path / "out" / "model.tar"
    assert detect(artifact) is HF
    again = HF.inspect(artifact)
    assert (again.architecture, again.config, again.num_parameters) == (
        info.architecture,
        info.config,
        info.num_parameters,
    )
    with tarfile.open(artifact) as tar:
        names = tar.getnames()
        assert all(m.isfile() for m in tar.getmembers())
        tar.extractall(tmp_path / "stock", filter="data")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        names
    )
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", trust_remote_code=False)
    assert torch.equal(logits(stock.eval(), vocab), expected)
    if EXPECTED[arch][4]:  # tied embeddings stay one tensor
        assert stock.lm_head.weight is stock.get_input_embeddings().weight
    with HF.load(artifact)[0] as reloaded:
        assert torch.equal(logits(reloaded.model, vocab), expected)


def test_sharded_checkpoint(checkpoints, tmp_path):
    model, folder = checkpoints["llama"]
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    upload = archive_folder(sharded, tmp_path / "sharded.zip")
    assert HF.inspect(upload).num_parameters == unique_params(model)
    with HF.load(upload)[0] as loaded:
        assert torch.equal(logits(loaded.model, 300), logits(model, 300))

    members = folder_members(sharded)
    index = json.loads(members["model.safetensors.index.json"])
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    members["model.safetensors.index.json"] = json.dumps(index).encode()
    with pytest.raises(InvalidArchive, match="lacks"):
        HF.inspect(write_archive(tmp_path / "bad-index.tar", members))


def test_measure_on_cpu(checkpoints, tmp_path):
    _, folder = checkpoints["llama"]
    loaded, info = HF.load(archive_folder(folder, tmp_path / "llama.tar"))
    with loaded:
        result = HF.measure(loaded, info, MeasureConfig(batch_size=2, warmup=0, repeats=1))
    assert result.device == "cpu"
    assert result.batch_size == 2
    assert result.macs > 0
    assert result.latency_ms > 0
    assert result.tokens_per_second is not None
    assert result.tokens_per_second > 0
    # Per token: at least every decoder linear layer plus the output projection.
    assert result.macs >= sum(layer.params for layer in info.prunable_layers) + 300 * HIDDEN


def test_pt2_and_other_zips_are_not_hf(tmp_path):
    program = export_resnet(tmp_path / "resnet.pt2")
    assert detect(program).name == "pt2"
    assert not HF.claims(program)
    other = write_archive(tmp_path / "notes.zip", {"a/readme.txt": b"hi", "b/config.json": b"{}"})
    assert not HF.claims(other)


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture
def base(checkpoints) -> dict[str, bytes]:
    return folder_members(checkpoints["llama"][1])


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """The temporary folder and working directory a refused load must leave empty."""
    temp, cwd = tmp_path / "temp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(cwd)
    yield tmp_path / "archives"
    assert list(temp.iterdir()) == []
    assert list(cwd.iterdir()) == []


def refused(path: Path, error: type[Exception], match: str | None = None) -> None:
    detected = detect(path)
    assert detected is HF
    with pytest.raises(error, match=match) as caught:
        HF.load(path)
    # The same class from the API's path (inspect), and not a subclass standing in for it.
    with pytest.raises(error):
        HF.inspect(path)
    assert type(caught.value) is error


def edit_json(members: dict[str, bytes], name: str, **changes: object) -> dict[str, bytes]:
    document = json.loads(members.get(name, b"{}"))
    document.update(changes)
    return {**members, name: json.dumps(document).encode()}


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_custom_code_is_refused(base, watched, suffix):
    watched.mkdir()
    canary = watched / "canary"
    code = f"open({str(canary)!r}, 'w')\n".encode()
    members = edit_json(base, "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.M"})
    refused(
        write_archive(watched / f"code{suffix}", {**members, "modeling_x.py": code}),
        UnsupportedFormat,
        "Python code",
    )
    refused(write_archive(watched / f"auto{suffix}", members), UnsupportedFormat, "auto_map")
    trust = edit_json(base, "tokenizer_config.json", trust_remote_code=True)
    refused(write_archive(watched / f"trust{suffix}", trust), UnsupportedFormat, "custom code")
    nested = edit_json(base, "generation_config.json", extra={"trust_remote_code": False})
    refused(write_archive(watched / f"nested{suffix}", nested), UnsupportedFormat, "custom code")
    assert not canary.exists()


def test_pickled_weights_are_refused(base, watched):
    watched.mkdir()
    canary = watched / "canary"
    members = {k: v for k, v in base.items() if k != "model.safetensors"}
    members["pytorch_model.bin"] = malicious_pickle(canary)
    refused(write_archive(watched / "pickle.tar.gz", members), UnsupportedFormat, "pickle")
    refused(
        write_archive(
            watched / "both.zip", {**base, "pytorch_model.bin": malicious_pickle(canary)}
        ),
        UnsupportedFormat,
        "pickle",
    )
    assert not canary.exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".zip"])
def test_unsafe_paths_and_links(base, watched, suffix):
    watched.mkdir()
    # Path checks come first: the .py member would be a 415, the path makes it a 422.
    for name in ("../evil", "/abs", "ckpt/../../evil", "a\\b"):
        members = {**base, "modeling_x.py": b"", name: b"x"}
        refused(write_archive(watched / f"path{suffix}", members), UnsafeArchive)
    refused(
        write_archive(watched / f"dup{suffix}", {**base, "./config.json": b"{}"}), UnsafeArchive
    )
    refused(
        write_archive(watched / f"link{suffix}", base, symlinks={"README.md": "/etc/passwd"}),
        UnsafeArchive,
        "link",
    )
    if suffix != ".zip":
        refused(
            write_archive(watched / f"hard{suffix}", base, hardlinks={"README.md": "config.json"}),
            UnsafeArchive,
            "hard link",
        )


def test_limits(base, tmp_path):
    upload = write_archive(tmp_path / "many.tar", base)
    with pytest.raises(UnsafeArchive, match="members"):
        inspect_hf(upload, Limits(max_members=3))
    with pytest.raises(InvalidArchive, match="reads at most"):
        inspect_hf(upload, Limits(max_json_bytes=16))
    with pytest.raises(UnsafeArchive, match="expands"):
        inspect_hf(upload, Limits(max_total_bytes=1000))


def test_bad_safetensors_headers(base, watched):
    watched.mkdir()
    f32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    cases = {
        "huge": (safetensors_bytes({"w": f32}, bytes(16), length=2**40), UnsafeArchive, "limit"),
        "past-end": (safetensors_bytes({"w": f32}, bytes(16), length=10_000), InvalidArchive, None),
        "negative": (
            safetensors_bytes({"w": {**f32, "shape": [-2, -2]}}, bytes(16)),
            InvalidArchive,
            "non-negative",
        ),
        "overlap": (
            safetensors_bytes({"a": f32, "b": {**f32, "data_offsets": [8, 24]}}, bytes(24)),
            InvalidArchive,
            "overlaps",
        ),
        "size": (
            safetensors_bytes({"w": {**f32, "data_offsets": [0, 12]}}, bytes(12)),
            InvalidArchive,
            "needs 16",
        ),
        "dtype": (
            safetensors_bytes({"w": {**f32, "dtype": "OBJ"}}, bytes(16)),
            InvalidArchive,
            "dtype",
        ),
        "outside": (
            safetensors_bytes({"w": {**f32, "data_offsets": [0, 1 << 40]}}, bytes(16)),
            InvalidArchive,
            "outside",
        ),
    }
    for name, (weights, error, match) in cases.items():
        upload = write_archive(watched / f"{name}.zip", {**base, "model.safetensors": weights})
        refused(upload, error, match)


def test_architectures_transformers_does_not_ship(base, watched):
    watched.mkdir()
    unknown = edit_json(base, "config.json", architectures=["MyModelForCausalLM"])
    refused(write_archive(watched / "unknown.tar", unknown), UnsupportedFormat, "MyModel")
    mismatch = edit_json(base, "config.json", model_type="mistral")
    refused(write_archive(watched / "mismatch.tar", mismatch), UnsupportedFormat, "model_type")
    encoder = edit_json(base, "config.json", model_type="bert", architectures=["BertForMaskedLM"])
    refused(write_archive(watched / "encoder.tar", encoder), UnsupportedFormat)


def test_missing_or_odd_members(base, watched):
    watched.mkdir()
    no_weights = {k: v for k, v in base.items() if k != "model.safetensors"}
    refused(write_archive(watched / "noweights.tar", no_weights), InvalidArchive, "safetensors")
    refused(
        write_archive(watched / "onnx.tar", {**base, "onnx/model.onnx": b"x"}),
        UnsupportedFormat,
        "does not accept",
    )
    refused(
        write_archive(watched / "badjson.tar", {**base, "config.json": b'{"a": 1, "a": 2}'}),
        InvalidArchive,
        "duplicate",
    )
