"""core.data: the validating dataset reader never unpickles and refuses what cannot feed a model."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.data import batch_range, inspect_dataset, load_dataset, match_program
from core.errors import DatasetMismatch, InvalidDataset, UnsupportedFormat
from core.formats import DynamicDim, ProgramInput
from tests.factories import Canary, save_npz


def test_npz_with_targets(tmp_path: Path) -> None:
    path = save_npz(
        tmp_path / "d.npz", inputs=np.zeros((5, 1, 8, 8), np.float32), targets=np.arange(5)
    )
    info = inspect_dataset(path)
    assert (info.format, info.num_samples, info.has_targets) == ("npz", 5, True)
    assert info.inputs[0].shape == (5, 1, 8, 8)
    assert info.inputs[0].dtype == "float32"
    data = load_dataset(path)
    assert data.inputs[0].shape == (5, 1, 8, 8)
    assert torch.equal(data.targets, torch.arange(5))


def test_safetensors_with_numbered_inputs_and_no_targets(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file(
        {"inputs.0": torch.randn(3, 4), "inputs.1": torch.zeros(3, 2, dtype=torch.int64)}, str(path)
    )
    info = inspect_dataset(path)
    assert (info.format, info.num_samples, info.has_targets) == ("safetensors", 3, False)
    assert [a.name for a in info.inputs] == ["inputs.0", "inputs.1"]
    data = load_dataset(path)
    assert data.targets is None
    assert data.inputs[1].dtype == torch.int64


def test_a_pickle_inside_an_npz_is_refused_without_running(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    # An object array whose pickle calls open(canary, "w") when loaded.
    payload = np.array([Canary(canary)], dtype=object)
    path = tmp_path / "evil.npz"
    with path.open("wb") as f:
        np.savez(f, inputs=np.zeros((1, 3), np.float32), targets=payload)
    with pytest.raises(InvalidDataset, match="object"):
        inspect_dataset(path)
    with pytest.raises(InvalidDataset, match="object"):
        load_dataset(path)
    assert not canary.exists()


def test_a_raw_pickle_is_not_a_dataset(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(Canary(canary)))
    with pytest.raises(UnsupportedFormat):
        inspect_dataset(path)
    assert not canary.exists()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"inputs": np.array([1.0, np.nan], np.float32)}, "NaN"),
        ({"inputs": np.array([1.0, np.inf])}, "infinite"),
        ({"inputs": np.zeros((3, 2)), "targets": np.zeros(4)}, "same number of samples"),
        ({"inputs": np.array(["a", "b"])}, "not numeric"),
        ({"inputs": np.zeros(2, np.complex64)}, "not numeric"),
        ({"targets": np.zeros(2)}, "no 'inputs'"),
        ({"inputs": np.zeros(2), "labels": np.zeros(2)}, "unexpected array"),
        ({"inputs": np.zeros(2), "inputs.0": np.zeros(2)}, "not both"),
        ({"inputs.0": np.zeros(2), "inputs.2": np.zeros(2)}, "without gaps"),
        ({"inputs": np.float32(1.0)}, "scalar"),
        ({"inputs": np.zeros((0, 3))}, "no samples"),
    ],
)
def test_invalid_npz(tmp_path: Path, arrays: dict, match: str) -> None:
    with pytest.raises(InvalidDataset, match=match):
        inspect_dataset(save_npz(tmp_path / "d.npz", **arrays))


def test_truncated_or_inflated_members_are_refused(tmp_path: Path) -> None:
    good = save_npz(tmp_path / "d.npz", inputs=np.zeros((100, 10), np.float32))
    with zipfile.ZipFile(good) as zf:
        member = zf.read("inputs.npy")
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("inputs.npy", member[: len(member) // 2])
    with pytest.raises(InvalidDataset, match="does not match"):
        inspect_dataset(bad)
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InvalidDataset):
        inspect_dataset(tmp_path / "zip.npz")


def test_malformed_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    header = b'{"inputs": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 400]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(InvalidDataset, match="malformed"):
        inspect_dataset(path)


def test_nan_in_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.tensor([[1.0], [float("nan")]])}, str(path))
    with pytest.raises(InvalidDataset, match="NaN"):
        inspect_dataset(path)


IMAGE = ProgramInput("x", (4, 1, 8, 8), "float32", (DynamicDim(0, 2, 1024),))


def test_match_program_casts_and_names_the_mismatch(tmp_path: Path) -> None:
    data = load_dataset(save_npz(tmp_path / "d.npz", inputs=np.zeros((3, 1, 8, 8))))
    assert match_program(data, (IMAGE,)).inputs[0].dtype == torch.float32
    flat = load_dataset(save_npz(tmp_path / "f.npz", inputs=np.zeros((3, 64), np.float32)))
    with pytest.raises(DatasetMismatch) as err:
        match_program(flat, (IMAGE,))
    assert "[*, 1, 8, 8]" in err.value.message
    assert "[*, 64]" in err.value.message
    with pytest.raises(DatasetMismatch, match="2 input"):
        match_program(data, (IMAGE, IMAGE))
    assert batch_range((IMAGE,)).min == 2
    assert batch_range((IMAGE,)).clamp(1) == 2


def test_reader_accepts_a_file_object_saved_npz(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=np.ones((2, 2), np.float16))
    path = tmp_path / "c.npz"
    path.write_bytes(buffer.getvalue())
    assert inspect_dataset(path).inputs[0].dtype == "float16"
