"""Op handlers, registered by ATen op name.

A handler is a function ``(analyzer, node) -> NodeLabel``: it reads the labels of the node's
inputs (``analyzer.label_of``), records what the op does to their channels through the analyzer's
public methods (``union``, ``block``, ``new_space``, ``member``, ``rewrite``, ...), and returns the
label of the node's output, ``None`` when the output holds no channels. It raises
:class:`~core.structure.graph.nodes.Blocked` when the op does something to the channels it cannot
follow: every labelled input is then blocked with that reason.

Names are op packets without overload (``"conv2d"``, ``"add"``), optionally qualified by their
namespace (``"mylib::scaled_tanh"``); a qualified registration wins over a bare one. An op with no
handler blocks the channels it touches ("aten.cumsum is not understood").

Example, for an elementwise custom op::

    @register_op("mylib::scaled_tanh")
    def scaled_tanh(analyzer, node):
        return analyzer.label_of(node.args[0])  # channels pass through untouched

Registering a name that has a handler raises unless ``replace=True``; :func:`unregister_op`
removes the latest registration, bringing back the one it replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from torch import fx

from core.structure.graph.model import NodeLabel

if TYPE_CHECKING:
    from core.structure.graph.analyzer import Analyzer

Handler: TypeAlias = "Callable[[Analyzer, fx.Node], NodeLabel]"
H = TypeVar("H", bound=Handler)

# name -> its handlers, the latest last (earlier ones were replaced and come back on unregister)
_HANDLERS: dict[str, list[Handler]] = {}


def register_op(*names: str, replace: bool = False) -> Callable[[H], H]:
    """Decorator: ``handler`` follows the channels through the ops ``names``."""
    if not names:
        raise ValueError("register_op needs at least one op name")

    def register(handler: H) -> H:
        taken = [n for n in names if _HANDLERS.get(n)]
        if taken and not replace:
            raise ValueError(f"ops already have a handler (pass replace=True): {taken}")
        for name in names:
            _HANDLERS.setdefault(name, []).append(handler)
        return handler

    return register


def unregister_op(*names: str) -> None:
    """Remove the latest handler of each of ``names``; KeyError for a name without one."""
    missing = [n for n in names if not _HANDLERS.get(n)]
    if missing:
        raise KeyError(f"no handler registered for {missing}")
    for name in names:
        stack = _HANDLERS[name]
        stack.pop()
        if not stack:
            del _HANDLERS[name]


def handler_for(name: str, namespace: str | None = None) -> Handler | None:
    """The handler of op ``name`` (``namespace::name`` first), or None."""
    if namespace is not None:
        stack = _HANDLERS.get(f"{namespace}::{name}")
        if stack:
            return stack[-1]
    stack = _HANDLERS.get(name)
    return stack[-1] if stack else None


def registered_ops() -> list[str]:
    """Every op name with a handler, sorted."""
    return sorted(_HANDLERS)
