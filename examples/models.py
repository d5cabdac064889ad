"""Small models and datasets that the tests and the benchmarks build for themselves (nothing is
downloaded): a residual CNN, a CNN trained on scikit-learn's 8x8 digits, a nanoGPT-style
attention. Plain functions; no test framework."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


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


# --- datasets and a small CNN on scikit-learn's bundled 8x8 digits (nothing is downloaded) ------


def digits_arrays(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): 1x8x8 float32 images in [0, 1], int64 labels, split
    by a seeded shuffle."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    cut = int(len(y) * (1 - test_fraction))
    return x[:cut], y[:cut], x[cut:], y[cut:]


class DigitsCNN(nn.Module):
    """A small CNN with BatchNorm and dropout: ~19k weights in conv/linear layers."""

    def __init__(self, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(2 * width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)  # (B, 2w, 4, 4)
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(self.drop(torch.flatten(x, 1)))


DIGITS_PRUNABLE = ["c1", "c2", "c3", "fc"]


def train_digits_cnn(
    x, y, epochs: int = 12, seed: int = 0, dropout: float = 0.0, make=None
) -> DigitsCNN:
    """Train a DigitsCNN (or ``make()``'s model) with AdamW; returns it in eval mode."""
    torch.manual_seed(seed)
    model = make() if make is not None else DigitsCNN(dropout=dropout)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = epochs * ((len(yt) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(yt), 64):
            rows = order[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[rows]), yt[rows]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean())


def export_digits(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        model.eval(), (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    return path


def save_npz(path: Path, **arrays) -> Path:
    import numpy as np

    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


@dataclass
class Digits:
    """A DigitsCNN trained on the digits, exported with a dynamic batch, and its data as .npz."""

    model_path: Path
    train: Path
    test: Path
    dense_accuracy: float


def make_digits(root: Path, seed: int = 0) -> Digits:
    x_train, y_train, x_test, y_test = digits_arrays(seed)
    model = train_digits_cnn(x_train, y_train, seed=seed, dropout=0.1)
    return Digits(
        model_path=export_digits(model, root / "cnn.pt2"),
        train=save_npz(root / "train.npz", inputs=x_train, targets=y_train),
        test=save_npz(root / "test.npz", inputs=x_test, targets=y_test),
        dense_accuracy=accuracy(model, x_test, y_test),
    )


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


class MatmulAttention(nn.Module):
    """Attention as a user writes it by hand: one qkv projection, reshape into heads,
    ``q @ kᵀ``, softmax, ``@ v``, output projection (no fused kernel)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        hs = c // self.heads
        q, k, v = self.qkv(x).split(c, dim=-1)
        q = q.reshape(b, t, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.reshape(b, t, self.heads, hs).transpose(1, 2)
        v = v.reshape(b, t, self.heads, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * hs**-0.5
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class PreNormBlock(nn.Module):
    """A pre-norm transformer block (LayerNorm, attention, residual; LayerNorm, GELU MLP,
    residual) around any ``attention(dim, heads)`` module."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        attention: Callable[[int, int], nn.Module] = MatmulAttention,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class SmallTransformer(nn.Module):
    """A small pre-norm transformer with hand-written attention: (B, tokens, features) in,
    10 classes out (mean over tokens). The defaults are the model of issue 12's latency report:
    d 128, 4 heads, MLP 512, 4 layers, 8 tokens of 32 features."""

    def __init__(
        self, dim: int = 128, heads: int = 4, hidden: int = 512, depth: int = 4, features: int = 32
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*(PreNormBlock(dim, heads, hidden) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(x))).mean(dim=1))
