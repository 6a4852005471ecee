"""The program's input signature: names, dtypes, static dims and ranges of dynamic dims."""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from service.archive.code_strings import Unsafe, check_sympy_expression, constant_int
from service.archive.layout import (
    LAYOUT_STRIDED,
    MODEL_JSON,
    SCALAR_TYPES,
    UNBOUNDED_MAX,
    DimSpec,
    InputSpec,
    refuse,
    schema_error,
)


class _NotMonotone(Exception):
    pass


def _eval_monotone(node: ast.AST, env: dict[str, int]) -> int:
    """Evaluate an expression that is non-decreasing in every symbol, else raise."""
    if isinstance(node, ast.Expression):
        return _eval_monotone(node.body, env)
    constant = constant_int(node)
    if constant is not None:
        return constant
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fn, args = node.func.id, node.args
        if fn == "Symbol" and args and isinstance(args[0], ast.Constant):
            if args[0].value not in env:
                raise _NotMonotone
            return env[args[0].value]
        values = [_eval_monotone(a, env) for a in args]
        if fn == "Add":
            return sum(values)
        if fn == "Mul" and all(
            constant_int(a) is None or (constant_int(a) or 0) > 0 for a in args
        ):
            out = 1
            for v in values:
                out *= v
            return out
        if fn in ("FloorDiv", "CeilDiv") and len(values) == 2 and constant_int(args[1]):
            divisor = constant_int(args[1]) or 0
            if divisor > 0:
                return -(-values[0] // divisor) if fn == "CeilDiv" else values[0] // divisor
        if fn == "Max":
            return max(values)
        if fn == "Min":
            return min(values)
    raise _NotMonotone


def _render(node: ast.AST) -> str:
    """Readable form of a srepr expression, close to sympy's str(): 2*s77, s77 + 1."""
    if isinstance(node, ast.Expression):
        return _render(node.body)
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fn, args = node.func.id, node.args
        if fn in ("Symbol", "Integer") and args:
            return str(args[0].value) if isinstance(args[0], ast.Constant) else _render(args[0])
        if fn == "Mul":
            return "*".join(_render(a) for a in args)
        if fn == "Add":
            consts = [a for a in args if constant_int(a) is not None]
            terms = [_render(a) for a in args if constant_int(a) is None]
            text = " + ".join(terms)
            for c in consts:
                value = constant_int(c) or 0
                text += f" - {-value}" if value < 0 else f" + {value}"
            return text
        if fn == "FloorDiv" and len(args) == 2:
            return f"(({_render(args[0])})//{_render(args[1])})"
        return f"{fn}({', '.join(_render(a) for a in args)})"
    return ast.unparse(node)


def _symbol_ranges(model: dict[str, Any]) -> dict[str, tuple[int | None, int | None]]:
    ranges: dict[str, tuple[int | None, int | None]] = {}
    raw = model.get("range_constraints") or {}
    if not isinstance(raw, dict):
        raise schema_error("range_constraints is not an object", model)
    for symbol, bounds in raw.items():
        if not isinstance(bounds, dict):
            raise schema_error(f"range_constraints[{symbol!r}] is not an object", model)
        lo, hi = bounds.get("min_val"), bounds.get("max_val")
        lo = lo if type(lo) is int else None
        hi = hi if type(hi) is int and hi < UNBOUNDED_MAX else None
        ranges[symbol] = (lo, hi)
    return ranges


def _dim(size: dict[str, Any], ranges: dict[str, tuple[int | None, int | None]]) -> DimSpec:
    if "as_int" in size:
        value = size["as_int"]
        if type(value) is not int:
            raise TypeError("as_int is not an int")
        return DimSpec(static=value, symbol=None, min=None, max=None, hint=value)
    expr = size["as_expr"]
    hint_obj = expr.get("hint") or {}
    hint = hint_obj.get("as_int") if isinstance(hint_obj, dict) else None
    tree = check_sympy_expression(expr["expr_str"])  # already checked; parsed again here
    body = tree.body
    if (isinstance(body, ast.Call) and isinstance(body.func, ast.Name)
            and body.func.id == "Symbol" and body.args
            and isinstance(body.args[0], ast.Constant) and isinstance(body.args[0].value, str)):
        symbol = body.args[0].value
        lo, hi = ranges.get(symbol, (None, None))
        return DimSpec(static=None, symbol=symbol, min=lo, max=hi, hint=hint)
    text = _render(tree)
    if text in ranges:
        lo, hi = ranges[text]
    else:
        # A derived dim (e.g. 2*s77) has no range of its own; when it grows with its symbols,
        # the root symbols' ends give its ends.
        try:
            lo = _eval_monotone(tree, {s: r[0] for s, r in ranges.items() if r[0] is not None})
        except _NotMonotone:
            lo = None
        try:
            hi = _eval_monotone(tree, {s: r[1] for s, r in ranges.items() if r[1] is not None})
        except _NotMonotone:
            hi = None
    return DimSpec(static=None, symbol=text, min=lo, max=hi, hint=hint, derived=True)


def arg_kind(arg: Any) -> str:
    if isinstance(arg, dict) and len(arg) == 1:
        return next(iter(arg))
    return "unknown"


def read_signature(
    model: dict[str, Any],
) -> tuple[tuple[InputSpec, ...], tuple[str, ...]]:
    try:
        graph_module = model["graph_module"]
        graph = graph_module["graph"]
        tensor_values = graph["tensor_values"]
        signature = graph_module["signature"]
        input_specs = signature["input_specs"]
        output_specs = signature["output_specs"]
    except (KeyError, TypeError) as exc:
        raise schema_error(f"missing {exc}", model) from None
    ranges = _symbol_ranges(model)
    inputs: list[InputSpec] = []
    # torch.export.save (torch 2.13) keeps no torch.export.Dim names: range_constraints and
    # every shape hold only the symbols (s77), so dims are labelled by where they first occur.
    labels: dict[str, str] = {}
    for index, spec in enumerate(input_specs):
        if isinstance(spec, dict) and "constant_input" in spec:
            # A non-tensor forward argument that export specialised: the program still expects
            # it in every call, but no profile or engine input can describe it.
            const = spec["constant_input"] or {}
            raise refuse("unsupported_input", f"input {const.get('name')!r} is a constant "
                         f"({arg_kind(const.get('value'))[3:]}) fixed at export time, not a "
                         "tensor; Kiln compiles programs whose inputs are all tensors. Make it "
                         "a module attribute or a tensor input and export again", index=index,
                         input=const.get("name"), kind="constant_input")
        if not isinstance(spec, dict) or "user_input" not in spec:
            continue
        arg = (spec["user_input"] or {}).get("arg")
        kind = arg_kind(arg)
        if kind != "as_tensor":
            inner = arg.get(kind) if isinstance(arg, dict) else None
            name = (inner.get("as_name") or inner.get("name")) if isinstance(inner, dict) else None
            raise refuse("unsupported_input", f"user input {index}"
                         f"{f' ({name!r})' if name else ''} is a {kind[3:] or kind}, not a "
                         "tensor; Kiln compiles programs whose inputs are all tensors. Export "
                         "with the value baked in, or pass it as a tensor", index=index,
                         input=name, kind=kind)
        assert isinstance(arg, dict)  # arg_kind saw a one-key dict
        name = arg["as_tensor"]["name"]
        try:
            meta = tensor_values[name]
            code = meta["dtype"]
            dims = tuple(_dim(size, ranges) for size in meta["sizes"])
        except (KeyError, TypeError) as exc:
            raise schema_error(f"tensor_values for input {name!r}: missing {exc}",
                               model) from None
        except Unsafe as exc:  # unreachable after check_program_strings; kept for safety
            raise refuse("archive_unsafe_expression", str(exc), entry=MODEL_JSON) from None
        dtype = SCALAR_TYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise refuse("unsupported_input", f"input {name!r} has dtype code {code!r}, which "
                         "Kiln does not know", input=name, dtype_code=code)
        if meta.get("layout", LAYOUT_STRIDED) != LAYOUT_STRIDED:
            raise refuse("unsupported_input", f"input {name!r} is not a dense (strided) tensor;"
                         " sparse and other layouts are not supported", input=name,
                         layout=meta.get("layout"))
        dims = tuple(
            dim if dim.static is not None else dataclasses.replace(
                dim, label=labels.setdefault(str(dim.symbol), f"dim {i} of {name}"))
            for i, dim in enumerate(dims))
        inputs.append(InputSpec(name=name, dtype=dtype, dims=dims))
    outputs: list[str] = []
    for spec in output_specs:
        if not isinstance(spec, dict) or "user_output" not in spec:
            continue
        arg = (spec["user_output"] or {}).get("arg")
        kind = arg_kind(arg)
        inner = arg.get(kind) if isinstance(arg, dict) else None
        if isinstance(inner, dict) and (inner.get("name") or inner.get("as_name")):
            outputs.append(str(inner.get("name") or inner.get("as_name")))
        else:
            outputs.append(kind)
    return tuple(inputs), tuple(outputs)

