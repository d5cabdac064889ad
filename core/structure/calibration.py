"""Data-aware channel importance: APoZ, ThiNet-style regression and first-order Taylor.

Each takes calibration inputs as already-loaded tensors (one per program input, first axis =
samples) and returns a score per channel of every group, higher meaning keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx
from torch.nn import functional as F

from core.structure.graph import GraphAnalysis, Label
from core.structure.slicing import _get_tensor, _set_tensor, kept_by_space, label_indices

Calibration = tuple[torch.Tensor, ...]
_RELU_LIKE = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp_min", "threshold"}
_CHUNK = 64
_MAX_ROWS = 8192  # rows of consumer inputs kept for the least-squares refit
_MAX_MAPS = 64  # feature maps (samples) of convolution inputs kept for the refit


def _batches(inputs: Calibration) -> Iterator[tuple[torch.Tensor, ...]]:
    n = int(inputs[0].shape[0])
    for start in range(0, n, _CHUNK):
        yield tuple(t[start : start + _CHUNK] for t in inputs)


class _Recorder(fx.Interpreter):
    """Runs the graph and hands the outputs of ``watch``ed nodes to ``see``."""

    def __init__(
        self, gm: fx.GraphModule, watch: set[str], see: Callable[[str, torch.Tensor], None]
    ) -> None:
        super().__init__(gm)
        self.watch = watch
        self.see = see

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            self.see(n.name, out.detach())
        return out


def _per_channel(label: Label, value: torch.Tensor) -> torch.Tensor:
    """(channels, inner * everything else) view of an activation along its channel dim."""
    moved = value.movedim(label.dim, 0)
    channels = moved.shape[0] // label.inner
    return moved.reshape(channels, -1)


def _segments(analysis: GraphAnalysis, label: Label) -> Iterator[tuple[int, int, int]]:
    offset = 0
    for space in label.spaces:
        size = analysis.spaces[space].size
        yield analysis.root_of[space], offset, size
        offset += size


def apoz_scores(
    gm: fx.GraphModule, analysis: GraphAnalysis, inputs: Calibration
) -> dict[int, torch.Tensor]:
    """1 - average percentage of zeros (Hu et al., 2016) of each channel after its ReLUs.

    A channel that is zero on every calibration sample scores 0 and goes first.
    """
    relu_nodes = {
        n.name
        for n in gm.graph.nodes
        if n.name in analysis.node_labels
        and getattr(getattr(n.target, "overloadpacket", None), "__name__", "") in _RELU_LIKE
        and analysis.node_labels[n.name].unit == 1
    }
    zeros = {g.id: torch.zeros(g.size) for g in analysis.groups}
    counts = {g.id: torch.zeros(g.size) for g in analysis.groups}

    def see(name: str, value: torch.Tensor) -> None:
        label = analysis.node_labels[name]
        rows = _per_channel(label, value)
        for gid, start, size in _segments(analysis, label):
            part = rows[start : start + size]
            zeros[gid] += (part == 0).sum(dim=1).to(torch.float32)
            counts[gid] += part.shape[1]

    with torch.no_grad():
        recorder = _Recorder(gm, relu_nodes, see)
        for batch in _batches(inputs):
            recorder.run(*batch)
    return {gid: 1.0 - zeros[gid] / counts[gid].clamp_min(1) for gid in zeros}


def _consumers(
    gm: fx.GraphModule, analysis: GraphAnalysis
) -> list[tuple[str, str, str, Label, fx.Node]]:
    """(op, input node, weight target, input label, node) of every layer reading tracked
    channels."""
    out = []
    for node in gm.graph.nodes:
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        if name not in ("linear", "conv1d", "conv2d", "conv3d") or len(node.args) < 2:
            continue
        x, weight = node.args[0], node.args[1]
        if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
            continue
        label = analysis.node_labels.get(x.name)
        if weight.op == "get_attr" and label is not None and label.unit == 1:
            if name != "linear" and len(node.args) > 6 and node.args[6] != 1:
                continue  # depthwise: its weight is not a consumer of the channels
            out.append((name, x.name, str(weight.target), label, node))
    return out


def regression_scores(
    gm: fx.GraphModule, analysis: GraphAnalysis, inputs: Calibration
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """Each channel's share of the next layers' outputs on calibration data (ThiNet's objective,
    scored per channel): ``|W[:, c]|^2 * E[x_c^2]`` summed over every layer reading channel c.

    Also returns the consumers' sampled inputs (rows x features) for :func:`refit_linear`.
    """
    consumers = _consumers(gm, analysis)
    energy = {x_name: torch.zeros(0) for _, x_name, _, _, _ in consumers}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in energy}
    conv_inputs = {x_name for op, x_name, _, _, _ in consumers if op == "conv2d"}
    seen = dict.fromkeys(energy, 0)

    def see(name: str, value: torch.Tensor) -> None:
        label = analysis.node_labels[name]
        moved = value.movedim(label.dim, 0).reshape(value.shape[label.dim], -1)
        squares = moved.square().sum(dim=1)
        energy[name] = squares if energy[name].numel() == 0 else energy[name] + squares
        seen[name] += moved.shape[1]
        if name in conv_inputs and value.dim() == 4:
            # Whole feature maps: the refit unfolds them into the convolution's patches.
            if sum(r.shape[0] for r in rows[name]) < _MAX_MAPS:
                rows[name].append(value)
        elif label.dim == value.dim() - 1 and sum(r.shape[0] for r in rows[name]) < _MAX_ROWS:
            rows[name].append(value.reshape(-1, value.shape[-1]))

    with torch.no_grad():
        recorder = _Recorder(gm, set(energy), see)
        for batch in _batches(inputs):
            recorder.run(*batch)
    scores = {g.id: torch.zeros(g.size) for g in analysis.groups}
    for _, x_name, target, label, _ in consumers:
        weight = _get_tensor(gm, target).detach().to(torch.float32)
        columns = weight.movedim(1, 0).reshape(weight.shape[1], -1).square().sum(dim=1)
        mean_sq = energy[x_name] / max(seen[x_name], 1)
        per_position = columns * mean_sq[: columns.shape[0]]
        per_channel = per_position.reshape(-1, label.inner).sum(dim=1)
        for gid, start, size in _segments(analysis, label):
            scores[gid] += per_channel[start : start + size]
    captured = {name: torch.cat(r) for name, r in rows.items() if r}
    return scores, captured


def refit_linear(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    keep: dict[int, torch.Tensor],
    captured: dict[str, torch.Tensor],
) -> list[str]:
    """Least-squares refit of every linear layer and 2-d convolution that loses input channels,
    so its output on calibration data stays as close as possible to the unpruned one (ThiNet).
    Returns the layers refitted. The full weight is replaced (not updated in place), columns to
    drop included."""
    kept = kept_by_space(analysis, keep)
    sizes = {s.id: s.size for s in analysis.spaces}
    refitted = []
    for name, x_name, target, label, node in _consumers(gm, analysis):
        x = captured.get(x_name)
        if x is None or not any(s in kept for s in label.spaces):
            continue
        weight = _get_tensor(gm, target).detach()
        index = label_indices(label, kept, sizes)
        if name == "conv2d" and x.dim() == 4:
            patches = _patches(x, weight, node)
            if patches is None:
                continue
            # Unfolded columns are (channel, kh, kw) in that order: keep whole channels.
            span = weight.shape[2] * weight.shape[3]
            columns = (index[:, None] * span + torch.arange(span)[None, :]).reshape(-1)
            matrix = weight.reshape(weight.shape[0], -1)
            y = patches @ matrix.T
            solution = torch.linalg.lstsq(patches[:, columns].double(), y.double()).solution
            new_matrix = matrix.clone()
            new_matrix[:, columns] = solution.T.to(weight.dtype)
            new = new_matrix.reshape(weight.shape)
        elif name == "linear" and x.dim() == 2:
            y = x @ weight.T  # what the layer computed, bias aside
            solution = torch.linalg.lstsq(x[:, index].double(), y.double()).solution
            new = weight.clone()
            new[:, index] = solution.T.to(weight.dtype)
        else:
            continue
        _set_tensor(gm, target, new, analysis)
        refitted.append(target.removesuffix(".weight"))
    return refitted


def _patches(x: torch.Tensor, weight: torch.Tensor, node: fx.Node) -> torch.Tensor | None:
    """Rows of the convolution's input patches (samples x positions, channels x kernel)."""
    args = [*node.args, None, None, None, None, None, None, None]
    stride, padding, dilation = args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1]
    if not all(isinstance(v, (list, tuple)) for v in (stride, padding, dilation)):
        return None  # padding="same" and the like: keep the weights as they are
    unfolded = F.unfold(
        x,
        kernel_size=tuple(weight.shape[2:]),
        dilation=tuple(dilation),  # type: ignore[arg-type]
        padding=tuple(padding),  # type: ignore[arg-type]
        stride=tuple(stride),  # type: ignore[arg-type]
    )  # (N, C*kh*kw, L)
    rows = unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])
    if rows.shape[0] > _MAX_ROWS:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, _MAX_ROWS).long()]
    return rows


