"""Strings of model.json that torch would getattr, eval or exec (core.formats.pt2.sandbox and
core.formats.pt2.expressions): node targets, symbolic expressions, guards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.gate import inspect_archive
from tests.core.formats.pt2_archives import (
    MODEL_JSON,
    edit_json,
    export,
    first_node,
)


def test_custom_op_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    def custom(doc: dict[str, Any]) -> None:
        first_node(doc, "torch.ops.aten.relu")["target"] = "torch.ops.mylib.fancy_relu.default"

    crafted = edit_json(archives["resnet"], tmp_path / "op.pt2", MODEL_JSON, custom)
    with pytest.raises(InvalidArchive, match=r"mylib\.fancy_relu") as caught:
        inspect_archive(crafted)
    assert not isinstance(caught.value, UnsafeArchive)


@pytest.mark.parametrize(
    "target",
    ["torch.ops.aten.from_file.default", "_operator.attrgetter", "builtins.eval", "torch.load"],
)
def test_dangerous_targets_are_unsafe(
    archives: dict[str, Path], tmp_path: Path, target: str
) -> None:
    def swap(doc: dict[str, Any]) -> None:
        first_node(doc, "torch.ops.aten.relu")["target"] = target

    crafted = edit_json(archives["resnet"], tmp_path / "op.pt2", MODEL_JSON, swap)
    with pytest.raises(UnsafeArchive, match=target.split(".")[-2]):
        inspect_archive(crafted)


def test_operator_argument_is_checked_like_a_target(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    def smuggle(doc: dict[str, Any]) -> None:
        node = first_node(doc, "torch.ops.aten.relu")
        node["inputs"].append({"name": "fn", "arg": {"as_operator": "torch.ops.evil.op.default"}})

    crafted = edit_json(archives["resnet"], tmp_path / "op.pt2", MODEL_JSON, smuggle)
    with pytest.raises(InvalidArchive, match=r"evil\.op"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    "expr",
    [
        "eval('1')",
        "Symbol('s77').__class__",
        "Symbol('s77', positive=__import__('os'))",
        "Pow(Mul(Integer(2), Symbol('s77')), Integer(100000000000))",
        "Pow(Mul(Integer(2), Symbol('s77')), Pow(Integer(10), Integer(10)))",
        "lambda: 0",
        "Symbol('s77', positive=True) # trailing comment",
    ],
)
def test_unsafe_symbolic_expressions_are_refused(
    archives: dict[str, Path], tmp_path: Path, expr: str
) -> None:
    def inject(doc: dict[str, Any]) -> None:
        doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = expr

    crafted = edit_json(archives["resnet"], tmp_path / "e.pt2", MODEL_JSON, inject)
    with pytest.raises(UnsafeArchive, match="expr_str"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    "guard",
    [
        "L['x'].__class__ == 0",
        "torch.load('f') == 0",
        "L['x\"); import os; (\"'].size()[0] == 1",
        "math.__loader__ == 0",
        "(lambda: 0)() == 0",
        "9 ** 9 ** 9 == 0",
        "L['x'].size()[0] ** (2 ** 70) == 0",
        "(L['x'].size()[0] # a comment hides text from the syntax tree\n) == 4",
        "\uff45\uff56\uff41\uff4c('1') == 0",  # fullwidth 'eval', NFKC-normalised by Python
    ],
)
def test_unsafe_guards_are_refused(archives: dict[str, Path], tmp_path: Path, guard: str) -> None:
    def inject(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [guard]

    crafted = edit_json(archives["resnet"], tmp_path / "g.pt2", MODEL_JSON, inject)
    with pytest.raises(UnsafeArchive, match="guards_code"):
        inspect_archive(crafted)


def test_input_named_like_a_schema_key_is_not_mistaken(tmp_path: Path) -> None:
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, target: torch.Tensor, expr_str: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(target) + expr_str
            return out

    path = export(tmp_path / "named.pt2", Named(), (torch.randn(1, 2), torch.randn(1, 2)))
    assert [i.name for i in inspect_archive(path).inputs] == ["target", "expr_str"]
