"""Channel dependency groups, built from the ATen graph of an unlifted exported program.

Every convolution, linear or embedding output starts a *channel space*. Walking the graph in
order, each tensor carries a :class:`Label` saying which of its dimensions holds channels of which
spaces. Ops either carry the label along (elementwise, norms, pooling, permutes, reshapes that
keep or flatten the channel dimension), *couple* spaces (two labelled tensors added: their
channels must be removed together, so the spaces are merged), *concatenate* them (a label lists
several spaces side by side), or *consume* them (the next conv/linear, whose input columns are
sliced). Whatever the pass does not understand blocks the spaces it touches, with a reason.

Every parameter or buffer a removal must slice is a :class:`Member` of the group; every constant
that holds a channel count (a reshape size, a ``layer_norm`` shape, a depthwise ``groups``) is a
:class:`Rewrite`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sympy
import torch
from torch import fx

Role = Literal["out", "in", "norm", "stat", "bias", "param"]

# Ops whose output has the input's shape and mixes nothing across channels.
_UNARY = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "relu6", "dropout", "clone",
    "contiguous", "detach", "alias", "_to_copy", "to", "abs", "neg", "exp", "sqrt", "rsqrt",
    "pow", "clamp", "clamp_min", "clamp_max", "square", "erf", "log", "log1p", "reciprocal",
    "lift_fresh_copy", "type_as", "feature_dropout", "alpha_dropout", "identity",
}  # fmt: skip
_BINARY = {"add", "sub", "mul", "div", "maximum", "minimum", "rsub", "true_divide"}
# Pooling over the spatial dims of (N, C, *spatial): channels pass through untouched.
_POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "pad",
    "constant_pad_nd",
}  # fmt: skip
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "var", "std"}
_RESHAPE = {"reshape", "view", "_unsafe_view", "flatten", "unflatten"}


@dataclass(frozen=True)
class Label:
    """Which channels a dimension of a tensor holds.

    ``spaces`` lie side by side along ``dim`` (a concatenation holds several); each channel
    occupies ``inner`` consecutive positions (``flatten`` of ``(C, H, W)`` gives ``inner = H*W``).
    """

    dim: int
    spaces: tuple[int, ...]
    inner: int = 1

    def moved(self, dim: int) -> Label:
        return Label(dim, self.spaces, self.inner)


@dataclass(frozen=True)
class Member:
    """A parameter or buffer (``target`` in the module) sliced along ``dim`` by ``label``."""

    target: str
    dim: int
    label: Label
    role: Role


@dataclass(frozen=True)
class Rewrite:
    """A constant in ``node``'s arguments that holds the channel count of ``label``.

    ``arg`` is the position of the argument; ``index`` the position inside it when it is a list.
    """

    node: str
    arg: int
    index: int | None
    label: Label


@dataclass
class Space:
    """The output channels of one producer (conv/linear/embedding), before coupling."""

    id: int
    size: int
    producer: str  # layer name: the weight's path without ".weight"
    node: str


@dataclass
class ChannelGroup:
    """Spaces whose channels must be removed together, and everything a removal touches."""

    id: int
    size: int
    spaces: list[int]
    layers: list[str]
    members: list[Member] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    normalized: bool = False  # a LayerNorm normalises over these channels

    @property
    def prunable(self) -> bool:
        return not self.blocked

    def describe(self) -> dict[str, Any]:
        """The group as the dry-run report shows it."""
        return {
            "id": self.id,
            "channels": self.size,
            "layers": self.layers,
            "members": sorted({f"{m.target}[dim {m.dim}]" for m in self.members}),
            "prunable": self.prunable,
            "blocked": self.blocked,
        }


@dataclass
class GraphAnalysis:
    """The groups of one graph, plus the raw labels the slicing pass needs."""

    spaces: list[Space]
    groups: list[ChannelGroup]
    root_of: dict[int, int]  # space id -> group id

    @property
    def groups_by_id(self) -> dict[int, ChannelGroup]:
        return {g.id: g for g in self.groups}

    def group_of_layer(self, layer: str) -> ChannelGroup | None:
        for group in self.groups:
            if layer in group.layers:
                return group
        return None


class _Blocked(Exception):
    """Raised inside an op handler: the labelled inputs of this node become unprunable."""


def _packet(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def _shape(node: object) -> tuple[Any, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether two products of (possibly symbolic) sizes are equal for every input size."""
    pa = math.prod((_expr(x) for x in a), start=sympy.Integer(1))
    pb = math.prod((_expr(x) for x in b), start=sympy.Integer(1))
    return bool(sympy.expand(pa - pb) == 0)