def taylor_scores(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    inputs: Calibration,
    targets: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """First-order Taylor importance (Molchanov et al., 2019): ``(sum over the group's weights of
    w * dL/dw)^2`` per channel, summed over calibration batches.

    Without ``targets`` the loss is cross-entropy against the model's own predictions (or half
    the squared output for non-classifier outputs), so no labels are needed.
    """
    params = dict(gm.named_parameters())
    members = [
        (m, params[m.target])
        for g in analysis.groups
        for m in g.members
        if m.target in params and m.role not in ("stat", "grouped_in")
    ]
    unique = {id(p): p for _, p in members}
    flags = {k: p.requires_grad for k, p in unique.items()}
    for p in unique.values():
        p.requires_grad_(True)
    scores = {g.id: torch.zeros(g.size) for g in analysis.groups}
    try:
        offset = 0
        for batch in _batches(inputs):
            for p in unique.values():
                p.grad = None
            out = gm(*batch)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if targets is not None:
                t = targets[offset : offset + batch[0].shape[0]]
                loss = F.cross_entropy(out, t) if not t.is_floating_point() else F.mse_loss(out, t)
            elif out.dim() == 2 and out.shape[1] > 1:
                loss = F.cross_entropy(out, out.detach().argmax(dim=1))
            else:
                loss = 0.5 * out.square().mean()
            offset += batch[0].shape[0]
            loss.backward()  # type: ignore[no-untyped-call]
            per_batch = {g.id: torch.zeros(g.size) for g in analysis.groups}
            for member, p in members:
                if p.grad is None:
                    continue
                wg = (p.detach() * p.grad).movedim(member.dim, 0)
                inner = member.label.inner
                for gid, start, size in _segments(analysis, member.label):
                    part = wg[start * inner : (start + size) * inner].reshape(size, -1)
                    per_batch[gid] += part.sum(dim=1)
            for gid, contribution in per_batch.items():
                scores[gid] += contribution.square()
    finally:
        for k, p in unique.items():
            p.grad = None
            p.requires_grad_(flags[k])
    return scores
