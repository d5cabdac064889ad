"""The upload gate: metadata of real torch.export archives, and every refusal it promises.

Archives are exported here from small modules and then rewritten member by member; nothing is
downloaded. The code-execution vectors are shown to be real by letting torch.export.load run
them in a subprocess (so this process never runs the payload).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.archive import (
    ArchiveInfo,
    ArchiveLimits,
    DynamicDim,
    ProgramInput,
    PrunableLayer,
    detect_format,
    inspect_archive,
)
from core.errors import InvalidArchive, UnsafeArchive, UnsupportedFormat

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c2(torch.relu(self.bn1(self.c1(x)))))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = Block(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.stage1(self.stem(x)).mean((2, 3)))
        return out


class Zoo(nn.Module):
    """Every layer kind but linear/conv2d-default: Conv1d, ConvTranspose2d, Conv3d, "same"."""

    def __init__(self) -> None:
        super().__init__()
        self.c1d = nn.Conv1d(2, 4, 3)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.same = nn.Conv2d(2, 3, 3, padding="same")
        self.c3d = nn.Conv3d(1, 2, 1)

    def forward(
        self, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self.c1d(x), self.same(self.up(v)), self.c3d(w)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(image) + self.b(tokens.float())
        return out


class Extras(nn.Module):
    """Buffers, a non-persistent buffer, a tensor constant, a buffer view and tied weights."""

    part: torch.Tensor
    full: torch.Tensor
    scratch: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = self.fc.weight
        base = torch.randn(20)
        self.register_buffer("full", base)
        self.register_buffer("part", base[4:12].view(2, 4))  # shares full's storage, offset 4
        self.register_buffer("scratch", torch.zeros(4), persistent=False)
        self.const = torch.arange(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.tied(self.fc(x)) + self.part.sum() + self.full.sum()
        return y + self.scratch + self.const


class Derived(nn.Module):
    """A derived dynamic dim (2*h), a bounded one and the guards torch records for them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x).reshape(x.shape[0] // 2, -1), y[: x.shape[0]]


# --------------------------------------------------------------------------------------------
# Archive helpers
# --------------------------------------------------------------------------------------------


def export(
    path: Path,
    module: nn.Module,
    args: tuple[Any, ...],
    dynamic_shapes: Any = None,
    **save_kwargs: Any,
) -> Path:
    program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(path), **save_kwargs)
    return path


