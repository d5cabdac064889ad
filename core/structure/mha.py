"""``nn.MultiheadAttention`` as ``torch.export`` writes it, matched as a whole.

Its exported form folds the heads into the batch dimension (``view(q, [T, B*H, D])``), which
the label pass cannot follow op by op; the pattern is fixed, though, so head pruning recognises
it: in_proj linear -> unflatten(3, C) -> ... -> three selects (q, k, v) -> view/transpose/view
into heads -> scaled_dot_product_attention -> permute -> reshape -> out_proj linear. Anything that
deviates is left to the ordinary pass (which keeps the heads). The result is still checked
against the original by :func:`core.structure.slicing.verify`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx


@dataclass
class MhaMatch:
    in_proj: fx.Node  # the linear producing q, k, v side by side
    out_proj: fx.Node  # the linear reading the merged heads
    channels: int  # embed dim C
    heads: int  # H
    head_size: int  # D
    unflatten: fx.Node
    fold: list[tuple[fx.Node, object]]  # view(select, [T, B*H, D]) and its B*H argument
    unfold: list[fx.Node]  # view(transpose, [B, H, T, D]), in q, k, v order
    merge: fx.Node  # reshape(permute(sdpa), [T*B, C])
    internal: set[fx.Node] = field(default_factory=set)


def _packet(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    return ""


def _only_user(node: fx.Node, packet: str) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and _packet(users[0]) == packet:
        return users[0]
    return None


def match_mha(in_proj: fx.Node) -> MhaMatch | None:
    """The MultiheadAttention block starting at ``in_proj`` (a linear), or None."""
    weight = in_proj.args[1] if len(in_proj.args) > 1 else None
    if not (
        isinstance(weight, fx.Node)
        and weight.op == "get_attr"
        and str(weight.target).endswith("in_proj_weight")
    ):
        return None
    unflatten = _only_user(in_proj, "unflatten")
    if unflatten is None:
        return None
    parts = unflatten.args[2]
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] == 3):
        return None
    channels = parts[1]
    if not isinstance(channels, int):
        return None
    chain: list[fx.Node] = [unflatten]
    node = unflatten
    for packet in ("unsqueeze", "transpose", "squeeze", "contiguous"):
        nxt = _only_user(node, packet)
        if nxt is None:
            return None
        chain.append(nxt)
        node = nxt
    selects = list(node.users)
    if len(selects) != 3 or any(_packet(s) != "select" or s.args[1] != 0 for s in selects):
        return None
    selects.sort(key=lambda s: str(s.args[2]))
    if [s.args[2] for s in selects] != [0, 1, 2]:
        return None
    fold: list[tuple[fx.Node, object]] = []
    unfold: list[fx.Node] = []
    internal = set(chain) | set(selects)
    heads = head_size = None
    for select in selects:
        view = _only_user(select, "view")
        transpose = _only_user(view, "transpose") if view is not None else None
        back = _only_user(transpose, "view") if transpose is not None else None
        if view is None or transpose is None or back is None:
            return None
        size, back_size = view.args[1], back.args[1]
        if not (isinstance(size, (list, tuple)) and isinstance(back_size, (list, tuple))):
            return None
        if len(size) != 3 or len(back_size) != 4:
            return None
        h, d = back_size[1], size[2]
        if not isinstance(h, int) or not isinstance(d, int) or h * d != channels:
            return None
        if (heads, head_size) not in ((None, None), (h, d)):
            return None
        heads, head_size = h, d
        batch_heads = size[1]
        if isinstance(batch_heads, fx.Node):
            # B*H computed from the symbolic batch: operator.mul(batch, H).
            if batch_heads.target is not operator.mul or batch_heads.args[1] != h:
                return None
        elif not isinstance(batch_heads, int) or batch_heads % h:
            return None
        fold.append((view, batch_heads))
        unfold.append(back)
        internal |= {view, transpose, back}
    sdpa = _only_user(unfold[0], "scaled_dot_product_attention")
    if sdpa is None or list(sdpa.args[:3]) != unfold or (len(sdpa.args) > 3 and sdpa.args[3]):
        return None
    permute = _only_user(sdpa, "permute")
    merge = _only_user(permute, "reshape") if permute is not None else None
    out_proj = _only_user(merge, "linear") if merge is not None else None
    if permute is None or merge is None or out_proj is None:
        return None
    merged = merge.args[1]
    if not (isinstance(merged, (list, tuple)) and len(merged) == 2 and merged[1] == channels):
        return None
    out_weight = out_proj.args[1]
    if not (isinstance(out_weight, fx.Node) and out_weight.op == "get_attr"):
        return None
    internal |= {sdpa, permute, merge}
    if heads is None or head_size is None:
        return None
    return MhaMatch(
        in_proj, out_proj, channels, heads, head_size, unflatten, fold, unfold, merge, internal
    )
