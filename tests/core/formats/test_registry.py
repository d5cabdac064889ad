"""The format registry: pt2 by detection, refusals by the default gate, new formats by
registration alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from core.errors import UnsupportedFormat
from core.formats import (
    MeasureConfig,
    Measurement,
    ModelFormat,
    ModelInfo,
    detect,
    formats,
    get_format,
    inspect_upload,
    register,
    unregister,
)
from core.formats.base import PathLike
from core.formats.pt2 import Pt2Info
from tests.factories import export_resnet, malicious_pickle


class ToyFormat:
    """A format of files that start with ``TOY1``: all it needs is a class and register()."""

    name: ClassVar[str] = "toy"
    suffix: ClassVar[str] = ".toy"

    def claims(self, path: PathLike) -> bool:
        with open(path, "rb") as fh:
            return fh.read(4) == b"TOY1"

    def inspect(self, path: PathLike) -> ModelInfo:
        return ModelInfo(format=self.name, num_parameters=3, inputs=(), prunable_layers=())

    def load(self, path: PathLike) -> tuple[Any, ModelInfo]:
        return object(), self.inspect(path)

    def save(self, model: Any, path: PathLike) -> Path:
        Path(path).write_bytes(b"TOY1")
        return Path(path)

    def count_parameters(self, model: Any) -> int:
        return 3

    def measure(self, model: Any, info: ModelInfo, config: MeasureConfig) -> Measurement:
        return Measurement(macs=0, latency_ms=0.0, batch_size=1, device=config.device)

    def layer_weights(self, model: Any, info: ModelInfo) -> dict[str, Any]:
        return {}


@pytest.fixture
def toy() -> Iterator[ModelFormat]:
    fmt = register(ToyFormat())
    try:
        yield fmt
    finally:
        unregister(fmt.name)


def test_detect_picks_pt2_for_a_real_archive(tmp_path: Path) -> None:
    with torch.random.fork_rng():
        path = export_resnet(tmp_path / "upload.bin")  # the name never matters
    assert detect(path) is get_format("pt2")
    info = inspect_upload(path)
    assert isinstance(info, Pt2Info)
    assert info.format == "pt2"
    assert info.details()["schema_version"].startswith("8.")


def test_inspect_upload_refuses_a_pickle(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "model.pt2"
    path.write_bytes(malicious_pickle(canary))
    assert detect(path) is get_format("pt2")  # claimed by none: the default gate words it
    with pytest.raises(UnsupportedFormat, match="pickle"):
        inspect_upload(path)
    assert not canary.exists()


def test_a_registered_format_is_detected_ahead_of_pt2(tmp_path: Path, toy: ModelFormat) -> None:
    path = tmp_path / "model.toy"
    path.write_bytes(b"TOY1 weights")

    assert isinstance(toy, ModelFormat)
    assert toy in formats()
    assert detect(path) is toy
    assert inspect_upload(path).format == "toy"


def test_without_the_toy_format_pt2_refuses_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "model.toy"
    path.write_bytes(b"TOY1 weights")

    assert "toy" not in {fmt.name for fmt in formats()}  # the fixture removed it again
    assert detect(path) is get_format("pt2")
    with pytest.raises(UnsupportedFormat, match="unrecognised"):
        inspect_upload(path)