def rewrite(
    src: Path,
    dst: Path,
    *,
    replace: dict[str, bytes | Callable[[bytes], bytes]] | None = None,
    drop: Iterable[str] = (),
    add: Iterable[tuple[str | zipfile.ZipInfo, bytes]] = (),
) -> Path:
    """Copy ``src`` member by member; names in replace/drop are relative to the top folder.

    Names in ``add`` are full names (so they can leave the folder).
    """
    replace = replace or {}
    dropped = set(drop)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel in dropped:
                continue
            data = zin.read(info)
            if rel in replace:
                new = replace[rel]
                data = new(data) if callable(new) else new
            zout.writestr(info, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Duplicate name" is the point
            for name, data in add:
                zout.writestr(name, data)
    return dst


def edit_json(src: Path, dst: Path, rel: str, edit: Callable[[Any], Any]) -> Path:
    def apply(data: bytes) -> bytes:
        doc = json.loads(data)
        result = edit(doc)
        return json.dumps(doc if result is None else result).encode()

    return rewrite(src, dst, replace={rel: apply})


def prefix_of(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/")[0]


def torch_save_bytes(obj: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


class Canary:
    """Unpickling this creates (truncates) a file: proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


MODEL_JSON = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"


def first_node(doc: dict[str, Any], target_prefix: str) -> dict[str, Any]:
    nodes = doc["graph_module"]["graph"]["nodes"]
    return next(n for n in nodes if n["target"].startswith(target_prefix))


# --------------------------------------------------------------------------------------------
# Fixtures: export once per module, rewrite per test
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    with torch.random.fork_rng():  # seeded exports must not shift other tests' random state
        return export_all(tmp_path_factory.mktemp("exported"))


def export_all(d: Path) -> dict[str, Path]:
    batch = torch.export.Dim("batch")
    return {
        "resnet": export(d / "resnet.pt2", ResNet(), (torch.randn(4, 3, 8, 8),), {"x": {0: batch}}),
        "zoo": export(
            d / "zoo.pt2",
            Zoo(),
            (torch.randn(1, 2, 8), torch.randn(1, 4, 3, 3), torch.randn(1, 1, 2, 2, 2)),
        ),
        "two": export(d / "two.pt2", TwoInputs(), (torch.randn(2, 4), torch.randint(0, 5, (2, 6)))),
        "extras": export(d / "extras.pt2", Extras(), (torch.randn(2, 4),)),
        "derived": export(
            d / "derived.pt2",
            Derived(),
            (torch.randn(8, 4), torch.randn(10, 3)),
            {
                "x": {0: 2 * torch.export.Dim("h", min=1, max=32)},
                "y": {0: torch.export.Dim("c", min=9)},
            },
        ),
        # pickle protocol 4 writes STACK_GLOBAL instead of GLOBAL in the sample inputs
        "proto4": export(
            d / "proto4.pt2", TwoInputs(), (torch.randn(2, 4), torch.randn(2, 6)), pickle_protocol=4
        ),
    }


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


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


def test_pickle_protocol_4_sample_inputs_are_refused(archives: dict[str, Path]) -> None:
    # Surprising but true in torch 2.13: torch.export.save(..., pickle_protocol=4) writes sample
    # inputs that torch.load(weights_only=True) cannot read (FRAME is unsupported), so
    # torch.export.load always falls back to weights_only=False for them. The opcode scan
    # resolves their STACK_GLOBALs and passes; torch.load's own check is what refuses them.
    with pytest.raises(UnsafeArchive, match=r"weights_only=True\) \(UnpicklingError\)"):
        inspect_archive(archives["proto4"])


def test_gated_archive_loads_and_runs(archives: dict[str, Path]) -> None:
    inspect_archive(archives["resnet"])
    program = torch.export.load(str(archives["resnet"]))
    assert program.module()(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_inspect_never_calls_torch_export_load(
    archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the gate must not call torch.export.load")

    monkeypatch.setattr(torch.export, "load", forbidden)
    assert isinstance(inspect_archive(archives["resnet"]), ArchiveInfo)


def test_importing_the_gate_does_not_import_torch() -> None:
    code = "import sys, core.archive\nassert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --------------------------------------------------------------------------------------------
# Code execution: refused by the gate, real in torch.export.load
# --------------------------------------------------------------------------------------------

LOAD_ALL = """
import sys, torch
for path in sys.argv[1:]:
    try:
        torch.export.load(path).module()(torch.randn(4, 3, 8, 8))
    except BaseException:
        pass
"""


def test_code_execution_vectors_are_refused_and_real(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    resnet = archives["resnet"]
    canaries = {name: tmp_path / f"{name}.canary" for name in ("pickle", "sympy", "guards")}

    # 1. sample inputs replaced by a pickle whose __reduce__ opens (creates) a file.
    evil_pickle = rewrite(
        resnet,
        tmp_path / "pickle.pt2",
        replace={SAMPLE_INPUTS: torch_save_bytes(Canary(canaries["pickle"]))},
    )

    # 2. a symbolic size: torch.export.load hands expr_str to sympy.sympify, which eval()s it.
    def sympy_payload(doc: dict[str, Any]) -> None:
        size = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"__import__('os').system('touch {canaries['sympy']}')"

    evil_sympy = edit_json(resnet, tmp_path / "sympy.pt2", MODEL_JSON, sympy_payload)

    # 3. a guard: ExportedProgram.module() exec()s guards_code; it runs on the first call.
    def guard_payload(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [f"__import__('os').system('touch {canaries['guards']}') == 0"]

    evil_guard = edit_json(resnet, tmp_path / "guards.pt2", MODEL_JSON, guard_payload)

    for crafted, match in (
        (evil_pickle, "sample_inputs"),
        (evil_sympy, "expr_str"),
        (evil_guard, "guards_code"),
    ):
        with pytest.raises(UnsafeArchive, match=match):
            inspect_archive(crafted)
    assert not any(c.exists() for c in canaries.values())

    # Prove the payloads are real: torch.export.load (and .module()) runs every one of them.
    # torch 2.13 logs the weights_only=True failure, then retries with weights_only=False.
    subprocess.run(
        [sys.executable, "-c", LOAD_ALL, str(evil_pickle), str(evil_sympy), str(evil_guard)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert {name: c.exists() for name, c in canaries.items()} == {
        "pickle": True,
        "sympy": True,
        "guards": True,
    }


def test_protocol_4_pickle_payload_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "p4.pt2",
        replace={SAMPLE_INPUTS: torch_save_bytes(Canary(canary), pickle_protocol=4)},
    )
    with pytest.raises(UnsafeArchive, match=r"references 'io\.open'"):  # STACK_GLOBAL resolved
        inspect_archive(crafted)
    assert not canary.exists()


def test_raw_pickle_as_sample_inputs_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "raw.pt2",
        replace={SAMPLE_INPUTS: pickle.dumps(Canary(canary))},
    )
    with pytest.raises(UnsafeArchive, match="sample_inputs"):
        inspect_archive(crafted)
    assert not canary.exists()


def test_sample_inputs_that_are_not_args_and_kwargs_are_invalid(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "list.pt2",
        replace={SAMPLE_INPUTS: torch_save_bytes([torch.zeros(2)])},
    )
    with pytest.raises(InvalidArchive, match="args, kwargs"):
        inspect_archive(crafted)


# --------------------------------------------------------------------------------------------
# Weights and constants
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# model.json
# --------------------------------------------------------------------------------------------


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


def test_malformed_model_json_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "m.pt2", replace={MODEL_JSON: b"{not json"})
    with pytest.raises(InvalidArchive, match="not valid JSON"):
        inspect_archive(crafted)


def test_other_schema_major_is_unsupported(archives: dict[str, Path], tmp_path: Path) -> None:
    def bump(doc: dict[str, Any]) -> None:
        doc["schema_version"]["major"] = 9

    crafted = edit_json(archives["resnet"], tmp_path / "s.pt2", MODEL_JSON, bump)
    with pytest.raises(UnsupportedFormat, match="schema 9"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    "member", [MODEL_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS, "archive_version"]
)
def test_missing_member_is_invalid(archives: dict[str, Path], tmp_path: Path, member: str) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "m.pt2", drop=[member])
    with pytest.raises(InvalidArchive, match=member):
        inspect_archive(crafted)


def test_oversized_json_is_invalid(archives: dict[str, Path]) -> None:
    with pytest.raises(InvalidArchive, match="reads at most"):
        inspect_archive(archives["resnet"], ArchiveLimits(max_json_bytes=1000))


# --------------------------------------------------------------------------------------------
# Zip container
# --------------------------------------------------------------------------------------------


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet/../../etc/cron.d/x", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("resnet/data\\weights\\weight_0x", "backslash"),
        ("other/models/model.json", "top folder"),
        ("toplevel.txt", "top folder"),
        ("resnet/extra/notes.txt", "does not define"),
        ("resnet/data/weights/model.pt", "does not define"),  # legacy pickled state dict
        ("resnet/data/constants/custom_obj_0", "does not define"),
        ("resnet/models/other.json", "does not define"),
        ("resnet/models/", "directory"),
        ("resnet/models/model.json", "duplicate"),
        ("resnet/Models/model.json", "case"),
    ],
)
def test_bad_member_names_are_unsafe(
    archives: dict[str, Path], tmp_path: Path, name: str, match: str
) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "n.pt2", add=[(name, b"{}")])
    with pytest.raises(UnsafeArchive, match=match):
        inspect_archive(crafted)


def test_nul_in_member_name_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "n.pt2", add=[("resnet/NULMARK", b"x")])
    # zipfile cannot write a NUL into a name; patch it into both headers (same length).
    crafted.write_bytes(crafted.read_bytes().replace(b"NULMARK", b"NUL\0ARK"))
    with pytest.raises(UnsafeArchive, match="NUL"):
        inspect_archive(crafted)


def test_symlink_member_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "s.pt2",
        add=[(symlink_info("resnet/data/weights/weight_99"), b"/etc/passwd")],
    )
    with pytest.raises(UnsafeArchive, match="symlink"):
        inspect_archive(crafted)


def test_zip_bomb_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    bomb = zipfile.ZipInfo("resnet/data/weights/weight_99")
    bomb.compress_type = zipfile.ZIP_DEFLATED
    crafted = rewrite(archives["resnet"], tmp_path / "b.pt2", add=[(bomb, b"\0" * 4_000_000)])
    with pytest.raises(UnsafeArchive, match="zip bomb"):
        inspect_archive(crafted)


def test_encrypted_member_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "e.pt2", add=[("resnet/ENCMARK", b"x")])
    raw = bytearray(crafted.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        # set the encryption bit in the local and central header of the added member
        at = raw.rfind(b"ENCMARK")
        at = raw.rfind(signature, 0, at if signature == b"PK\x03\x04" else len(raw))
        raw[at + flag_offset] |= 0x01
    crafted.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="encrypted"):
        inspect_archive(crafted)


def test_too_many_members_is_unsafe(archives: dict[str, Path]) -> None:
    with pytest.raises(UnsafeArchive, match="members; the limit is 5"):
        inspect_archive(archives["resnet"], ArchiveLimits(max_members=5))


def test_too_many_bytes_is_unsafe(archives: dict[str, Path]) -> None:
    with pytest.raises(UnsafeArchive, match="expands to more than"):
        inspect_archive(archives["resnet"], ArchiveLimits(max_total_bytes=10_000))


def test_truncated_zip_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["resnet"].read_bytes()
    crafted = tmp_path / "t.pt2"
    crafted.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArchive, match="truncated") as caught:
        inspect_archive(crafted)
    assert not isinstance(caught.value, UnsafeArchive)


def test_corrupt_member_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["resnet"].read_bytes()
    at = data.index(b'"graph_module"')  # inside the stored model.json: breaks its CRC
    crafted = tmp_path / "c.pt2"
    crafted.write_bytes(data[:at] + b"'" + data[at + 1 :])
    with pytest.raises(InvalidArchive, match="corrupt"):
        inspect_archive(crafted)


def test_local_header_that_disagrees_with_the_directory_is_unsafe(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    hidden, shown = b"resnet/extra/AAAAAAAAAAAAAAAA", b"resnet/data/weights/weight_99"
    assert len(hidden) == len(shown)
    crafted = rewrite(archives["resnet"], tmp_path / "h.pt2", add=[(hidden.decode(), b"x")])
    raw = crafted.read_bytes()
    central = raw.rindex(hidden)  # the central directory copy comes last
    # The central entry now names a whitelisted member; the local header still says extra/.
    crafted.write_bytes(raw[:central] + shown + raw[central + len(shown) :])
    with pytest.raises(UnsafeArchive, match="different name in its local header"):
        inspect_archive(crafted)


def test_member_count_that_disagrees_with_the_directory_is_unsafe(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "c.pt2")
    raw = bytearray(crafted.read_bytes())
    eocd = len(raw) - 22  # Python writes a classic end record without a comment
    assert raw[eocd : eocd + 4] == b"PK\x05\x06"
    count = int.from_bytes(raw[eocd + 10 : eocd + 12], "little")
    for field in (8, 10):  # entries on this disk, entries in total
        raw[eocd + field : eocd + field + 2] = (count - 1).to_bytes(2, "little")
    crafted.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="declares"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    ("copy", "where", "match"),
    [
        (False, "prepended", "zip64"),  # torch writes zip64 end records on every archive
        (True, "prepended", "data before its zip entries"),  # zipfile writes classic ones
        (False, "appended", "after the end"),
        (True, "appended", "after the end"),
    ],
)
def test_smuggled_bytes_around_the_zip_are_unsafe(
    archives: dict[str, Path], tmp_path: Path, copy: bool, where: str, match: str
) -> None:
    source = rewrite(archives["resnet"], tmp_path / "copy.pt2") if copy else archives["resnet"]
    data = source.read_bytes()
    crafted = tmp_path / "s.pt2"
    junk = b"PK\x03\x04" + b"\0" * 60
    crafted.write_bytes(junk + data if where == "prepended" else data + junk)
    with pytest.raises(UnsafeArchive, match=match):
        inspect_archive(crafted)


# --------------------------------------------------------------------------------------------
# Other formats
# --------------------------------------------------------------------------------------------


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p, c: torch.save(small(), p, _use_new_zipfile_serialization=False), "pickle"),
        (lambda p, c: p.write_bytes(pickle.dumps(Canary(c))), "pickle"),
        (lambda p, c: p.write_bytes(pickle.dumps(Canary(c), protocol=0)), "pickle"),
        (lambda p, c: torch.save(small(), p), "torch.save"),
        (lambda p, c: torch.save(Canary(c), p), "torch.save"),
        (lambda p, c: torch.jit.script(small()).save(str(p)), "TorchScript"),  # type: ignore[no-untyped-call]
        (lambda p, c: p.write_bytes(os.urandom(4096)), "unrecognised"),
        (lambda p, c: p.write_bytes(b""), "unrecognised"),
        (lambda p, c: zipfile.ZipFile(p, "w").writestr("a/b.txt", "hi"), "archive_format"),
    ],
)
def test_other_formats_are_unsupported(
    tmp_path: Path, make: Callable[[Path, Path], Any], match: str
) -> None:
    upload = tmp_path / "model.pt2"  # the name never matters
    canary = tmp_path / "canary"
    make(upload, canary)
    with pytest.raises(UnsupportedFormat, match=match) as caught:
        inspect_archive(upload)
    assert "torch.export.save" in caught.value.message
    assert not canary.exists()


def test_wrong_archive_format_is_unsupported(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "f.pt2", replace={"archive_format": b"pt3"})
    with pytest.raises(UnsupportedFormat, match="archive_format"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"PK\x03\x04\x00\x00\x08\x08", "zip"),
        (b"\x80\x02\x8a\nl\xfc\x9cF", "pickle"),
        (b"\x80\x04\x95\x16\x05\x00\x00\x00", "pickle"),
        (b"(dp0\nVa\n", "pickle"),
        (b"]q\x00(K\x01K\x02", "pickle"),
        (b"cos\nsyst", "pickle"),
        (b"\x89PNG\r\n\x1a\n", "unknown"),
        (b"Hello, w", "unknown"),
        (b"", "unknown"),
    ],
)
def test_detect_format(head: bytes, kind: str) -> None:
    assert detect_format(head) == kind
