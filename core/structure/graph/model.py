"""What the channel analysis produces: labels, spaces, members, rewrites and groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# "grouped_in": the input dim of a grouped convolution's weight, sliced per group of rows.
Role = Literal["out", "in", "grouped_in", "norm", "stat", "bias", "param"]


@dataclass(frozen=True)
class Label:
    """Which channels a dimension of a tensor holds.

    ``spaces`` lie side by side along ``dim`` (a concatenation holds several); each channel
    occupies ``inner`` consecutive positions (``flatten`` of ``(C, H, W)`` gives ``inner = H*W``).
    Conversely, after a reshape into attention heads each position of the heads dimension stands
    for ``unit`` consecutive channels (the head size). Grouped-query attention's ``repeat_kv``
    then repeats each key/value head ``repeat`` times in a row: position ``h`` of the heads
    dimension is head ``h // repeat``.
    """

    dim: int
    spaces: tuple[int, ...]
    inner: int = 1
    unit: int = 1
    repeat: int = 1

    def moved(self, dim: int) -> Label:
        return Label(dim, self.spaces, self.inner, self.unit, self.repeat)


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
    # Grouped-query attention: the key and value groups whose heads go with these query heads,
    # and how many query heads read each; ``unit`` then spans one key/value head's query heads.
    kv: list[int] = field(default_factory=list)
    repeat: int = 1
    follows: int | None = None  # key/value heads: the query group they are removed with

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
            **(
                {"key_value_groups": self.kv, "query_heads_per_key_value_head": self.repeat}
                if self.kv
                else {}
            ),
            **({"follows_group": self.follows} if self.follows is not None else {}),
            **({"equal_blocks": self.blocks} if self.blocks > 1 else {}),
        }


@dataclass
class GraphAnalysis:
    """The groups of one graph, plus the raw labels the slicing pass needs."""

    spaces: list[Space]
    groups: list[ChannelGroup]
    root_of: dict[int, int]  # space id -> group id
    node_labels: dict[str, Label] = field(default_factory=dict)  # node -> its channels
    # A tied tensor's first name -> all its names: slicing one slices (and keeps tied) them all.
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def names_of(self, target: str) -> tuple[str, ...]:
        """Every name the tensor ``target`` (a member's target) goes by in the module."""
        return self.aliases.get(target, (target,))

    @property
    def groups_by_id(self) -> dict[int, ChannelGroup]:
        return {g.id: g for g in self.groups}

    def group_of_layer(self, layer: str) -> ChannelGroup | None:
        for group in self.groups:
            if layer in group.layers:
                return group
        return None


@dataclass(frozen=True)
class Parts:
    """A tensor whose dimension ``dim`` stacks parts of different channels: timm's fused
    ``qkv(x).reshape(B, N, 3, H, D)``, where position ``i`` along ``dim`` holds the heads of
    ``labels[i]`` (q, k, v). The labels' dims count ``dim`` too. Only ops that pick the parts
    apart (``unbind``, ``select`` along ``dim``) or move dims understand it; any other op sees a
    tensor it cannot follow and blocks the parts."""

    dim: int
    labels: tuple[Label, ...]


# What a node carries: a label, nothing, one per element of a tuple output (max_pool's values
# and indices, a split's parts), or stacked parts.
NodeLabel = Label | tuple[Label | None, ...] | Parts | None
