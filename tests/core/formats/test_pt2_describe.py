"""The gate's metadata of real torch.export archives (core.formats.pt2.describe), and the
refusal of model.json documents it cannot describe.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import InvalidArchive, UnsupportedFormat
from core.formats import DynamicDim, ProgramInput, PrunableLayer
from core.formats.pt2.gate import inspect_archive
from tests.core.formats.pt2_archives import (
    MODEL_JSON,
    Extras,
    ResNet,
    Zoo,
    edit_json,
)


def test_residual_cnn_metadata(archives: dict[str, Path]) -> None:
    info = inspect_archive(archives["resnet"])

    model = ResNet()
    assert info.format == "pt2"
    assert info.prefix == "resnet"
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.torch_version == torch.__version__
    assert info.schema_version == "8.20"
    # torch 2.13 records Dim("batch") with min_val 0 and no upper bound.
    assert info.inputs == (
        ProgramInput(
            name="x",
            shape=(4, 3, 8, 8),
            dtype="float32",
            dynamic_dims=(DynamicDim(dim=0, min=0, max=None),),
        ),
    )
    assert info.prunable_layers == (
        PrunableLayer("stem", "conv2d", (8, 3, 3, 3), 216),
        PrunableLayer("stage1.c1", "conv2d", (8, 8, 3, 3), 576),  # no bias
        PrunableLayer("stage1.c2", "conv2d", (8, 8, 3, 3), 576),
        PrunableLayer("head", "linear", (10, 8), 80),
    )


def test_every_layer_kind(archives: dict[str, Path]) -> None:
    info = inspect_archive(archives["zoo"])

    assert [(layer.name, layer.kind, layer.shape) for layer in info.prunable_layers] == [
        ("c1d", "conv1d", (4, 2, 3)),
        ("up", "conv_transpose2d", (4, 2, 2, 2)),
        ("same", "conv2d", (3, 2, 3, 3)),  # aten.conv2d.padding
        ("c3d", "conv3d", (2, 1, 1, 1, 1)),
    ]
    assert [i.name for i in info.inputs] == ["x", "v", "w"]
    assert info.num_parameters == sum(p.numel() for p in Zoo().parameters())


def test_two_inputs_keep_their_names_and_dtypes(archives: dict[str, Path]) -> None:
    info = inspect_archive(archives["two"])

    assert info.inputs == (
        ProgramInput("image", (2, 4), "float32", ()),
        ProgramInput("tokens", (2, 6), "int64", ()),
    )
    assert [layer.name for layer in info.prunable_layers] == ["a", "b"]


def test_buffers_constants_views_and_tied_weights(archives: dict[str, Path]) -> None:
    info = inspect_archive(archives["extras"])

    # parameters() deduplicates the tied weight; so must the gate.
    assert info.num_parameters == sum(p.numel() for p in Extras().parameters())
    assert [layer.name for layer in info.prunable_layers] == ["tied"]  # one parameter, once
    with zipfile.ZipFile(archives["extras"]) as z:
        names = {n.split("/", 1)[1] for n in z.namelist()}
    assert {"data/constants/tensor_0", "data/constants/tensor_1"} <= names


def test_derived_and_bounded_dynamic_dims_and_guards(archives: dict[str, Path]) -> None:
    with zipfile.ZipFile(archives["derived"]) as z:
        doc = json.loads(z.read(f"derived/{MODEL_JSON}"))
    assert doc["guards_code"], "torch should record guards for this program"

    info = inspect_archive(archives["derived"])

    assert info.inputs == (
        ProgramInput("x", (8, 4), "float32", (DynamicDim(0, 2, 64),)),
        ProgramInput("y", (10, 3), "float32", (DynamicDim(0, 9, None),)),
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc.pop("graph_module") and None,
        lambda doc: doc["graph_module"]["graph"].pop("tensor_values") and None,
        lambda doc: doc["graph_module"]["signature"].update(input_specs={"x": 1}),
        lambda doc: doc["graph_module"]["signature"]["input_specs"].append({"odd": {}}),
        lambda doc: doc.update(schema_version="8.20"),
        lambda doc: doc["graph_module"]["graph"]["tensor_values"]["x"].update(dtype="float"),
        lambda doc: doc["graph_module"]["graph"]["nodes"][0].update(inputs=[{"arg": 1}]),
        lambda doc: doc["graph_module"]["signature"]["input_specs"][0]["parameter"].update(
            parameter_name="nope.weight"
        ),
    ],
)
def test_inconsistent_model_json_is_invalid(
    archives: dict[str, Path], tmp_path: Path, edit: Callable[[Any], Any]
) -> None:
    crafted = edit_json(archives["resnet"], tmp_path / "m.pt2", MODEL_JSON, edit)
    with pytest.raises(InvalidArchive):
        inspect_archive(crafted)


def test_other_schema_major_is_unsupported(archives: dict[str, Path], tmp_path: Path) -> None:
    def bump(doc: dict[str, Any]) -> None:
        doc["schema_version"]["major"] = 9

    crafted = edit_json(archives["resnet"], tmp_path / "s.pt2", MODEL_JSON, bump)
    with pytest.raises(UnsupportedFormat, match="schema 9"):
        inspect_archive(crafted)
