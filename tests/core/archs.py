"""Small architectures that exercise every coupling the structured pass must understand.

Each builder takes a few size knobs so property tests can generate many variants.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics, so eval-mode BN is not the identity
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = _bn(width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                _bn(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                _bn(width),
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatCNN(nn.Module):
    """Inception/DenseNet-style: branches concatenated, then flattened into a linear."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.b = nn.Conv2d(3, width + 2, 1)
        self.bn = _bn(2 * width + 2)
        self.c = nn.Conv2d(2 * width + 2, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.relu(self.c(F.relu(self.bn(y))))
        return self.head(torch.flatten(y, 1))


class DepthwiseCNN(nn.Module):
    """MobileNet-style: pointwise -> depthwise -> pointwise, with a residual."""

    def __init__(self, width: int = 8, expand: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.pw1 = nn.Conv2d(width, width * expand, 1, bias=False)
        self.bn1 = _bn(width * expand)
        self.dw = nn.Conv2d(width * expand, width * expand, 3, padding=1, groups=width * expand)
        self.bn2 = _bn(width * expand)
        self.pw2 = nn.Conv2d(width * expand, width, 1, bias=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        y = F.relu6(self.bn1(self.pw1(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.pw2(y)
        return self.head(x.mean(dim=(2, 3)))


class GroupedCNN(nn.Module):
    """ResNeXt-style grouped convolution: its channels stay, everything else may go."""

    def __init__(self, width: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.grouped = nn.Conv2d(width, width * 2, 3, padding=1, groups=groups)
        self.mid = nn.Conv2d(width * 2, width, 1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.mid(F.relu(self.grouped(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        dims = [12] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.out(x)


class Attention(nn.Module):
    """Hand-written multi-head attention, nanoGPT style: reshapes into heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Transformer(nn.Module):
    """Pre-norm blocks with LayerNorm, attention and an MLP; mean-pooled classifier."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 32, mha: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.mha = mha
        if mha:
            self.attn: nn.Module = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.ln1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.mha else self.attn(h))
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return self.head(self.ln_f(x).mean(dim=1))


@dataclass(frozen=True)
class Arch:
    """A model factory and the shape of one example input (batch first, batch dynamic)."""

    name: str
    build: Callable[[int], nn.Module]  # takes a width multiplier
    input_shape: tuple[int, ...]


ARCHS = {
    "residual": Arch("residual", lambda w: ResidualCNN(8 * w, blocks=w), (3, 8, 8)),
    "concat": Arch("concat", lambda w: ConcatCNN(6 * w), (3, 8, 8)),
    "depthwise": Arch("depthwise", lambda w: DepthwiseCNN(8 * w, expand=1 + w), (3, 8, 8)),
    "grouped": Arch("grouped", lambda w: GroupedCNN(8 * w, groups=2 * w), (3, 8, 8)),
    "mlp": Arch("mlp", lambda w: MLP(16 * w, depth=1 + w), (12,)),
    "transformer": Arch("transformer", lambda w: Transformer(8 * w, 2, 16 * w), (5, 6)),
    "mha": Arch("mha", lambda w: Transformer(8 * w, 2, 16 * w, mha=True), (5, 6)),
}


def export(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=512)
    example = torch.randn(4, *input_shape)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
