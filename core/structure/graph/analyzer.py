"""The pass: walk the graph in order, label every node through its op's handler, then group.

:class:`Analyzer` owns the state of one pass (channel spaces and their union-find, the labels of
nodes, members, rewrites, blocked reasons) and is the only surface handlers change it through.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from core.structure.graph.model import (
    ChannelGroup,
    GraphAnalysis,
    Label,
    Member,
    NodeLabel,
    Parts,
    Rewrite,
    Role,
    Space,
)
from core.structure.graph.nodes import Blocked, args_of, flat_labels, nodes_in, packet
from core.structure.graph.ops import attention, shape  # importing ops registers every handler
from core.structure.graph.registry import handler_for

# Handled whatever their target: tuple indexing (operator.getitem) and reading a size.
_STRUCTURAL = {"getitem", "sym_size"}


class Analyzer:
    """One pass over ``gm``; with ``heads``, reshapes into attention heads are followed."""

    def __init__(self, gm: fx.GraphModule, heads: bool) -> None:
        self.gm = gm
        self.heads = heads  # follow reshapes into attention heads instead of blocking them
        self._spaces: list[Space] = []
        self._parent: list[int] = []
        self._children: dict[int, tuple[int, ...]] = {}  # a space split by chunk -> its parts
        self._units: dict[int, int] = {}  # space -> head size
        self._blocks: dict[int, int] = {}  # space -> equal blocks a grouped conv needs
        self._labels: dict[fx.Node, NodeLabel] = {}
        self._members: dict[tuple[str, int], Member] = {}
        self._rewrites: list[Rewrite] = []
        self._blocked: dict[int, list[str]] = {}
        self._normalized: set[int] = set()
        self._frozen: dict[str, str] = {}  # parameter target -> why it cannot be sliced
        self._canonical, self._aliases = tied_names(gm)
        # (query heads, repeated key/value heads, where): grouped-query attention, settled once
        # the groups are known
        self._kv_links: list[tuple[Label, Label, str]] = []
        # Constants that hold how many times key/value heads are repeated and that no rewrite
        # of the heads dim holds (repeat_kv's expand size): with one key/value head they count
        # the query heads instead.
        self._repeat_sites: list[Rewrite] = []
        self.memo: dict[object, object] = {}  # what a handler worked out for later nodes

    # --- spaces and their coupling ----------------------------------------------------------
    def new_space(self, size: int, producer: str, node: fx.Node, dim: int) -> Label:
        """A fresh space of ``size`` channels on ``dim`` of ``node``'s output."""
        sid = len(self._spaces)
        self._spaces.append(Space(sid, size, producer, node.name))
        self._parent.append(sid)
        return Label(dim, (sid,))

    def space(self, sid: int) -> Space:
        return self._spaces[sid]

    def split_space(self, space: int, sizes: list[int], node: fx.Node, dim: int) -> tuple[int, ...]:
        """Split ``space`` into new spaces of ``sizes`` (chunk, q/k/v); it lives on in them."""
        producer = self._spaces[space].producer
        parts = tuple(self.new_space(size, producer, node, dim).spaces[0] for size in sizes)
        self._children[space] = parts
        return parts

    def find(self, s: int) -> int:
        """The space ``s`` is coupled to as its group's root."""
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def is_coupled(self, space: int) -> bool:
        """Whether ``space`` is coupled to any other space."""
        return self.find(space) != space or any(
            self.find(o) == space for o in range(len(self._spaces)) if o != space
        )

    def leaves(self, spaces: tuple[int, ...]) -> tuple[int, ...]:
        """Spaces with any split ones replaced by their parts."""
        out: list[int] = []
        for s in spaces:
            out.extend(self.leaves(self._children[s]) if s in self._children else (s,))
        return tuple(out)

    def union(self, a: Label, b: Label, why: str) -> None:
        """The channels of ``a`` and ``b`` go together (blocked when their layouts differ)."""
        a, b = self._expand(a), self._expand(b)
        sizes_a = [self._spaces[s].size for s in a.spaces]
        sizes_b = [self._spaces[s].size for s in b.spaces]
        if sizes_a != sizes_b or (a.inner, a.unit, a.repeat) != (b.inner, b.unit, b.repeat):
            self.block(a, f"{why}: channels meet with a different layout")
            self.block(b, f"{why}: channels meet with a different layout")
            return
        for x, y in zip(a.spaces, b.spaces, strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[ry] = rx

    def link_kv(self, query: Label, kv: Label, why: str) -> None:
        """Grouped-query attention: the heads of ``kv`` (repeated ``kv.repeat`` times) are read
        by the query heads of ``query``; removing a key/value head removes its query heads."""
        self._kv_links.append((self._expand(query), self._expand(kv), why))

    def block(self, label: Label | None, reason: str) -> None:
        """The channels of ``label`` must all stay, because of ``reason``."""
        if label is None:
            return
        for s in self.leaves(label.spaces):
            reasons = self._blocked.setdefault(s, [])
            if reason not in reasons:
                reasons.append(reason)

    def head_size(self, space: int) -> int | None:
        return self._units.get(space)

    def set_head_size(self, space: int, size: int) -> None:
        self._units[space] = size

    def need_blocks(self, spaces: tuple[int, ...], groups: int) -> None:
        """A grouped convolution: remove as many channels from each of ``groups`` blocks."""
        for s in self.leaves(spaces):
            self._blocks[s] = math.lcm(self._blocks.get(s, 1), groups)

    def mark_normalized(self, label: Label) -> None:
        """A LayerNorm normalises over these channels."""
        self._normalized.update(label.spaces)

    # --- what a removal touches -------------------------------------------------------------
    def param(self, node: object) -> str | None:
        """The module path of a parameter/buffer argument, or None when it is not one."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            # Tied tensors (GPT-2's wte and lm_head) are one member under their first name.
            target = str(node.target)
            return self._canonical.get(target, target)
        return None

    def member(self, node: object, dim: int, label: Label, role: Role) -> None:
        """Parameter ``node`` is sliced along ``dim`` with the channels of ``label``."""
        target = self.param(node)
        if target is None:
            if isinstance(node, fx.Node):
                # A computed tensor sized by the channels cannot be sliced: keep them all.
                self.block(label, f"{node.name} is sized by these channels but is not a parameter")
            return
        key = (target, dim)
        old = self._members.get(key)
        if old is not None:
            self.union(old.label, label, f"{target} is shared")
            if role == "in" and old.role != "in":
                # Tied (an embedding that is also the output projection): it also *reads* the
                # channels, so the masked reference must zero it as an input.
                self._members[key] = Member(target, dim, old.label, "in")
            return
        self._members[key] = Member(target, dim, label, role)

    def grouped_member(self, target: str, dim: int, label: Label, groups: int) -> None:
        """The input dim of a grouped convolution's weight (its last use describes it)."""
        self._members[(target, dim)] = Member(target, dim, label, "grouped_in", groups)

    def rewrite(
        self, node: fx.Node, arg: int, index: int | None, label: Label, factor: int = 1
    ) -> None:
        """Argument ``arg`` (at ``index`` in it) of ``node`` is the channel count of ``label``."""
        self._rewrites.append(Rewrite(node.name, arg, index, label, factor))

    def repeat_site(self, node: fx.Node, arg: int, index: int | None, label: Label) -> None:
        """Argument ``arg`` (at ``index``) of ``node`` holds how many times the key/value heads
        of ``label`` are repeated: the query head count under multi-query attention (one
        key/value head), where query heads can then go on their own."""
        self._repeat_sites.append(Rewrite(node.name, arg, index, label))

    def freeze_params(self, node: fx.Node, why: str) -> None:
        """Parameters ``node`` reads cannot be sliced: their groups are blocked."""
        for arg in nodes_in((args_of(node), node.kwargs)):
            target = self.param(arg)
            if target is not None:
                self._frozen.setdefault(target, f"{target} is also used by {node.name} ({why})")

    # --- labels -----------------------------------------------------------------------------
    def result_of(self, node: object) -> NodeLabel:
        """What ``node`` carries: a label, a tuple of them, or None (also for non-nodes)."""
        return self._labels.get(node) if isinstance(node, fx.Node) else None

    def label_of(self, node: object) -> Label | None:
        """The label of a tensor argument; a tuple used as a tensor blocks."""
        if not isinstance(node, fx.Node):
            return None
        label = self._labels.get(node)
        if isinstance(label, tuple):
            raise Blocked(f"{node.name} is a tuple used as a tensor")
        if isinstance(label, Parts):
            raise Blocked(f"{node.name} stacks q, k and v and is used as one tensor")
        return label

    def _block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in nodes_in((args_of(node), node.kwargs)):
            for lab in flat_labels(self._labels.get(arg)):
                self.block(lab, reason)

    # --- the pass ---------------------------------------------------------------------------
    def run(self) -> GraphAnalysis:
        """Label every node, then build the groups (once per analyzer)."""
        matches, internal = attention.find_mha(self.gm) if self.heads else ([], set())
        tables = shape.gathered_tables(self.gm) if self.heads else {}
        for node in self.gm.graph.nodes:
            if node in internal:
                self._labels[node] = None  # followed as a whole by attach_mha
            elif node in tables:
                self._labels[node] = shape.start_table(self, node, tables[node])
            elif node.op in ("placeholder", "get_attr"):
                self._labels[node] = None
            elif node.op == "output":
                for arg in nodes_in(args_of(node)):
                    for lab in flat_labels(self._labels.get(arg)):
                        self.block(lab, "reaches the model's outputs")
            elif node.op == "call_module" and str(node.target).startswith("_guards"):
                self._labels[node] = None
            elif node.op == "call_function":
                try:
                    self._labels[node] = self._visit(node)
                except Blocked as exc:
                    self._block_inputs(node, str(exc))
                    self._labels[node] = None
                    self.freeze_params(node, str(exc))
            else:
                why = f"{node.op} {node.target} is not understood"
                self._block_inputs(node, why)
                self._labels[node] = None
                self.freeze_params(node, why)
        for match in matches:
            attention.attach_mha(self, match)
        return self._analysis()

    def _visit(self, node: fx.Node) -> NodeLabel:
        op = packet(node)
        target = node.target
        namespace = target.namespace if isinstance(target, torch._ops.OpOverload) else None
        if namespace is None and op not in _STRUCTURAL:
            # Python arithmetic on sizes (operator.mul on SymInts) carries no tensor.
            if any(isinstance(self._labels.get(a), Label) for a in nodes_in(args_of(node))):
                raise Blocked(f"{target} is not understood")
            self.freeze_params(node, f"{target} is not understood")
            return None
        handler = handler_for(op, namespace)
        if handler is not None:
            return handler(self, node)
        # The default for an op without a handler: it blocks whatever channels it touches.
        why = f"{namespace or 'aten'}.{op} is not understood"
        if any(self._labels.get(a) is not None for a in nodes_in(args_of(node))):
            raise Blocked(why)
        self.freeze_params(node, why)
        return None

    # --- the result -------------------------------------------------------------------------
    def _expand(self, label: Label) -> Label:
        """``label`` with split spaces replaced by their parts."""
        return Label(label.dim, self.leaves(label.spaces), label.inner, label.unit, label.repeat)

    def _analysis(self) -> GraphAnalysis:
        # A space split by chunk lives on in its parts: its members and rewrites refer to them.
        for parent in list(self._children):
            for leaf in self.leaves((parent,)):
                for reason in self._blocked.get(parent, []):
                    self.block(Label(0, (leaf,)), reason)
        members = [
            Member(m.target, m.dim, self._expand(m.label), m.role, m.groups)
            for m in self._members.values()
        ]
        rewrites = [
            Rewrite(r.node, r.arg, r.index, self._expand(r.label), r.factor) for r in self._rewrites
        ]
        groups, root_of = self._groups()
        for member in members:
            # A concatenated label touches several groups; the member is listed by each of them.
            for gid in dict.fromkeys(root_of[s] for s in member.label.spaces):
                groups[gid].members.append(member)
                frozen = self._frozen.get(member.target)
                if frozen is not None and frozen not in groups[gid].blocked:
                    groups[gid].blocked.append(frozen)
        for rewrite in rewrites:
            for gid in dict.fromkeys(root_of[s] for s in rewrite.label.spaces):
                groups[gid].rewrites.append(rewrite)
        self._attach_kv(groups, root_of)
        for group in groups.values():
            if group.size % group.blocks:
                group.blocked.append(
                    f"grouped convolutions need {group.blocks} equal blocks of {group.size} "
                    "channels"
                )
        node_labels = {
            node.name: self._expand(label)
            for node, label in self._labels.items()
            if isinstance(label, Label)
        }
        return GraphAnalysis(
            spaces=self._spaces,
            groups=sorted(groups.values(), key=lambda g: g.id),
            root_of=root_of,
            node_labels=node_labels,
            aliases=self._aliases,
        )

    def _attach_kv(self, groups: dict[int, ChannelGroup], root_of: dict[int, int]) -> None:
        """Each key/value group follows one query group; the query group then goes by whole
        key/value groups (``unit`` = repeats x head size)."""
        for query, kv, why in self._kv_links:
            touched = [groups[root_of[s]] for s in (*query.spaces, *kv.spaces)]
            reason = None
            if len(query.spaces) != 1 or len(kv.spaces) != 1:
                reason = f"{why}: concatenated heads"
            else:
                q_group, kv_group = touched
                # As many query heads as the follower has heads (key/value heads of unit D, or
                # one bias entry per head), times the repeats.
                if q_group.size * kv.unit != kv_group.size * kv.repeat * query.unit:
                    reason = f"{why}: query and key/value heads do not line up"
                elif kv.unit > 1 and kv_group.size == kv.unit and kv.repeat > 1:
                    # Multi-query: the only key/value head stays, read by every query head
                    # that is left; the repeat counts then follow the query heads.
                    reason = self._multi_query(query, kv, q_group, kv_group, why)
                    if reason is None:
                        continue
                elif q_group.id == kv_group.id:
                    reason = f"{why}: keys repeated onto themselves"
                elif kv_group.follows not in (None, q_group.id) or (
                    q_group.kv and q_group.repeat != kv.repeat
                ):
                    reason = f"{why}: key/value heads shared by several attentions"
            if reason is not None:
                for g in touched:
                    if reason not in g.blocked:
                        g.blocked.append(reason)
                continue
            kv_group.follows = q_group.id
            if kv_group.id not in q_group.kv:
                q_group.kv.append(kv_group.id)
            q_group.repeat = kv.repeat
            q_group.unit = query.unit * kv.repeat
        # A blocked key/value group keeps its query heads, and the other way round.
        for group in list(groups.values()):
            linked = [group, *(groups[g] for g in group.kv)]
            reasons = [r for g in linked for r in g.blocked]
            for g in linked if len(linked) > 1 else ():
                g.blocked[:] = list(dict.fromkeys(reasons))

    def _multi_query(
        self, query: Label, kv: Label, q_group: ChannelGroup, kv_group: ChannelGroup, why: str
    ) -> str | None:
        """Let ``q_group`` lose heads alone, its repeat constants rewritten to the query heads
        kept, and keep ``kv_group``'s one head; the reason both stay where a repeat count is
        not a constant this can rewrite."""
        leaves = set(kv.spaces)
        mine = [r for r in self._repeat_sites if set(self.leaves(r.label.spaces)) <= leaves]
        # Sizes of the repeated heads dim: one head times the repeats, the query head count.
        sites = mine + [r for r in kv_group.rewrites if r.label.repeat > 1]
        if not sites or any(r.label.repeat != kv.repeat for r in sites):
            return f"{why}: one key/value head for every query head (multi-query)"
        heads = Label(0, query.spaces, 1, query.unit)
        keys = {(r.node, r.arg, r.index) for r in sites}
        kv_group.rewrites[:] = [
            r for r in kv_group.rewrites if (r.node, r.arg, r.index) not in keys
        ]
        for site in sites:
            rewrite = Rewrite(site.node, site.arg, site.index, heads, site.factor)
            if rewrite not in q_group.rewrites:
                q_group.rewrites.append(rewrite)
        kept = f"{why}: the one key/value head of multi-query attention stays"
        if kept not in kv_group.blocked:
            kv_group.blocked.append(kept)
        return None

    def _groups(self) -> tuple[dict[int, ChannelGroup], dict[int, int]]:
        """One group per root of the spaces that were not split, and each space's root."""
        groups: dict[int, ChannelGroup] = {}
        root_of: dict[int, int] = {}
        for space in self._spaces:
            if space.id in self._children:
                continue
            root = root_of[space.id] = self.find(space.id)
            group = groups.get(root)
            if group is None:
                group = groups[root] = ChannelGroup(id=root, size=space.size, spaces=[], layers=[])
            group.spaces.append(space.id)
            if space.producer not in group.layers:
                group.layers.append(space.producer)
            for reason in self._blocked.get(space.id, []):
                if reason not in group.blocked:
                    group.blocked.append(reason)
            if space.id in self._normalized:
                group.normalized = True
            group.blocks = math.lcm(group.blocks, self._blocks.get(space.id, 1))
            unit = self._units.get(space.id, 1)
            if unit > 1 and group.unit not in (1, unit):
                group.blocked.append("split into heads of different sizes")
            group.unit = max(group.unit, unit)
        return groups, root_of


def tied_names(gm: fx.GraphModule) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Every parameter/buffer name -> the first name of its tensor, and each tied tensor's first
    name -> all its names (only tensors with more than one)."""
    first: dict[tuple[object, ...], str] = {}
    names: dict[str, list[str]] = {}
    canonical: dict[str, str] = {}
    tensors = [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in tensors:
        # The same view of the same storage: a loaded program ties by storage, not by object.
        view = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        head = first.setdefault(view if tensor.numel() else (id(tensor),), name)
        canonical[name] = head
        names.setdefault(head, []).append(name)
    return canonical, {head: tuple(all_) for head, all_ in names.items() if len(all_) > 1}


def analyze(gm: fx.GraphModule, *, heads: bool = False) -> GraphAnalysis:
    """Build the channel dependency groups of ``gm`` (``ExportedProgram.module()``).

    With ``heads``, reshapes into attention heads are followed (channels then go by whole heads)
    instead of blocking their channels.
    """
    return Analyzer(gm, heads).run()
