"""Symbolic shape expressions (``expr_str``): only the sympy forms torch writes.

``torch.export.load`` hands every ``expr_str`` to ``sympy.sympify``, which ``eval()``s it.
An expression is parsed with :mod:`ast` and accepted only when it is built from sympy and
torch constructors, shape symbols and plain literals, with small exponents. The literal
helpers here are shared with the guard checks of :mod:`core.formats.pt2.sandbox`.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Final, NoReturn

from core.errors import UnsafeArchive
from core.formats.pt2.constants import MODEL_JSON

# --- symbolic expressions (sympy.srepr, what serialize_sym_int writes) -----------------------

MAX_EXPR_CHARS: Final = 10_000
# Characters torch's printers use. Everything else is refused before parsing: comments (#) hide
# text from the syntax tree, newlines/quotes/backslashes could break out of the source line torch
# pastes a guard into, and Python NFKC-normalises non-ASCII identifiers (fullwidth "eval" is
# eval).
CODE_CHARS: Final = re.compile(r"[A-Za-z0-9_ ()\[\],.'=<>!+\-*/%&|^~]*", re.ASCII)
_MAX_LITERAL: Final = 2**63
# sympy evaluates powers of numbers eagerly ((2*s)**n expands 2**n): bound them so a crafted
# expression cannot stall torch.export.load (or this gate).
_MAX_POW_EXPONENT: Final = 64
MAX_POWS: Final = 3
_POW_FUNCS: Final = frozenset({"Pow", "PowByNatural", "FloatPow"})
# Callables that sympify may meet in a torch expression: sympy constructors plus the functions
# the torch deserializer registers (torch/_export/serde/serialize.py, sympy_functions). All are
# pure constructors of symbolic values.
EXPR_FUNCS: Final = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "IntInfinity",
        "NegativeIntInfinity",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    }
)
_EXPR_FUNC_PATTERN: Final = re.compile(
    r"OpaqueUnaryFn_[a-z0-9]+|BitwiseFn_bitwise_(?:and|or|xor)", re.ASCII
)
EXPR_CONSTANTS: Final = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo", "pi", "E"})
_SYMBOL_NAME: Final = re.compile(r"[a-z]+[0-9]+", re.ASCII)
_EXPR_STRING: Final = re.compile(r"[A-Za-z0-9_.+\-]{1,64}", re.ASCII)
_EXPR_KEYWORDS: Final = frozenset(
    {
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "infinite",
        "zero",
        "nonzero",
        "even",
        "odd",
        "rational",
        "commutative",
        "precision",
    }
)


def check_sym_expr(expr: object, where: str) -> None:
    """Accept only the sympy-constructor expressions torch writes (sympify eval()s them)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise UnsafeArchive(f"{MODEL_JSON}: {where} is not a plausible symbolic expression.")
    if not CODE_CHARS.fullmatch(expr):
        _refuse_expr(expr, where)
    tree = parse_expression(expr, where)
    pows = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or not (
                func.id in EXPR_FUNCS or _EXPR_FUNC_PATTERN.fullmatch(func.id)
            ):
                _refuse_expr(expr, where)
            for keyword in node.keywords:
                if keyword.arg not in _EXPR_KEYWORDS or not isinstance(keyword.value, ast.Constant):
                    _refuse_expr(expr, where)
            if func.id in _POW_FUNCS:
                pows += 1
                if pows > MAX_POWS or (len(node.args) == 2 and not small_exponent(node.args[1])):
                    _refuse_expr(expr, where)
        elif isinstance(node, ast.Name):
            if not (
                node.id in EXPR_FUNCS
                or _EXPR_FUNC_PATTERN.fullmatch(node.id)
                or node.id in EXPR_CONSTANTS
                or _SYMBOL_NAME.fullmatch(node.id)
            ):
                _refuse_expr(expr, where)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                if not _EXPR_STRING.fullmatch(node.value):
                    _refuse_expr(expr, where)
            elif not plain_number(node.value):
                _refuse_expr(expr, where)
        elif isinstance(node, ast.BinOp):
            # The older str() form ("s0 + 1"): arithmetic only.
            if not isinstance(
                node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
            ):
                _refuse_expr(expr, where)
            if isinstance(node.op, ast.Pow):
                pows += 1
                if pows > MAX_POWS or not small_exponent(node.right):
                    _refuse_expr(expr, where)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                _refuse_expr(expr, where)
        elif not isinstance(
            node, (ast.Expression, ast.keyword, ast.Load, ast.operator, ast.unaryop)
        ):
            _refuse_expr(expr, where)


def small_exponent(node: ast.expr) -> bool:
    """True for a symbolic exponent or a numeric literal small enough to expand cheaply.

    A constant exponent that is itself an expression (``9 ** 9``, ``Add(Integer(1), ...)``)
    is refused: torch never writes one, and it would be folded before anything bounds it.
    """
    if _is_symbolic(node):
        return True
    value = _literal_number(node)
    return value is not None and abs(value) <= _MAX_POW_EXPONENT


def _is_symbolic(node: ast.expr) -> bool:
    """Whether an expression depends on a shape symbol or a program input."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and _SYMBOL_NAME.fullmatch(sub.id):
            return True
        if isinstance(sub, ast.Name) and sub.id in ("Symbol", "L"):
            return True
    return False


def _literal_number(node: ast.expr) -> float | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _literal_number(node.operand)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value) if plain_number(node.value) else math.inf
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("Integer", "Float", "Rational")
        and node.args
    ):
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            try:
                return float(first.value)
            except ValueError:
                return math.inf
        return _literal_number(first)
    return None


def plain_number(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= _MAX_LITERAL
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def _refuse_expr(expr: str, where: str) -> NoReturn:
    raise UnsafeArchive(
        f"{MODEL_JSON}: {where} is not a symbolic shape expression torch writes: "
        f"{expr[:200]!a}. torch.export.load would evaluate it as Python code."
    )


def parse_expression(source: str, where: str) -> ast.Expression:
    try:
        return ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnsafeArchive(
            f"{MODEL_JSON}: {where} is not a valid expression: {source[:200]!a}."
        ) from exc
