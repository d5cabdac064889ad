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

Layout: :mod:`.model` (the result's types), :mod:`.analyzer` (the pass and its state),
:mod:`.registry` (op name -> handler; :func:`register_op` extends it), :mod:`.ops` (the built-in
handlers by family), :mod:`.nodes` (reading nodes and sizes).
"""

from core.structure.graph.analyzer import Analyzer, analyze
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
from core.structure.graph.nodes import Blocked
from core.structure.graph.registry import handler_for, register_op, registered_ops, unregister_op

__all__ = [
    "Analyzer",
    "Blocked",
    "ChannelGroup",
    "GraphAnalysis",
    "Label",
    "Member",
    "NodeLabel",
    "Parts",
    "Rewrite",
    "Role",
    "Space",
    "analyze",
    "handler_for",
    "register_op",
    "registered_ops",
    "unregister_op",
]
