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

from examples.models import Attention


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


class CausalSelfAttention(nn.Module):
    """nanoGPT's manual path: matmul, causal mask buffer, masked_fill, softmax, matmul."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer(
            "mask", torch.tril(torch.ones(tokens, tokens)).view(1, 1, tokens, tokens)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        hs = c // self.heads
        q = self.q(x).view(b, t, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(b, t, self.heads, hs).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / hs**0.5)
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v  # (B, nh, T, hs)
        return x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class TimmAttention(nn.Module):
    """timm's ViT attention: one fused qkv reshaped to (B, N, 3, H, D) and permuted, q/k/v
    picked apart by ``unbind(0)`` or ``qkv[i]``, SDPA or the manual softmax path."""

    def __init__(
        self, dim: int = 16, heads: int = 4, pick: str = "unbind", fused: bool = True
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.pick, self.fused = pick, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.pick == "unbind":
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1) @ v
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


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
    "causal": Arch("causal", lambda w: CausalSelfAttention(16, 2 * w), (5, 16)),
    "timm": Arch("timm", lambda w: TimmAttention(16, 2 * w), (5, 16)),
}


def export(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=512)
    example = torch.randn(4, *input_shape)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


class UNet(nn.Module):
    """Encoder-decoder: strided conv down, transposed conv up, skip concatenated with the input."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, width, 3, 2, 1)
        self.bn = _bn(width)
        self.up = nn.ConvTranspose2d(width, width, 2, 2)
        self.out = nn.Conv2d(width + 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.up(F.relu(self.bn(self.down(x)))))
        return self.out(torch.cat([y, x], dim=1))


ARCHS["unet"] = Arch("unet", lambda w: UNet(8 * w), (3, 8, 8))


class TinyViT(nn.Module):
    """Patch embedding, a class token concatenated along the tokens, a positional parameter."""

    def __init__(self, dim: int = 16, norm: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x[:, 0])


ARCHS["vit"] = Arch("vit", lambda w: TinyViT(8 * w), (3, 8, 8))


class SqueezeExcite(nn.Module):
    """MobileNetV3-style gate: pooled channels -> reduce -> expand -> sigmoid -> scale."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = _bn(width)
        self.reduce = nn.Conv2d(width, width // 4, 1)
        self.expand = nn.Conv2d(width // 4, width, 1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.bn(self.stem(x)))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        x = F.relu(self.conv(x * gate))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


ARCHS["se"] = Arch("se", lambda w: SqueezeExcite(8 * w), (3, 8, 8))


class FusedHeadsAttention(nn.Module):
    """One fused projection whose q, k and v are interleaved per head, as transformers' decoders
    lay them out (nothing like timm's ``(3, H, D)``, where q, k and v are contiguous blocks):

    - ``neox``: GPT-NeoX, ``view(B, N, H, 3*D)`` then ``chunk(3, dim=-1)``
    - ``per_head``: Falcon, ``view(B, N, 3*H, D)``, ``unflatten(-2, (H, 3))``, ``unbind(-2)``
    - ``bloom``: BLOOM, ``view(B, N, H, 3, D)`` then ``[..., i, :]``
    - ``grouped``: Falcon's new decoder, ``view(B, N, KV, r + 2, D)``: each key/value group's
      ``r`` queries, then its key and its value; keys and values repeated for the queries

    ``block(g)`` is the slice of fused rows that one prunable unit (a head, or a key/value
    group) owns; ``columns(g)`` the output projection's columns it feeds.
    """

    def __init__(self, dim: int = 16, heads: int = 4, layout: str = "neox", kv: int = 2):
        super().__init__()
        self.heads, self.head_dim, self.layout = heads, dim // heads, layout
        self.kv = kv if layout == "grouped" else heads
        fused = (heads + 2 * kv) * self.head_dim if layout == "grouped" else 3 * dim
        self.qkv = nn.Linear(dim, fused)
        self.proj = nn.Linear(dim, dim)

    def block(self, g: int) -> slice:
        size = self.qkv.out_features // self.kv
        return slice(g * size, (g + 1) * size)

    def columns(self, g: int) -> list[int]:
        per = self.heads // self.kv * self.head_dim
        return list(range(g * per, (g + 1) * per))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, self.head_dim
        fused = self.qkv(x)
        if self.layout == "neox":
            q, k, v = fused.view(b, n, h, 3 * d).transpose(1, 2).chunk(3, dim=-1)
        elif self.layout == "bloom":
            per_head = fused.view(b, n, h, 3, d)
            q, k, v = (per_head[..., i, :].transpose(1, 2) for i in range(3))
        elif self.layout == "per_head":
            parts = fused.view(b, n, -1, d).unflatten(-2, (h, 3)).unbind(-2)
            q, k, v = (p.transpose(1, 2) for p in parts)
        else:
            groups = fused.view(b, n, -1, d).view(b, n, self.kv, -1, d)
            q = groups[..., :-2, :].flatten(-3, -2).transpose(1, 2)
            k, v = (groups[..., i, :].transpose(1, 2) for i in (-2, -1))
            r = h // self.kv
            k, v = (t[:, :, None].expand(b, self.kv, r, n, d).reshape(b, h, n, d) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


class InterpolatedBiasAttention(nn.Module):
    """BEiT's relative position bias: a (positions, heads) table that is reshaped, interpolated
    and extended with extra rows *before* the rows are gathered and added to each head's scores
    (Swin gathers from the parameter itself)."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(9 + 1, heads))  # a 3x3 grid, then one extra row
        self.register_buffer("where", torch.randint(0, 10, (tokens * tokens,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        grid = self.table[:9].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False)
        table = torch.cat([grid.permute(0, 2, 3, 1).reshape(9, -1), self.table[9:]])
        bias = table[self.where].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        q, k, v = (m(x).view(b, n, h, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


class CosineAttention(nn.Module):
    """Swin V2's attention: q and k normalised within each head (``F.normalize``), scaled by a
    per-head ``logit_scale.clamp(max=...).exp()``, plus a per-head bias an MLP makes from
    coordinates, added to the scores explicitly."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(heads, 1, 1) + 1))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads))
        self.register_buffer("coords", torch.randn(tokens * tokens, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=4.6).exp()
        bias = self.mlp(self.coords).view(n, n, -1).permute(2, 0, 1)
        y = (scores + 16 * torch.sigmoid(bias).unsqueeze(0)).softmax(-1) @ v
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))