def _static(size: object) -> int | None:
    if isinstance(size, int):
        return size
    expr = _expr(size)
    return int(expr) if expr.is_Integer else None


class _Analyzer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.labels: dict[fx.Node, Any] = {}  # Label | None | tuple of them for tuple outputs
        self.members: dict[tuple[str, int], Member] = {}
        self.rewrites: list[Rewrite] = []
        self.blocked: dict[int, list[str]] = {}
        self.normalized: set[int] = set()
        self.frozen: dict[str, str] = {}  # parameter target -> why it cannot be sliced
        self.used_params: set[str] = set()

    # --- union-find over spaces -------------------------------------------------------------
    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: Label, b: Label, why: str) -> None:
        sizes_a = [self.spaces[s].size for s in a.spaces]
        sizes_b = [self.spaces[s].size for s in b.spaces]
        if sizes_a != sizes_b or a.inner != b.inner:
            self.block(a, f"{why}: channels meet with a different layout")
            self.block(b, f"{why}: channels meet with a different layout")
            return
        for x, y in zip(a.spaces, b.spaces, strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def block(self, label: Label | None, reason: str) -> None:
        if label is None:
            return
        for s in label.spaces:
            reasons = self.blocked.setdefault(s, [])
            if reason not in reasons:
                reasons.append(reason)

    def new_space(self, size: int, producer: str, node: fx.Node, dim: int) -> Label:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size, producer, node.name))
        self.parent.append(sid)
        return Label(dim, (sid,))

    # --- members ----------------------------------------------------------------------------
    def param(self, node: object) -> str | None:
        """The module path of a parameter/buffer argument, or None when it is not one."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return str(node.target)
        return None

    def member(self, node: object, dim: int, label: Label, role: Role) -> None:
        target = self.param(node)
        if target is None:
            if isinstance(node, fx.Node):
                # A computed tensor sized by the channels cannot be sliced: keep them all.
                self.block(label, f"{node.name} is sized by these channels but is not a parameter")
            return
        self.used_params.add(target)
        key = (target, dim)
        old = self.members.get(key)
        if old is not None:
            self.union(old.label, label, f"{target} is shared")
            return
        self.members[key] = Member(target, dim, label, role)

    # --- walking ----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.labels[node] = None
            elif node.op == "output":
                for arg in _nodes_in(_a(node)):
                    label = self.labels.get(arg)
                    for lab in _flat_labels(label):
                        self.block(lab, "reaches the model's outputs")
            elif node.op == "call_module" and str(node.target).startswith("_guards"):
                self.labels[node] = None
            elif node.op == "call_function":
                try:
                    self.labels[node] = self.visit(node)
                except _Blocked as exc:
                    for arg in _nodes_in((_a(node), node.kwargs)):
                        for lab in _flat_labels(self.labels.get(arg)):
                            self.block(lab, str(exc))
                    self.labels[node] = None
                    self._freeze_params(node, str(exc))
            else:
                for arg in _nodes_in((_a(node), node.kwargs)):
                    for lab in _flat_labels(self.labels.get(arg)):
                        self.block(lab, f"{node.op} {node.target} is not understood")
                self.labels[node] = None
                self._freeze_params(node, f"{node.op} {node.target} is not understood")

    def _freeze_params(self, node: fx.Node, why: str) -> None:
        for arg in _nodes_in((_a(node), node.kwargs)):
            target = self.param(arg)
            if target is not None:
                self.frozen.setdefault(target, f"{target} is also used by {node.name} ({why})")

    def label_of(self, node: object) -> Label | None:
        if not isinstance(node, fx.Node):
            return None
        label = self.labels.get(node)
        if isinstance(label, tuple):
            raise _Blocked(f"{node.name} is a tuple used as a tensor")
        return label

    def visit(self, node: fx.Node) -> Any:
        op = _packet(node)
        args = _a(node)
        if op == "getitem":
            source = self.labels.get(args[0])
            if isinstance(source, tuple):
                return source[int(args[1])]
            if source is not None:
                raise _Blocked(f"indexing into {node.name}")
            return None
        if op == "sym_size":
            label = self.label_of(args[0])
            if label is not None and _norm_dim(int(args[1]), _rank(args[0])) == label.dim:
                raise _Blocked(f"{node.name} reads the channel count")
            return None
        if not isinstance(node.target, torch._ops.OpOverload):
            # Python arithmetic on sizes (operator.mul on SymInts) carries no tensor.
            if any(isinstance(self.labels.get(a), Label) for a in _nodes_in(_a(node))):
                raise _Blocked(f"{node.target} is not understood")
            self._freeze_params(node, f"{node.target} is not understood")
            return None
        handler = getattr(self, f"op_{op}", None)
        if handler is not None:
            return handler(node)
        if op in _UNARY:
            return self.unary(node)
        if op in _BINARY:
            return self.binary(node)
        if op in _POOL:
            return self.pool(node)
        if op in _REDUCE:
            return self.reduce(node)
        if op in _RESHAPE:
            return self.reshape(node)
        labelled = [a for a in _nodes_in(_a(node)) if self.labels.get(a) is not None]
        if labelled:
            raise _Blocked(f"aten.{op} is not understood")
        self._freeze_params(node, f"aten.{op} is not understood")
        return None

    # --- handlers ---------------------------------------------------------------------------
    def unary(self, node: fx.Node) -> Label | None:
        for extra in _nodes_in((_a(node)[1:], node.kwargs)):
            if self.labels.get(extra) is not None or self.param(extra):
                raise _Blocked(f"{node.name} takes a second tensor")
        return self.label_of(_a(node)[0])

    def binary(self, node: fx.Node) -> Label | None:
        a, b = _a(node)[0], _a(node)[1] if len(_a(node)) > 1 else None
        out = _shape(node)
        if out is None:
            raise _Blocked(f"{node.name} has no known shape")
        rank = len(out)
        result: Label | None = None
        tensors = [x for x in (a, b) if isinstance(x, fx.Node)]
        labels = [(x, self.label_of(x)) for x in tensors]
        aligned = [(x, lab.moved(rank - _rank(x) + lab.dim) if lab else None) for x, lab in labels]
        for _, lab in aligned:
            if lab is None:
                continue
            if result is None:
                result = lab
            elif lab.dim != result.dim:
                raise _Blocked(f"{node.name} combines channels on different dimensions")
            else:
                self.union(result, lab, node.name)
        if result is None:
            return None
        for x, lab in aligned:
            if lab is not None:
                continue
            shape = _shape(x) or ()
            pos = result.dim - (rank - len(shape))
            if pos < 0 or _static(shape[pos]) == 1:
                continue  # broadcast along the channels: nothing to slice
            self.member(x, pos, result.moved(pos), "param")
        return result

    def pool(self, node: fx.Node) -> Any:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        rank = _rank(_a(node)[0])
        if _packet(node) in ("pad", "constant_pad_nd"):
            pads = _a(node)[1]
            touched = len(pads) // 2
            if label.dim >= rank - touched:
                raise _Blocked(f"{node.name} pads the channel dimension")
        elif label.dim != 1 or rank < 3:
            raise _Blocked(f"{node.name} pools over the channel dimension")
        if _packet(node) == "max_pool2d_with_indices":
            return (label, label)
        return label

    def reduce(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        rank = _rank(_a(node)[0])
        dims = _a(node)[1] if len(_a(node)) > 1 else None
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise _Blocked(f"{node.name} reduces over every dimension")
        dim_list = [dims] if isinstance(dims, int) else list(dims)
        reduced = {_norm_dim(_int(d), rank) for d in dim_list}
        if label.dim in reduced:
            raise _Blocked(f"{node.name} reduces over the channels")
        keepdim = bool(_a(node)[2]) if len(_a(node)) > 2 else bool(node.kwargs.get("keepdim"))
        if keepdim:
            return label
        return label.moved(label.dim - sum(1 for d in reduced if d < label.dim))

    def op_softmax(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is not None and _norm_dim(_int(_a(node)[1]), _rank(_a(node)[0])) == label.dim:
            raise _Blocked(f"{node.name} normalises over the channels")
        return label

    op_log_softmax = op_softmax
    op__softmax = op_softmax

    def op_permute(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        rank = _rank(_a(node)[0])
        dims = [_norm_dim(_int(d), rank) for d in _a(node)[1]]
        return label.moved(dims.index(label.dim))

    def op_transpose(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        rank = _rank(_a(node)[0])
        a, b = (_norm_dim(_int(d), rank) for d in _a(node)[1:3])
        if label.dim == a:
            return label.moved(b)
        if label.dim == b:
            return label.moved(a)
        return label

    def op_t(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        return None if label is None else label.moved(1 - label.dim)

    def op_unsqueeze(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        dim = _norm_dim(_int(_a(node)[1]), _rank(_a(node)[0]) + 1)
        return label.moved(label.dim + 1) if dim <= label.dim else label

    def op_squeeze(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        shape = _shape(_a(node)[0]) or ()
        rank = len(shape)
        if len(_a(node)) < 2:
            dims = [i for i, s in enumerate(shape) if _static(s) == 1]
        else:
            raw = _a(node)[1]
            dims = [
                _norm_dim(_int(d), rank) for d in (raw if isinstance(raw, (list, tuple)) else [raw])
            ]
            dims = [d for d in dims if _static(shape[d]) == 1]
        if label.dim in dims:
            raise _Blocked(f"{node.name} squeezes the channel dimension")
        return label.moved(label.dim - sum(1 for d in dims if d < label.dim))

    def op_select(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        dim = _norm_dim(_int(_a(node)[1]), _rank(_a(node)[0]))
        if dim == label.dim:
            raise _Blocked(f"{node.name} picks single channels")
        return label.moved(label.dim - 1) if dim < label.dim else label

    def op_slice(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        dim = _norm_dim(_int(_a(node)[1]) if len(_a(node)) > 1 else 0, _rank(_a(node)[0]))
        if dim == label.dim and _shape(node) != _shape(_a(node)[0]):
            raise _Blocked(f"{node.name} slices the channels")
        return label

    def op_expand(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        out_rank = len(_a(node)[1])
        moved = label.moved(out_rank - _rank(_a(node)[0]) + label.dim)
        size = _a(node)[1][moved.dim]
        if isinstance(size, int) and size != -1:
            self.rewrites.append(Rewrite(node.name, 1, moved.dim, moved))
        elif isinstance(size, fx.Node):
            raise _Blocked(f"{node.name} expands to a computed channel count")
        return moved

    def op_cat(self, node: fx.Node) -> Label | None:
        tensors = list(_a(node)[0])
        rank = _rank(tensors[0])
        dim = _norm_dim(_int(_a(node)[1]) if len(_a(node)) > 1 else 0, rank)
        labels = [self.label_of(t) for t in tensors]
        if all(lab is None for lab in labels):
            return None
        if any(lab is None for lab in labels):
            raise _Blocked(f"{node.name} concatenates channels with an untracked tensor")
        known = [lab for lab in labels if lab is not None]
        if dim == known[0].dim:
            if any(lab.dim != dim or lab.inner != known[0].inner for lab in known):
                raise _Blocked(f"{node.name} concatenates channels of different layouts")
            return Label(dim, tuple(s for lab in known for s in lab.spaces), known[0].inner)
        for lab in known[1:]:
            if lab.dim != known[0].dim:
                raise _Blocked(f"{node.name} concatenates channels on different dimensions")
            self.union(known[0], lab, node.name)
        return known[0]

    op_concat = op_cat

    def _split(self, node: fx.Node) -> Any:
        label = self.label_of(_a(node)[0])
        val = node.meta.get("val")
        count = len(val) if isinstance(val, (list, tuple)) else 0
        if label is None:
            return tuple([None] * count) if count else None
        dim_arg = _a(node)[2] if len(_a(node)) > 2 else node.kwargs.get("dim", 0)
        if _norm_dim(_int(dim_arg), _rank(_a(node)[0])) == label.dim:
            raise _Blocked(f"{node.name} splits the channels (attention heads are `head` pruning)")
        return tuple([label] * count)

    op_chunk = _split
    op_split = _split
    op_split_with_sizes = _split
    op_unbind = _split

    def reshape(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        src, out = _shape(_a(node)[0]), _shape(node)
        if src is None or out is None:
            raise _Blocked(f"{node.name} reshapes a tensor of unknown shape")
        d = label.dim
        k = _prefix_match(src[:d], out)
        if k is None or k >= len(out):
            raise _Blocked(f"{node.name} moves the channels across other dimensions")
        op = _packet(node)
        j = d + 1
        while j <= len(src):
            if _same(src[d:j], [out[k]]):
                # The channel dim is kept (j = d+1) or flattened with what follows it.
                trailing = math.prod(int(s) for s in src[d + 1 : j])
                new = Label(k, label.spaces, label.inner * trailing)
                self._rewrite_size(node, op, k, new)
                return new
            j += 1
        # The channel dimension is split; fine while only the inner part splits off.
        for e in range(k + 1, len(out) + 1):
            if _same(out[k:e], [src[d]]):
                tail = [_static(s) for s in out[k + 1 : e]]
                if any(t is None for t in tail):
                    break
                split = math.prod(t for t in tail if t is not None)
                if label.inner % split == 0:
                    new = Label(k, label.spaces, label.inner // split)
                    self._rewrite_size(node, op, k, new)
                    return new
                break
        raise _Blocked(f"{node.name} splits the channels (attention heads are `head` pruning)")

    def _rewrite_size(self, node: fx.Node, op: str, k: int, label: Label) -> None:
        if op in ("reshape", "view", "_unsafe_view"):
            size = _a(node)[1][k]
            if isinstance(size, int) and size != -1:
                self.rewrites.append(Rewrite(node.name, 1, k, label))
            elif isinstance(size, fx.Node):
                raise _Blocked(f"{node.name} reshapes to a computed channel count")
        elif op == "unflatten":
            start = _norm_dim(_int(_a(node)[1]), len(_shape(node) or ()))
            sizes = _a(node)[2]
            if start <= k < start + len(sizes):
                size = sizes[k - start]
                if isinstance(size, int) and size != -1:
                    self.rewrites.append(Rewrite(node.name, 2, k - start, label))
                elif isinstance(size, fx.Node):
                    raise _Blocked(f"{node.name} reshapes to a computed channel count")

    def _conv(self, node: fx.Node, groups_arg: int, transposed: bool) -> Label:
        x, weight, bias = _a(node)[0], _a(node)[1], _a(node)[2] if len(_a(node)) > 2 else None
        groups = _int(_a(node)[groups_arg]) if len(_a(node)) > groups_arg else 1
        label = self.label_of(x)
        wshape = _shape(weight) or (0, 0)
        out_channels = int(wshape[0])
        name = _layer_name(self.param(weight), node)
        if transposed:
            self.block(label, f"{node.name}: transposed convolutions are not supported yet")
            out = self.new_space(int(wshape[1]) * groups, name, node, 1)
            self.block(out, f"{node.name}: transposed convolutions are not supported yet")
            self._freeze_params(node, "transposed convolution")
            return out
        if label is not None and label.dim != 1:
            raise _Blocked(f"{node.name} convolves a tensor whose channels are not dim 1")
        in_channels = int((_shape(x) or (0, 0))[1])
        if groups == 1:
            if label is not None:
                self.member(weight, 1, label.moved(1), "in")
            out = self.new_space(out_channels, name, node, 1)
            self.member(weight, 0, out.moved(0), "out")
            if bias is not None:
                self.member(bias, 0, out.moved(0), "bias")
            return out
        if groups == in_channels == out_channels and label is not None and label.inner == 1:
            # Depthwise: each filter reads only its own channel, so the channels pass through
            # and ``groups`` must follow the kept count.
            self.member(weight, 0, label.moved(0), "out")
            if bias is not None:
                self.member(bias, 0, label.moved(0), "bias")
            self.rewrites.append(Rewrite(node.name, groups_arg, None, label))
            return label
        reason = f"{node.name}: grouped convolution (groups={groups}) keeps its channels"
        self.block(label, reason)
        out = self.new_space(out_channels, name, node, 1)
        self.block(out, reason)
        self._freeze_params(node, reason)
        return out

    def op_conv1d(self, node: fx.Node) -> Label:
        return self._conv(node, 6, False)

    op_conv2d = op_conv1d
    op_conv3d = op_conv1d

    def op_convolution(self, node: fx.Node) -> Label:
        return self._conv(node, 8, bool(_a(node)[6]))

    def op_linear(self, node: fx.Node) -> Label:
        x, weight = _a(node)[0], _a(node)[1]
        bias = _a(node)[2] if len(_a(node)) > 2 else None
        label = self.label_of(x)
        rank = _rank(x)
        if label is not None:
            if label.dim != rank - 1:
                raise _Blocked(f"{node.name} applies a linear layer across another dimension")
            self.member(weight, 1, label.moved(1), "in")
        size = int((_shape(weight) or (0,))[0])
        out = self.new_space(size, _layer_name(self.param(weight), node), node, rank - 1)
        self.member(weight, 0, out.moved(0), "out")
        if bias is not None:
            self.member(bias, 0, out.moved(0), "bias")
        return out

    def op_embedding(self, node: fx.Node) -> Label:
        weight = _a(node)[0]
        size = int((_shape(weight) or (0, 0))[1])
        out = self.new_space(size, _layer_name(self.param(weight), node), node, _rank(node))
        out = out.moved(len(_shape(node) or ()) - 1)
        self.member(weight, 1, out.moved(1), "out")
        return out

    def op_batch_norm(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        if label.dim != 1 or label.inner != 1:
            raise _Blocked(f"{node.name} normalises a dimension that is not the channels")
        roles: tuple[tuple[int, Role], ...] = ((1, "norm"), (2, "bias"), (3, "stat"), (4, "stat"))
        for i, role in roles:
            if len(_a(node)) > i and _a(node)[i] is not None:
                self.member(_a(node)[i], 0, label.moved(0), role)
        return label

    def op__native_batch_norm_legit_no_training(self, node: fx.Node) -> Any:
        label = self.op_batch_norm(node)
        return (label, None, None)

    def op_layer_norm(self, node: fx.Node) -> Label | None:
        label = self.label_of(_a(node)[0])
        if label is None:
            return None
        rank = _rank(_a(node)[0])
        shape = list(_a(node)[1])
        if label.dim < rank - len(shape):
            return label  # normalised over other dimensions only
        if label.dim != rank - 1 or len(shape) != 1 or label.inner != 1:
            raise _Blocked(f"{node.name} normalises over channels and other dimensions")
        ln_roles: tuple[tuple[int, Role], ...] = ((2, "norm"), (3, "bias"))
        for i, role in ln_roles:
            if len(_a(node)) > i and _a(node)[i] is not None:
                self.member(_a(node)[i], 0, label.moved(0), role)
        self.rewrites.append(Rewrite(node.name, 1, 0, label))
        for s in label.spaces:
            self.normalized.add(s)
        return label


def _a(node: fx.Node) -> tuple[Any, ...]:
    """A node's positional arguments, untyped: their types depend on the op's schema."""
    return tuple(node.args)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Blocked(f"expected a constant integer, got {value!r}")
    return value


def _seq(value: object) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _Blocked(f"expected a constant list, got {value!r}")
    return list(value)


def _nodes_in(tree: object) -> Iterator[fx.Node]:
    if isinstance(tree, fx.Node):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _nodes_in(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _nodes_in(item)


def _flat_labels(label: object) -> Iterator[Label]:
    if isinstance(label, Label):
        yield label
    elif isinstance(label, tuple):
        for item in label:
            yield from _flat_labels(item)


def _rank(node: object) -> int:
    shape = _shape(node)
    if shape is None:
        raise _Blocked(f"{node} has no known shape")
    return len(shape)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _prefix_match(prefix: Sequence[object], out: Sequence[object]) -> int | None:
    for k in range(len(out) + 1):
        if _same(prefix, out[:k]):
            return k
    return None


def _layer_name(target: str | None, node: fx.Node) -> str:
    if target is None:
        return node.name
    # Layer names are weight paths without ".weight", as in the archive's prunable layers.
    return target.removesuffix(".weight") if target.endswith(".weight") else target


def analyze(gm: fx.GraphModule) -> GraphAnalysis:
    """Build the channel dependency groups of ``gm`` (``ExportedProgram.module()``)."""
    a = _Analyzer(gm)
    a.run()
    groups: dict[int, ChannelGroup] = {}
    root_of: dict[int, int] = {}
    for space in a.spaces:
        root = a.find(space.id)
        root_of[space.id] = root
        group = groups.get(root)
        if group is None:
            group = groups[root] = ChannelGroup(id=root, size=space.size, spaces=[], layers=[])
        group.spaces.append(space.id)
        if space.producer not in group.layers:
            group.layers.append(space.producer)
        for reason in a.blocked.get(space.id, []):
            if reason not in group.blocked:
                group.blocked.append(reason)
        if space.id in a.normalized:
            group.normalized = True
    for member in a.members.values():
        # A concatenated label touches several groups; the member is listed by each of them.
        for gid in dict.fromkeys(root_of[s] for s in member.label.spaces):
            groups[gid].members.append(member)
            if member.target in a.frozen and a.frozen[member.target] not in groups[gid].blocked:
                groups[gid].blocked.append(a.frozen[member.target])
    for rewrite in a.rewrites:
        for gid in dict.fromkeys(root_of[s] for s in rewrite.label.spaces):
            groups[gid].rewrites.append(rewrite)
    ordered = sorted(groups.values(), key=lambda g: g.id)
    return GraphAnalysis(spaces=a.spaces, groups=ordered, root_of=root_of)
