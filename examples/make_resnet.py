"""Write a small residual CNN as a torch.export program, ready to upload to Shears.

    python examples/make_resnet.py resnet.pt2

The batch dimension is dynamic, so the pruned program Shears returns runs at any batch size.
"""

from __future__ import annotations

import sys

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
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(y)))


class ResidualCNN(nn.Module):
    """For 1x8x8 images (the scikit-learn digits) and 10 classes."""

    def __init__(self, width: int = 16) -> None:
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


def main(path: str) -> None:
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet.pt2")
