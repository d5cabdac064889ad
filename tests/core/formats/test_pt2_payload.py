"""The weights and constants configs (core.formats.pt2.payload): no pickles, raw members that
hold what their config says.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.gate import inspect_archive
from tests.core.formats.pt2_archives import (
    CONSTANTS_CONFIG,
    WEIGHTS_CONFIG,
    edit_json,
    rewrite,
)


def test_pickled_weight_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    def pickled(doc: dict[str, Any]) -> None:
        doc["config"]["stem.weight"]["use_pickle"] = True

    crafted = edit_json(archives["resnet"], tmp_path / "w.pt2", WEIGHTS_CONFIG, pickled)
    with pytest.raises(UnsafeArchive, match="pickle"):
        inspect_archive(crafted)


def test_custom_object_constant_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    def custom(doc: dict[str, Any]) -> None:
        doc["config"]["const"]["path_name"] = "opaque_obj_0"

    crafted = edit_json(archives["extras"], tmp_path / "c.pt2", CONSTANTS_CONFIG, custom)
    with pytest.raises(UnsafeArchive, match="custom object"):
        inspect_archive(crafted)


def test_weight_member_too_small_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(
        archives["resnet"], tmp_path / "w.pt2", replace={"data/weights/weight_0": b"\0" * 8}
    )
    with pytest.raises(InvalidArchive, match="needs 864 bytes"):
        inspect_archive(crafted)


def test_view_past_its_storage_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    def shift(doc: dict[str, Any]) -> None:
        doc["config"]["part"]["tensor_meta"]["storage_offset"] = {"as_int": 16}  # 16 + 8 > 20

    crafted = edit_json(archives["extras"], tmp_path / "v.pt2", WEIGHTS_CONFIG, shift)
    with pytest.raises(InvalidArchive, match="needs"):
        inspect_archive(crafted)


def test_weight_path_outside_its_folder_is_invalid(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    def escape(doc: dict[str, Any]) -> None:
        doc["config"]["stem.weight"]["path_name"] = "../sample_inputs/model.pt"

    crafted = edit_json(archives["resnet"], tmp_path / "e.pt2", WEIGHTS_CONFIG, escape)
    with pytest.raises(InvalidArchive, match="path_name"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: {"configs": doc["config"]},
        lambda doc: doc["config"]["stem.weight"].pop("tensor_meta") and None,
        lambda doc: doc["config"]["stem.weight"]["tensor_meta"].update(sizes=[8, 3]),
        lambda doc: doc["config"]["stem.weight"]["tensor_meta"].update(dtype=99),
        lambda doc: doc["config"]["stem.weight"].update(is_param="yes"),
        lambda doc: [],
    ],
)
def test_malformed_weights_config_is_invalid(
    archives: dict[str, Path], tmp_path: Path, edit: Callable[[Any], Any]
) -> None:
    crafted = edit_json(archives["resnet"], tmp_path / "m.pt2", WEIGHTS_CONFIG, edit)
    with pytest.raises(InvalidArchive):
        inspect_archive(crafted)
