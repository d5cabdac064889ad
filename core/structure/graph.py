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

from core.structure.mha import MhaMatch, match_mha

# "grouped_in": the input dim of a grouped convolution's weight, sliced per group of rows.
Role = Literal["out", "in", "grouped_in", "norm", "stat", "bias", "param"]

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
    Conversely, after a reshape into attention heads each position of the heads dimension stands
    for ``unit`` consecutive channels (the head size).
    """

    dim: int
    spaces: tuple[int, ...]
    inner: int = 1
    unit: int = 1

    def moved(self, dim: int) -> Label:
        return Label(dim, self.spaces, self.inner, self.unit)


@dataclass(frozen=True)
class Member:
    """A parameter or buffer (``target`` in the module) sliced along ``dim`` by ``label``.

    For ``grouped_in`` the weight holds ``groups`` blocks of input channels side by side along
    ``dim``; output row ``o`` reads block ``o // (rows / groups)``.
    """

    target: str
    dim: int
    label: Label
    role: Role
    groups: int = 1


@dataclass(frozen=True)
class Rewrite:
    """A constant in ``node``'s arguments that holds the channel count of ``label``.

    ``arg`` is the position of the argument; ``index`` the position inside it when it is a list.
    """

    node: str
    arg: int
    index: int | None
    label: Label
    factor: int = 1  # the constant is the kept count times this (B*H for a static batch B)


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
    blocks: int = 1  # a grouped convolution needs as many channels removed from each block
    unit: int = 1  # channels per attention head when these channels are split into heads

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
            **({"heads": self.size // self.unit, "head_size": self.unit} if self.unit > 1 else {}),
            **({"equal_blocks": self.blocks} if self.blocks > 1 else {}),
        }


@dataclass
class GraphAnalysis:
    """The groups of one graph, plus the raw labels the slicing pass needs."""

    spaces: list[Space]
    groups: list[ChannelGroup]
    root_of: dict[int, int]  # space id -> group id
    node_labels: dict[str, Label] = field(default_factory=dict)  # node -> its channels

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
    def __init__(self, gm: fx.GraphModule, heads: bool) -> None:
        self.gm = gm
        self.heads = heads  # follow reshapes into attention heads instead of blocking them
        self.children: dict[int, tuple[int, ...]] = {}  # a space split by chunk -> its parts
        self.units: dict[int, int] = {}  # space -> head size
        self.blocks: dict[int, int] = {}  # space -> equal blocks a grouped conv needs
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

    def leaves(self, spaces: tuple[int, ...]) -> tuple[int, ...]:
        """Spaces with any split ones replaced by their parts."""
        out: list[int] = []
        for s in spaces:
            out.extend(self.leaves(self.children[s]) if s in self.children else (s,))
        return tuple(out)

    def union(self, a: Label, b: Label, why: str) -> None:
        a = Label(a.dim, self.leaves(a.spaces), a.inner, a.unit)
        b = Label(b.dim, self.leaves(b.spaces), b.inner, b.unit)
        sizes_a = [self.spaces[s].size for s in a.spaces]
        sizes_b = [self.spaces[s].size for s in b.spaces]
        if sizes_a != sizes_b or a.inner != b.inner or a.unit != b.unit:
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
        for s in self.leaves(label.spaces):
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
        matches = []
        internal: set[fx.Node] = set()
        if self.heads:
            for node in self.gm.graph.nodes:
                if node.op == "call_function" and _packet(node) == "linear":
                    match = match_mha(node)
                    if match is not None:
                        matches.append(match)
                        internal |= match.internal
        for node in self.gm.graph.nodes:
            if node in internal:
                self.labels[node] = None  # followed as a whole by _attach_mha
            elif node.op in ("placeholder", "get_attr"):
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

        for match in matches:
            self._attach_mha(match)

    def _attach_mha(self, m: MhaMatch) -> None:
        """q, k, v of a MultiheadAttention lose the same heads; out_proj loses their columns."""
        label = self.labels.get(m.in_proj)
        if not isinstance(label, Label) or len(self.leaves(label.spaces)) != 1:
            return
        (space,) = self.leaves(label.spaces)
        producer = self.spaces[space].producer
        q, k, v = (
            self.new_space(m.channels, producer, m.in_proj, label.dim).spaces[0] for _ in range(3)
        )
        self.children[space] = (q, k, v)
        for part in (q, k, v):
            self.units[part] = m.head_size
        self.union(Label(0, (q,), 1, m.head_size), Label(0, (k,), 1, m.head_size), "attention")
        self.union(Label(0, (q,), 1, m.head_size), Label(0, (v,), 1, m.head_size), "attention")
        self.member(m.out_proj.args[1], 1, Label(1, (v,)), "in")
        heads = Label(1, (q,), 1, m.head_size)
        self.rewrites.append(Rewrite(m.unflatten.name, 2, 1, Label(0, (q,))))
        for (view, batch_heads), back in zip(m.fold, m.unfold, strict=True):
            if isinstance(batch_heads, fx.Node):
                self.rewrites.append(Rewrite(batch_heads.name, 1, None, heads))
            else:
                factor = _int(batch_heads) // m.heads
                self.rewrites.append(Rewrite(view.name, 1, 1, heads, factor))
            self.rewrites.append(Rewrite(back.name, 1, 1, heads))
        self.rewrites.append(Rewrite(m.merge.name, 1, 1, Label(1, (v,))))

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
        first = next(lab for lab in labels if lab is not None)
        if dim == first.dim and first.inner == 1 and first.unit == 1:
            # An untracked tensor (a model input, say) joins with channels that all stay.
            for i, lab in enumerate(labels):
                if lab is None:
                    size = _static((_shape(tensors[i]) or ())[dim])
                    if size is None:
                        raise _Blocked(f"{node.name} concatenates a tensor of unknown width")
                    fixed = self.new_space(size, tensors[i].name, node, dim)
                    self.block(fixed, f"{tensors[i].name} is not produced by a prunable layer")
                    labels[i] = fixed
        elif dim != first.dim:
            # Along another dim (a class token joining the patch tokens): a parameter, maybe
            # expanded over the batch, is sliced with the channels.
            for i, lab in enumerate(labels):
                if lab is None and self._param_operand(node, tensors[i], first):
                    labels[i] = first
        if any(lab is None for lab in labels):
            raise _Blocked(f"{node.name} concatenates channels with an untracked tensor")
        known = [lab for lab in labels if lab is not None]
        if dim == known[0].dim:
            if any(
                lab.dim != dim or lab.inner != known[0].inner or lab.unit != known[0].unit
                for lab in known
            ):
                raise _Blocked(f"{node.name} concatenates channels of different layouts")
            spaces = tuple(s for lab in known for s in lab.spaces)
            return Label(dim, spaces, known[0].inner, known[0].unit)
        for lab in known[1:]:
            if lab.dim != known[0].dim:
                raise _Blocked(f"{node.name} concatenates channels on different dimensions")
            self.union(known[0], lab, node.name)
        return known[0]

    op_concat = op_cat

    def _param_operand(self, node: fx.Node, tensor: object, label: Label) -> bool:
        """Make a parameter (or ``expand`` of one) a member sliced like ``label``; False when
        ``tensor`` is neither."""
        if not isinstance(tensor, fx.Node):
            return False
        source, expand = tensor, None
        if (
            tensor.op == "call_function"
            and _packet(tensor) == "expand"
            and not tensor.users.keys() - {node}
        ):
            source, expand = _a(tensor)[0], tensor
        if self.param(source) is None:
            return False
        rank = len(_shape(tensor) or ())
        pos = label.dim - (rank - len(_shape(source) or ()))
        if pos < 0:
            return False
        self.member(source, pos, label.moved(pos), "param")
        if expand is not None:
            size = _a(expand)[1][label.dim]
            if isinstance(size, fx.Node):
                raise _Blocked(f"{expand.name} expands to a computed channel count")
            if isinstance(size, int) and size != -1:
                self.rewrites.append(Rewrite(expand.name, 1, label.dim, label))
        return True

    def _split(self, node: fx.Node) -> Any:
        label = self.label_of(_a(node)[0])
        val = node.meta.get("val")
        count = len(val) if isinstance(val, (list, tuple)) else 0
        if label is None:
            return tuple([None] * count) if count else None
        dim_arg = _a(node)[2] if len(_a(node)) > 2 else node.kwargs.get("dim", 0)
        if _norm_dim(_int(dim_arg), _rank(_a(node)[0])) == label.dim:
            return self._split_space(node, label, val)
        return tuple([label] * count)

    def _split_space(self, node: fx.Node, label: Label, parts: Any) -> tuple[Label, ...]:
        """Chunk along the channels (q/k/v, GLU halves): each part becomes a space of its own."""
        spaces = self.leaves(label.spaces)
        if len(spaces) != 1 or label.inner != 1 or label.unit != 1:
            raise _Blocked(f"{node.name} splits concatenated or flattened channels")
        (space,) = spaces
        if self.find(space) != space or any(
            self.find(o) == space for o in range(len(self.spaces)) if o != space
        ):
            raise _Blocked(f"{node.name} splits channels already coupled to others")
        sizes = [_static(p.shape[label.dim]) for p in parts]
        if (
            any(size is None for size in sizes)
            or sum(s for s in sizes if s) != self.spaces[space].size
        ):
            raise _Blocked(f"{node.name} splits the channels into parts of unknown size")
        producer = self.spaces[space].producer
        children = tuple(
            self.new_space(int(size or 0), producer, node, label.dim).spaces[0] for size in sizes
        )
        self.children[space] = children
        return tuple(Label(label.dim, (c,)) for c in children)

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
                if label.unit > 1:
                    # Heads merged back with their channels: (H, D) -> H*D.
                    if j == d + 1:
                        new = label.moved(k)
                    elif trailing == label.unit and label.inner == 1:
                        new = Label(k, label.spaces)
                    else:
                        raise _Blocked(f"{node.name} merges heads with other dimensions")
                else:
                    new = Label(k, label.spaces, label.inner * trailing)
                self._rewrite_size(node, op, k, new)
                return new
            j += 1
        head = self._split_heads(node, label, src[d], out, k)
        if head is not None:
            self._rewrite_size(node, op, k, head)
            return head
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

    def _split_heads(
        self, node: fx.Node, label: Label, size: object, out: Sequence[object], k: int
    ) -> Label | None:
        """(.., C, ..) -> (.., H, D, ..): with head pruning, a label over the H heads."""
        if not self.heads or label.inner != 1 or label.unit != 1 or k + 2 > len(out):
            return None
        head_size = _static(out[k + 1])
        if head_size is None or not _same([out[k], out[k + 1]], [size]):
            return None
        for s in self.leaves(label.spaces):
            if self.spaces[s].size % head_size or self.units.get(s, head_size) != head_size:
                raise _Blocked(f"{node.name} splits channels into heads of different sizes")
            self.units[s] = head_size
        return Label(k, label.spaces, 1, head_size)

    def _coupled_heads(self, node: fx.Node, tensors: Sequence[object]) -> Label:
        """q, k, v (or scores and v) of attention: head h of each goes with head h of the others."""
        labels = [self.label_of(t) for t in tensors]
        if not self.heads:
            raise _Blocked(f"{node.name} mixes channels within attention heads")
        known = [lab for lab in labels if lab is not None]
        if not known or len(known) != len(labels):
            raise _Blocked(f"{node.name} attends over heads it cannot follow")
        rank = _rank(tensors[0])
        for t, lab in zip(tensors, known, strict=True):
            if lab.unit == 1 or _rank(t) != rank or lab.dim != known[0].dim or lab.dim >= rank - 2:
                raise _Blocked(f"{node.name} attends over channels that are not whole heads")
        for lab in known[1:]:
            self.union(known[0], lab, node.name)
        return known[-1]

    def op_scaled_dot_product_attention(self, node: fx.Node) -> Label:
        args = _a(node)
        for extra in _nodes_in((args[3:], node.kwargs)):
            if self.labels.get(extra) is not None:
                raise _Blocked(f"{node.name} takes a mask sized by the heads")
        return self._coupled_heads(node, args[:3])

    def op_matmul(self, node: fx.Node) -> Label:
        return self._coupled_heads(node, _a(node)[:2])

    def op_masked_fill(self, node: fx.Node) -> Label | None:
        return self.binary(node)

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
            # Weight (in, out / groups, *kernel): the roles of dims 0 and 1 swap.
            out = self.new_space(int(wshape[1]) * groups, name, node, 1)
            if groups != 1 or (label is not None and (label.dim != 1 or label.unit != 1)):
                reason = f"{node.name}: grouped transposed convolutions are not supported yet"
                self.block(label, reason)
                self.block(out, reason)
                self._freeze_params(node, reason)
                return out
            if label is not None:
                self.member(weight, 0, label.moved(0), "in")
            self.member(weight, 1, out.moved(1), "out")
            if bias is not None:
                self.member(bias, 0, out.moved(0), "bias")
            return out
        if label is not None and (label.dim != 1 or label.unit != 1):
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
        # Grouped: block i of the inputs feeds block i of the outputs. Removing the same number
        # of channels from every block keeps ``groups``; each row then reads its own block's
        # surviving inputs (a per-block gather of the weight's input dim).
        out = self.new_space(out_channels, name, node, 1)
        self._need_blocks(out.spaces, groups)
        self.member(weight, 0, out.moved(0), "out")
        if bias is not None:
            self.member(bias, 0, out.moved(0), "bias")
        if label is not None:
            if label.inner != 1 or len(self.leaves(label.spaces)) != 1:
                reason = f"{node.name}: grouped convolution over concatenated channels"
                self.block(label, reason)
            else:
                self._need_blocks(label.spaces, groups)
                target = self.param(weight)
                if target is None:
                    raise _Blocked(f"{node.name}: the grouped weight is not a parameter")
                key = (target, 1)
                self.used_params.add(target)
                self.members[key] = Member(target, 1, label.moved(1), "grouped_in", groups)
        return out

    def _need_blocks(self, spaces: tuple[int, ...], groups: int) -> None:
        for s in self.leaves(spaces):
            self.blocks[s] = math.lcm(self.blocks.get(s, 1), groups)

    def op_conv1d(self, node: fx.Node) -> Label:
        return self._conv(node, 6, False)

    op_conv2d = op_conv1d
    op_conv3d = op_conv1d

    def op_conv_transpose1d(self, node: fx.Node) -> Label:
        return self._conv(node, 6, True)

    op_conv_transpose2d = op_conv_transpose1d
    op_conv_transpose3d = op_conv_transpose1d

    def op_convolution(self, node: fx.Node) -> Label:
        return self._conv(node, 8, bool(_a(node)[6]))

    def op_linear(self, node: fx.Node) -> Label:
        x, weight = _a(node)[0], _a(node)[1]
        bias = _a(node)[2] if len(_a(node)) > 2 else None
        label = self.label_of(x)
        rank = _rank(x)
        if label is not None:
            if label.dim != rank - 1 or label.unit != 1:
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
        if label.dim != 1 or label.inner != 1 or label.unit != 1:
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
        if label.dim != rank - 1 or len(shape) != 1 or label.inner != 1 or label.unit != 1:
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


def analyze(gm: fx.GraphModule, *, heads: bool = False) -> GraphAnalysis:
    """Build the channel dependency groups of ``gm`` (``ExportedProgram.module()``).

    With ``heads``, reshapes into attention heads are followed (channels then go by whole heads)
    instead of blocking their channels.
    """
    a = _Analyzer(gm, heads)
    a.run()
    # A space split by chunk lives on in its parts: its members and rewrites refer to them.
    for parent in list(a.children):
        for leaf in a.leaves((parent,)):
            for reason in a.blocked.get(parent, []):
                a.block(Label(0, (leaf,)), reason)

    def expand(label: Label) -> Label:
        return Label(label.dim, a.leaves(label.spaces), label.inner, label.unit)

    a.members = {
        key: Member(m.target, m.dim, expand(m.label), m.role, m.groups)
        for key, m in a.members.items()
    }
    a.rewrites = [Rewrite(r.node, r.arg, r.index, expand(r.label), r.factor) for r in a.rewrites]
    groups: dict[int, ChannelGroup] = {}
    root_of: dict[int, int] = {}
    live = [space for space in a.spaces if space.id not in a.children]
    for space in live:
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
        group.blocks = math.lcm(group.blocks, a.blocks.get(space.id, 1))
        unit = a.units.get(space.id, 1)
        if unit > 1 and group.unit not in (1, unit):
            group.blocked.append("split into heads of different sizes")
        group.unit = max(group.unit, unit)
    for member in a.members.values():
        # A concatenated label touches several groups; the member is listed by each of them.
        for gid in dict.fromkeys(root_of[s] for s in member.label.spaces):
            groups[gid].members.append(member)
            if member.target in a.frozen and a.frozen[member.target] not in groups[gid].blocked:
                groups[gid].blocked.append(a.frozen[member.target])
    for rewrite in a.rewrites:
        for gid in dict.fromkeys(root_of[s] for s in rewrite.label.spaces):
            groups[gid].rewrites.append(rewrite)
    for group in groups.values():
        if group.size % group.blocks:
            group.blocked.append(
                f"grouped convolutions need {group.blocks} equal blocks of {group.size} channels"
            )
    ordered = sorted(groups.values(), key=lambda g: g.id)
    node_labels = {
        node.name: expand(label) for node, label in a.labels.items() if isinstance(label, Label)
    }
    return GraphAnalysis(spaces=a.spaces, groups=ordered, root_of=root_of, node_labels=node_labels)
