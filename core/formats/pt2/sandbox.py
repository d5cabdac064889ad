"""Every string of ``models/model.json`` that torch turns into code or a callable.

``sympy.sympify`` ``eval()``s each ``expr_str`` (checked by :mod:`core.formats.pt2.expressions`);
``ExportedProgram.module()`` ``exec()``s ``guards_code``; node targets are resolved by
``getattr`` on ``torch``/``operator``. Each is accepted only in the forms torch writes.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final, NoReturn

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.accessors import json_list
from core.formats.pt2.constants import MODEL_JSON
from core.formats.pt2.expressions import (
    CODE_CHARS,
    MAX_EXPR_CHARS,
    MAX_POWS,
    check_sym_expr,
    parse_expression,
    plain_number,
    small_exponent,
)

# --- node targets --------------------------------------------------------------------------

_OPS_TARGET: Final = re.compile(
    r"torch\.ops\.(aten|prims)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)", re.ASCII
)
_HOP_TARGET: Final = re.compile(r"torch\.ops\.higher_order\.([A-Za-z_][A-Za-z0-9_]*)", re.ASCII)
# aten ops that touch the file system or the process-wide RNG when the program runs.
_FORBIDDEN_ATEN: Final = frozenset({"from_file", "save", "seed", "manual_seed"})
# Higher-order ops torch emits for plain models (control flow, no_grad/autocast regions,
# repeated submodules). Not: triton kernels, delegates, torchbind calls, effect tokens.
_HIGHER_ORDER_OPS: Final = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "invoke_subgraph",
    }
)
# Python-level targets torch writes for symbolic-shape arithmetic. An explicit list because
# "_operator" also holds attrgetter/methodcaller/call, which reach arbitrary objects.
_PYTHON_TARGETS: Final = frozenset(
    {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "truediv", "floordiv")}
    | {f"_operator.{name}" for name in ("mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt")}
    | {f"_operator.{name}" for name in ("le", "gt", "ge", "and_", "or_", "xor", "not_")}
    | {f"_operator.{name}" for name in ("invert", "lshift", "rshift")}
    | {f"torch.{name}" for name in ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min")}
    | {f"torch.{name}" for name in ("sym_sqrt", "sym_not", "sym_sum")}
    | {"math.trunc", "math.floor", "math.ceil"}
)


# --- guards_code (Python source exec'd by ExportedProgram.module()) -------------------------

_MAX_GUARDS: Final = 10_000
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_GUARD_CALLS: Final = frozenset(
    {
        "abs",
        "max",
        "min",
        "round",
        "int",
        "float",
        "IsNonOverlappingAndDenseIndicator",
        "cast_symbool_to_symint_guardless",
    }
)
_GUARD_MATH: Final = frozenset(
    {"floor", "ceil", "trunc", "sqrt", "log2", "inf", "nan", "pi", "e"}
    | {"cos", "cosh", "acos", "sin", "sinh", "asin", "tan", "tanh", "atan", "exp", "log"}
)
_GUARD_TORCH: Final = frozenset(
    {"sym_float", "sym_int", "sym_max", "sym_min", "sym_sqrt", "_sym_sqrt", "sym_not", "sym_ite"}
)
_GUARD_TENSOR_METHODS: Final = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_BINOPS: Final = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.LShift,
    ast.RShift,
    ast.BitAnd,
    ast.BitOr,
    ast.BitXor,
)
_GUARD_UNARYOPS: Final = (ast.USub, ast.UAdd, ast.Not, ast.Invert)
_GUARD_CMPOPS: Final = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


# --- the checks ----------------------------------------------------------------------------


def check_model_code(model: Mapping[str, Any]) -> None:
    """Validate every string of model.json that torch turns into code or a callable.

    The walk is generic so nested graphs (cond/map branches) are covered too. Only string
    values are checked: torch's schema decoder fails on any other type for these fields,
    and name-keyed maps (tensor_values, ...) hold objects, so an input that happens to be
    called "target" is not mistaken for a node target.
    """
    for key, value, where in _walk(model):
        if not isinstance(value, str):
            continue
        if key in ("target", "as_operator"):
            _check_target(value, where)
        elif key == "expr_str":
            check_sym_expr(value, where)
    guards = model.get("guards_code", [])
    guard_list = json_list(guards, "guards_code")
    if len(guard_list) > _MAX_GUARDS:
        raise InvalidArchive(f"{MODEL_JSON} has {len(guard_list)} guards.")
    for i, guard in enumerate(guard_list):
        _check_guard(guard, f"guards_code[{i}]")


def _walk(root: object) -> Iterator[tuple[str, object, str]]:
    """Yield (key, value, path) for every dict entry in a JSON tree, without recursion."""
    stack: list[tuple[object, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{path}.{key}" if path else str(key)
                yield str(key), value, child
                stack.append((value, child))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))


def _check_target(target: object, where: str) -> None:
    if not isinstance(target, str):
        raise InvalidArchive(f"{MODEL_JSON}: {where} is not a string.")
    shown = ascii(target)
    match = _OPS_TARGET.fullmatch(target)
    if match is not None:
        if match.group(1) == "aten" and match.group(2) in _FORBIDDEN_ATEN:
            raise UnsafeArchive(
                f"The program calls {shown}, which reads or writes files or global state; "
                "Shears refuses it."
            )
        return
    hop = _HOP_TARGET.fullmatch(target)
    if hop is not None and hop.group(1) in _HIGHER_ORDER_OPS:
        return
    if target in _PYTHON_TARGETS:
        return
    if target.startswith(("_operator.", "builtins.", "math.", "torch.")) and not target.startswith(
        "torch.ops."
    ):
        raise UnsafeArchive(
            f"The program calls the Python function {shown}, which Shears does not run."
        )
    raise InvalidArchive(
        f"The program uses the operator {shown}. Shears can only run standard PyTorch (aten) "
        "operators, not custom ops or anything that needs user code; re-export the model "
        "without custom operators."
    )


def _check_guard(guard: object, where: str) -> None:
    """Accept only shape guards over input sizes (ExportedProgram.module() exec()s them)."""
    if not isinstance(guard, str) or len(guard) > MAX_EXPR_CHARS or not CODE_CHARS.fullmatch(guard):
        raise UnsafeArchive(f"{MODEL_JSON}: {where} is not a plausible shape guard.")
    tree = parse_expression(guard, where)
    pows = 0

    def refuse() -> NoReturn:
        raise UnsafeArchive(
            f"{MODEL_JSON}: {where} is not a shape guard torch writes: {guard[:200]!a}. "
            "ExportedProgram.module() would execute it as Python code."
        )

    def is_input_ref(node: ast.expr) -> bool:
        # L['x'], L['x']['k'], L['xs'][0]: a user input, looked up by identifier or index.
        if not isinstance(node, ast.Subscript):
            return False
        key = node.slice
        if not isinstance(key, ast.Constant):
            return False
        if isinstance(key.value, str):
            if not _IDENTIFIER.fullmatch(key.value):
                return False
        elif not (isinstance(key.value, int) and not isinstance(key.value, bool)):
            return False
        if isinstance(node.value, ast.Name):
            return node.value.id == "L"
        return is_input_ref(node.value)

    def check(node: ast.expr) -> None:
        nonlocal pows
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                check(value)
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _GUARD_BINOPS):
                refuse()
            if isinstance(node.op, ast.Pow):
                pows += 1
                if pows > MAX_POWS or not small_exponent(node.right):
                    refuse()
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _GUARD_UNARYOPS):
                refuse()
            check(node.operand)
        elif isinstance(node, ast.Compare):
            if not all(isinstance(op, _GUARD_CMPOPS) for op in node.ops):
                refuse()
            check(node.left)
            for comparator in node.comparators:
                check(comparator)
        elif isinstance(node, ast.IfExp):
            check(node.test)
            check(node.body)
            check(node.orelse)
        elif isinstance(node, ast.Constant):
            if not plain_number(node.value):
                refuse()
        elif isinstance(node, ast.Subscript):
            # L['x'].size()[0], L['x'].stride()[1]
            if is_input_ref(node):
                return
            call = node.value
            if not (
                isinstance(node.slice, ast.Constant)
                and type(node.slice.value) is int
                and isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("size", "stride")
            ):
                refuse()
            check(call)
        elif isinstance(node, ast.Call):
            if node.keywords:
                refuse()
            func = node.func
            if isinstance(func, ast.Name):
                if func.id not in _GUARD_CALLS:
                    refuse()
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                allowed = {"math": _GUARD_MATH, "torch": _GUARD_TORCH}.get(func.value.id)
                if allowed is None or func.attr not in allowed:
                    refuse()
            elif isinstance(func, ast.Attribute):
                if func.attr not in _GUARD_TENSOR_METHODS or not is_input_ref(func.value):
                    refuse()
                if node.args:
                    refuse()
            else:
                refuse()
            for arg in node.args:
                check(arg)
        elif isinstance(node, ast.Attribute):
            # math.inf, math.pi
            if not (
                isinstance(node.value, ast.Name)
                and node.value.id == "math"
                and node.attr in _GUARD_MATH
            ):
                refuse()
        else:
            refuse()

    check(tree.body)
