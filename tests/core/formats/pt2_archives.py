"""Real torch.export archives for the ``.pt2`` gate tests, and helpers to rewrite them.

Archives are exported here from small modules and then rewritten member by member; nothing is
downloaded. ``export_all`` builds the set the ``archives`` fixture (conftest.py) shares.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
