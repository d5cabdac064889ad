"""Models and archives the tests build for themselves (nothing is downloaded)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(channels)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResidualCNN(nn.Module):
    """1x8x8 in, 10 classes out; layers of very different sizes, so global ranking shows."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.stage1 = Block(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.stage2 = Block(2 * width)
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(torch.relu(self.stem(x)))
        x = self.stage2(torch.relu(self.down(x)))
        return self.head(torch.flatten(x, 1))


PRUNABLE = ["stem", "stage1.c1", "stage1.c2", "down", "stage2.c1", "stage2.c2", "head"]


def resnet_module(seed: int = 0) -> ResidualCNN:
    torch.manual_seed(seed)
    model = ResidualCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export_resnet(path: Path, seed: int = 0) -> Path:
    model = resnet_module(seed)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


class Canary:
    """A pickle payload that creates ``path`` when unpickled (what an attacker would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def replace_member(archive: Path, out: Path, suffix: str, payload: bytes) -> Path:
    """Copy ``archive`` to ``out`` with the member ending in ``suffix`` replaced by ``payload``."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith(suffix) else src.read(info.filename)
            dst.writestr(info, data)
    return out


def malicious_pickle(canary: Path) -> bytes:
    import pickle

    buffer = io.BytesIO()
    pickle.dump(Canary(canary), buffer)
    return buffer.getvalue()
