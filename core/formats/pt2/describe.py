"""What a gated ``.pt2`` program looks like, from its JSON metadata only.

Inputs (names, shapes, dtypes, dynamic dimensions and their ranges), prunable layers and
the parameter count, read after every other check passed: nothing is loaded or evaluated.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from core.einsum import projection_dims
from core.errors import InvalidArchive, UnsafeArchive, UnsupportedFormat
from core.formats.base import DynamicDim, ModelInfo, ProgramInput, PrunableLayer
from core.formats.pt2.accessors import json_int, json_key, json_list, json_obj, json_str
from core.formats.pt2.constants import CONSTANTS_CONFIG, DTYPES, MODEL_JSON, WEIGHTS_CONFIG, M
from core.formats.pt2.expressions import EXPR_CONSTANTS, EXPR_FUNCS
from core.formats.pt2.payload import Payload


@dataclass(frozen=True)
class Pt2Info(ModelInfo):
    """What the gate learnt about a ``.pt2`` program, from its JSON metadata only."""

    prefix: str
    torch_version: str
    schema_version: str

    def details(self) -> dict[str, Any]:
        return {"torch_version": self.torch_version, "schema_version": self.schema_version}


_SUPPORTED_SCHEMA_MAJOR: Final = 8  # torch 2.13 refuses any other major version


# --- prunable layers -----------------------------------------------------------------------

_LAYER_OPS: Final[Mapping[str, str]] = {
    "torch.ops.aten.conv1d.default": "conv1d",
    "torch.ops.aten.conv1d.padding": "conv1d",
    "torch.ops.aten.conv2d.default": "conv2d",
    "torch.ops.aten.conv2d.padding": "conv2d",
    "torch.ops.aten.conv3d.default": "conv3d",
    "torch.ops.aten.conv3d.padding": "conv3d",
    "torch.ops.aten.conv_transpose1d.input": "conv_transpose1d",
    "torch.ops.aten.conv_transpose2d.input": "conv_transpose2d",
    "torch.ops.aten.conv_transpose3d.input": "conv_transpose3d",
    "torch.ops.aten.convolution.default": "",  # kind from the weight rank + transposed flag
}
_WEIGHT_RANK: Final[Mapping[str, int]] = {
    "conv1d": 3,
    "conv2d": 4,
    "conv3d": 5,
    "conv_transpose1d": 3,
    "conv_transpose2d": 4,
    "conv_transpose3d": 5,
    "linear": 2,
}


def describe(
    prefix: str,
    model: Mapping[str, Any],
    weights: Mapping[str, Payload],
    constants: Mapping[str, Payload],
) -> Pt2Info:
    version = json_obj(json_key(model, "schema_version", MODEL_JSON), f"{M}schema_version")
    major = json_int(json_key(version, "major", f"{M}schema_version"), f"{M}schema_version.major")
    minor = json_int(json_key(version, "minor", f"{M}schema_version"), f"{M}schema_version.minor")
    if major != _SUPPORTED_SCHEMA_MAJOR:
        raise UnsupportedFormat(
            f"The program was saved with export schema {major}.{minor}; this Shears reads "
            f"schema {_SUPPORTED_SCHEMA_MAJOR}.x (torch 2.13). Re-export it with a matching "
            "torch version."
        )
    torch_version = json_str(json_key(model, "torch_version", MODEL_JSON), f"{M}torch_version")
    gm = json_obj(json_key(model, "graph_module", MODEL_JSON), f"{M}graph_module")
    graph = json_obj(json_key(gm, "graph", f"{M}graph_module"), f"{M}graph_module.graph")
    signature = json_obj(
        json_key(gm, "signature", f"{M}graph_module"), f"{M}graph_module.signature"
    )
    specs = json_list(
        json_key(signature, "input_specs", f"{M}signature"), f"{M}signature.input_specs"
    )
    tensor_values = json_obj(
        json_key(graph, "tensor_values", f"{M}graph"), f"{M}graph.tensor_values"
    )
    ranges = json_obj(model.get("range_constraints", {}), f"{M}range_constraints")

    param_by_placeholder: dict[str, str] = {}
    user_level: list[tuple[str, Mapping[str, Any] | None]] = []
    for i, raw_spec in enumerate(specs):
        at = f"{M}signature.input_specs[{i}]"
        spec = json_obj(raw_spec, at)
        if len(spec) != 1:
            raise InvalidArchive(f"{at} must have exactly one kind.")
        kind, body_raw = next(iter(spec.items()))
        body = json_obj(body_raw, at)
        if kind == "parameter":
            placeholder = json_str(
                json_key(json_obj(json_key(body, "arg", at), at), "name", at), at
            )
            target = json_str(json_key(body, "parameter_name", at), at)
            entry = weights.get(target)
            if entry is None or not entry.is_param:
                raise InvalidArchive(f"Parameter {target!r} has no weight in {WEIGHTS_CONFIG}.")
            param_by_placeholder[placeholder] = target
        elif kind == "buffer":
            target = json_str(json_key(body, "buffer_name", at), at)
            persistent = body.get("persistent", True)
            store, store_name = (
                (weights, WEIGHTS_CONFIG) if persistent else (constants, CONSTANTS_CONFIG)
            )
            if target not in store:
                raise InvalidArchive(f"Buffer {target!r} has no tensor in {store_name}.")
        elif kind == "tensor_constant":
            target = json_str(json_key(body, "tensor_constant_name", at), at)
            if target not in constants:
                raise InvalidArchive(f"Constant {target!r} has no tensor in {CONSTANTS_CONFIG}.")
        elif kind == "custom_obj":
            raise UnsafeArchive(
                "The program takes a custom (torchbind) object, which only loads by "
                "unpickling; Shears does not accept it."
            )
        elif kind == "user_input":
            user_level.append(("user", json_obj(json_key(body, "arg", at), at)))
        elif kind == "constant_input":
            user_level.append((json_str(json_key(body, "name", at), at), None))
        elif kind != "token":
            raise InvalidArchive(f"{at} has unknown kind {kind!r}.")

    arg_names = _forward_arg_names(gm)
    use_arg_names = arg_names is not None and len(arg_names) == len(user_level)
    inputs: list[ProgramInput] = []
    for i, (_, arg) in enumerate(user_level):
        if arg is None:
            continue  # a Python constant baked into the program
        tensor_arg = arg.get("as_tensor")
        if not isinstance(tensor_arg, dict):
            raise UnsupportedFormat(
                f"Program input {i} is not a tensor ({sorted(arg)}); Shears supports programs "
                "whose inputs are tensors."
            )
        placeholder = json_str(
            json_key(tensor_arg, "name", f"{M}user input"), f"{M}user input name"
        )
        name = arg_names[i] if use_arg_names and arg_names is not None else placeholder
        meta = json_obj(
            json_key(tensor_values, placeholder, f"{M}graph.tensor_values"), placeholder
        )
        inputs.append(_describe_input(name, placeholder, meta, ranges))

    seen: set[str] = set()
    layers: list[PrunableLayer] = []
    nodes = json_list(json_key(graph, "nodes", f"{M}graph"), f"{M}graph.nodes")
    # A parameter seen through a transpose (``x @ W.t()``) still has its own layout.
    transposed: dict[str, str] = {}
    for i, raw_node in enumerate(nodes):
        at = f"{M}graph.nodes[{i}]"
        node = json_obj(raw_node, at)
        op = node.get("target")
        if not isinstance(op, str) or op not in (*_PROJECTIONS, *_TRANSPOSES, *_LAYER_OPS):
            continue
        node_inputs = {
            json_str(
                json_key(json_obj(item, f"{at}.inputs"), "name", f"{at}.inputs"), f"{at}.inputs"
            ): item
            for item in json_list(json_key(node, "inputs", at), f"{at}.inputs")
        }
        if op in _TRANSPOSES:
            source = param_by_placeholder.get(_tensor_input(node_inputs, "self", at) or "")
            out = _tensor_output(node, at)
            if (
                source is not None
                and out is not None
                and _swaps_2d(op, node_inputs, at)
                and (op != _NUMPY_T or len(weights[source].sizes) == 2)
            ):
                transposed[out] = source
            continue
        parameter: str | None
        if op in _PROJECTIONS:
            found = _projection_weight(op, node_inputs, at, param_by_placeholder, transposed)
            if found is None:
                continue
            parameter, reduction_dim = found
            layer_kind: str | None = "linear"
        else:
            weight_name = _tensor_input(node_inputs, "weight", at)
            parameter = param_by_placeholder.get(weight_name) if weight_name else None
            reduction_dim = 1
            layer_kind = None
        if parameter is None or parameter in seen:
            continue
        if parameter != "weight" and not parameter.endswith(".weight"):
            continue
        payload = weights[parameter]
        if layer_kind is None:
            layer_kind = _LAYER_OPS[op] or _convolution_kind(node_inputs, len(payload.sizes))
        if layer_kind is None:
            continue
        if len(payload.sizes) != _WEIGHT_RANK[layer_kind]:
            raise InvalidArchive(
                f"{parameter!r} is used by a {layer_kind} but has shape {list(payload.sizes)}."
            )
        seen.add(parameter)
        layers.append(
            PrunableLayer(
                name=parameter.removesuffix("weight").removesuffix("."),
                kind=layer_kind,
                shape=payload.sizes,
                params=payload.numel,
                reduction_dim=reduction_dim,
            )
        )

    # Tied parameters appear once per name in the config but share one storage view: count
    # them once, like sum(p.numel() for p in model.parameters()).
    distinct = {
        (p.path_name, p.dtype, p.sizes, p.strides, p.storage_offset)
        for p in weights.values()
        if p.is_param
    }
    num_parameters = sum(math.prod(sizes) for _, _, sizes, _, _ in distinct)

    return Pt2Info(
        format="pt2",
        prefix=prefix,
        num_parameters=num_parameters,
        inputs=tuple(inputs),
        prunable_layers=tuple(layers),
        torch_version=torch_version,
        schema_version=f"{major}.{minor}",
    )


# Linear layers spelt as a matrix product against a parameter (GPT-2's Conv1D is addmm), and the
# input naming their weight operand; einsum's operands are a list.
_PROJECTIONS: Final[Mapping[str, str]] = {
    "torch.ops.aten.linear.default": "weight",
    "torch.ops.aten.addmm.default": "mat2",
    "torch.ops.aten.mm.default": "mat2",
    "torch.ops.aten.matmul.default": "other",
    "torch.ops.aten.einsum.default": "tensors",
}
# ``W.T`` (Falcon's FalconLinear) reverses every dim: a swap for the matrices it is counted on.
_NUMPY_T: Final = "torch.ops.aten.numpy_T.default"
_TRANSPOSES: Final = frozenset(
    {
        "torch.ops.aten.t.default",
        "torch.ops.aten.transpose.int",
        "torch.ops.aten.permute.default",
        _NUMPY_T,
    }
)


def _tensor_input(node_inputs: Mapping[str, Any], name: str, at: str) -> str | None:
    arg = json_obj(node_inputs.get(name, {}), f"{at}.inputs").get("arg")
    tensor = arg.get("as_tensor") if isinstance(arg, dict) else None
    value = tensor.get("name") if isinstance(tensor, dict) else None
    return value if isinstance(value, str) else None


def _tensor_output(node: Mapping[str, Any], at: str) -> str | None:
    outputs = json_list(node.get("outputs", []), f"{at}.outputs")
    if len(outputs) != 1:
        return None
    tensor = json_obj(outputs[0], f"{at}.outputs").get("as_tensor")
    value = tensor.get("name") if isinstance(tensor, dict) else None
    return value if isinstance(value, str) else None


def _ints(node_inputs: Mapping[str, Any], name: str, at: str) -> list[int] | None:
    arg = json_obj(node_inputs.get(name, {}), f"{at}.inputs").get("arg")
    if not isinstance(arg, dict):
        return None
    if isinstance(arg.get("as_int"), int):
        return [arg["as_int"]]
    values = arg.get("as_ints")
    return values if isinstance(values, list) and all(isinstance(v, int) for v in values) else None


def _swaps_2d(op: str, node_inputs: Mapping[str, Any], at: str) -> bool:
    """Whether a transpose-like op swaps the two dims of a matrix."""
    if op in ("torch.ops.aten.t.default", _NUMPY_T):
        return True
    if op == "torch.ops.aten.permute.default":
        return [d % 2 for d in _ints(node_inputs, "dims", at) or []] == [1, 0]
    dims = [*(_ints(node_inputs, "dim0", at) or []), *(_ints(node_inputs, "dim1", at) or [])]
    return len(dims) == 2 and dims[0] % 2 != dims[1] % 2


def _projection_weight(
    op: str,
    node_inputs: Mapping[str, Any],
    at: str,
    params: Mapping[str, str],
    transposed: Mapping[str, str],
) -> tuple[str, int] | None:
    """The parameter a projection multiplies by, and its reduction (input-channel) dim."""
    if op == "torch.ops.aten.einsum.default":
        arg = json_obj(node_inputs.get("equation", {}), f"{at}.inputs").get("arg")
        equation = arg.get("as_string") if isinstance(arg, dict) else None
        listed = json_obj(node_inputs.get("tensors", {}), f"{at}.inputs").get("arg")
        operands = listed.get("as_tensors") if isinstance(listed, dict) else None
        if not isinstance(equation, str) or not isinstance(operands, list) or len(operands) != 2:
            return None
        for position in (1, 0):
            name = json_obj(operands[position], f"{at}.inputs").get("name")
            dims = projection_dims(equation, position)
            if not isinstance(name, str) or dims is None:
                continue
            if name in params:
                return params[name], dims[0]
            if name in transposed:
                return transposed[name], 1 - dims[0]
        return None
    name = _tensor_input(node_inputs, _PROJECTIONS[op], at)
    if name is None:
        return None
    # linear reads its weight as (out, in); the matrix products as (in, out).
    natural = 1 if op == "torch.ops.aten.linear.default" else 0
    if name in params:
        return params[name], natural
    if name in transposed:
        return transposed[name], 1 - natural
    return None


def _forward_arg_names(gm: Mapping[str, Any]) -> list[str] | None:
    graph = gm.get("module_call_graph")
    if not isinstance(graph, list):
        return None
    for entry in graph:
        if isinstance(entry, dict) and entry.get("fqn") == "":
            signature = entry.get("signature")
            if isinstance(signature, dict):
                names = signature.get("forward_arg_names")
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    return list(names)
    return None


def _describe_input(
    name: str, placeholder: str, meta: Mapping[str, Any], ranges: Mapping[str, Any]
) -> ProgramInput:
    at = f"{M}graph.tensor_values[{placeholder!r}]"
    dtype_code = json_int(json_key(meta, "dtype", at), f"{at}.dtype")
    if dtype_code not in DTYPES:
        raise InvalidArchive(f"{at} has unknown dtype code {dtype_code}.")
    shape: list[int] = []
    dynamic: list[DynamicDim] = []
    for dim, raw_size in enumerate(json_list(json_key(meta, "sizes", at), f"{at}.sizes")):
        where = f"{at}.sizes[{dim}]"
        size = json_obj(raw_size, where)
        if "as_int" in size:
            shape.append(json_int(size["as_int"], where))
            continue
        expr = json_obj(json_key(size, "as_expr", where), where)
        hint = json_obj(json_key(expr, "hint", where), f"{where}.hint")
        shape.append(json_int(json_key(hint, "as_int", f"{where}.hint"), f"{where}.hint"))
        low, high = _range_of(json_str(json_key(expr, "expr_str", where), where), ranges)
        dynamic.append(DynamicDim(dim=dim, min=low, max=high))
    return ProgramInput(
        name=name, shape=tuple(shape), dtype=DTYPES[dtype_code][0], dynamic_dims=tuple(dynamic)
    )


def _range_of(expr_str: str, ranges: Mapping[str, Any]) -> tuple[int, int | None]:
    """Find the range torch recorded for a dimension's expression.

    range_constraints is keyed by str(sympy expression) ("s77", "2*s39") while sizes hold
    sympy.srepr; a bare symbol is matched by name, a derived one by rebuilding it with sympy
    from the already-validated syntax tree (no eval). torch treats a missing entry as
    unbounded, so a size gets [0, None].
    """
    key = _str_of_expr(expr_str)
    entry = ranges.get(key) if key is not None else None
    if not isinstance(entry, dict):
        return 0, None
    low = entry.get("min_val")
    high = entry.get("max_val")
    low_int = low if isinstance(low, int) and not isinstance(low, bool) else 0
    high_int = high if isinstance(high, int) and not isinstance(high, bool) else None
    return max(0, low_int), high_int


def _str_of_expr(expr_str: str) -> str | None:
    tree = ast.parse(expr_str, mode="eval").body  # validated by check_sym_expr already
    if (
        isinstance(tree, ast.Call)
        and isinstance(tree.func, ast.Name)
        and tree.func.id == "Symbol"
        and tree.args
        and isinstance(tree.args[0], ast.Constant)
        and isinstance(tree.args[0].value, str)
    ):
        return tree.args[0].value
    try:
        return str(_build_sympy(tree))
    except Exception:
        return None


def _build_sympy(node: ast.expr) -> Any:
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    def lookup(name: str) -> Any:
        return getattr(torch_sympy, name, None) or getattr(sympy, name)

    def build(n: ast.expr) -> Any:
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            if n.id in EXPR_FUNCS or n.id in EXPR_CONSTANTS:
                return lookup(n.id)
            return sympy.Symbol(n.id, integer=True, positive=True)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -build(n.operand)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            func: Callable[..., Any] = lookup(n.func.id)
            kwargs = {k.arg: build(k.value) for k in n.keywords if k.arg is not None}
            return func(*(build(a) for a in n.args), **kwargs)
        raise ValueError("unsupported expression form")

    return build(node)


def _convolution_kind(node_inputs: Mapping[str, Any], rank: int) -> str | None:
    spatial = rank - 2
    if spatial not in (1, 2, 3):
        return None
    transposed_arg = json_obj(node_inputs.get("transposed", {}), f"{M}transposed input").get("arg")
    transposed = isinstance(transposed_arg, dict) and transposed_arg.get("as_bool") is True
    return f"conv_transpose{spatial}d" if transposed else f"conv{spatial}d"
