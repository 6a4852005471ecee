"""Allowlists for the strings of an archive that torch turns into code.

torch *evaluates* some strings (``expr_str`` through ``sympy.sympify``, ``guards_code`` through
``exec``, pytree specs through ``importlib``) and *pastes* others into source it generates
(graph value names, parameter/buffer FQNs, node targets). Both kinds are checked here against
what ``torch.export`` itself writes.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

from service.archive.layout import MODEL_JSON, refuse, schema_error

# Calls that sympy's srepr writes for the shape expressions torch.export produces, plus the
# torch.utils._sympy functions the deserializer puts in sympify's namespace.
_SYMPY_CALLS = frozenset({
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max",
    "Min", "Abs", "floor", "ceiling", "sign", "Equality", "Unequality", "StrictLessThan",
    "LessThan", "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And",
    "Or", "Not", "Piecewise", "ExprCondPair", "ITE", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift",
    "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Infinity", "NegativeInfinity",
    "IntInfinity", "NegativeIntInfinity", "BooleanTrue", "BooleanFalse",
})
# What guards_code may call: tensor size accessors on L[...] and a few pure functions.
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_MATH = frozenset({"inf", "nan", "isnan", "isinf", "floor", "ceil", "trunc", "sqrt"})
_GUARD_CALLS = frozenset({"int", "float", "abs", "max", "min", "round", "bool",
                          "IsNonOverlappingAndDenseIndicator"})
_GUARD_NAMES = frozenset({"L", "math", "inf", "True", "False", "None"})
# srepr writes symbols as Symbol('s77', ...); bare names are only sympy's singletons.
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "pi", "E", "I", "int_oo",
                          "True", "False", "None"})
# String literals: a name (symbol names, L['x'] keys) or a number (Float('1.5')). No dots in
# names, so sympify cannot be handed an attribute chain inside a string.
# Number strings are bounded in digits and in exponent: Float('1e999999999') or
# Integer('9' * 10**6) would otherwise make sympy build huge numbers.
_SAFE_STRING = re.compile(r"^([A-Za-z][A-Za-z0-9_]{0,127}"
                          r"|[+-]?(\d{1,40}(\.\d{0,40})?|\.\d{1,40})([eE][+-]?\d{1,3})?)$")
_SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub,
              ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt,
              ast.GtE)
_POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_MAX_EXPR_CHARS = 8192
_MAX_EXPR_NODES = 2000
# sympy evaluates integer powers eagerly: a small file could otherwise ask for 10**(10**12).
_MAX_EXPONENT = 64


class Unsafe(Exception):
    pass


def constant_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "Integer" and len(node.args) == 1):
        return constant_int(node.args[0])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = constant_int(node.operand)
        return None if inner is None else -inner
    return None


def _exponent_size(node: ast.AST) -> int:
    """How many times a power multiplies its base: |exponent| for a constant, else refuse."""
    value = constant_int(node)
    if value is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in ("Float", "Rational") and node.args \
            and all(isinstance(a, ast.Constant) for a in node.args):
        try:  # Float('0.5'), Rational(1, 2): the magnitude, rounded up
            numbers = [float(a.value) for a in node.args]  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            raise Unsafe("exponent is not a number") from None
        magnitude = abs(numbers[0] / numbers[1]) if len(numbers) == 2 and numbers[1] else \
            abs(numbers[0])
        value = int(magnitude) + 1 if magnitude == magnitude else None
    if value is None:
        raise Unsafe("exponent is not a constant number (a power of a power, or of a symbol, "
                     "is not allowed)")
    if abs(value) > _MAX_EXPONENT:
        raise Unsafe(f"exponent {value} is too large")
    return abs(value)


def _check_powers(tree: ast.AST) -> None:
    """Bound every power, and the product of exponents of powers nested in a base.

    sympy evaluates integer powers eagerly, so ``2**3**100`` (right-associative),
    ``Pow(Pow(2, 64), 64)`` or a symbol exponent that a later substitution fills in would spin
    the loader; exponents stay constant and their nested product within ``_MAX_EXPONENT``.
    """
    def walk(node: ast.AST, factor: int) -> None:
        base_exp: tuple[ast.AST, ast.AST] | None = None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base_exp = (node.left, node.right)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in _POW_CALLS and len(node.args) == 2):
            base_exp = (node.args[0], node.args[1])
        if base_exp is None:
            for child in ast.iter_child_nodes(node):
                walk(child, factor)
            return
        base, exponent = base_exp
        factor *= max(_exponent_size(exponent), 1)
        if factor > _MAX_EXPONENT:
            raise Unsafe(f"nested powers raise to more than {_MAX_EXPONENT}")
        walk(base, factor)
        walk(exponent, factor)

    walk(tree, 1)


def _check_common(node: ast.AST) -> bool:
    """Nodes both grammars accept. Returns True when handled."""
    if isinstance(node, (ast.Expression, ast.Load, *_OPERATORS)):
        return True
    if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare)):
        return True
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, int, float)):
            if type(value) is int and abs(value) > 2**64:
                raise Unsafe("integer literal out of range")
            return True
        if isinstance(value, str) and _SAFE_STRING.match(value):
            return True
        raise Unsafe(f"constant {value!r:.40} is not allowed")
    return False


def _parse_expression(text: str) -> ast.Expression:
    if not isinstance(text, str):
        raise Unsafe("not a string")
    if len(text) > _MAX_EXPR_CHARS:
        raise Unsafe("expression too long")
    # No comments, line breaks, quotes that could close a string literal, or statement
    # separators: guards_code is pasted into generated source text, not only evaluated.
    if any(c in text for c in '#\n\r\\";@'):
        raise Unsafe("forbidden character")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise Unsafe(f"not an expression ({type(exc).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > _MAX_EXPR_NODES:
        raise Unsafe("expression too large")
    _check_powers(tree)
    return tree


def check_sympy_expression(text: str) -> ast.Expression:
    """Allow only the srepr-style sympy expressions torch.export writes as ``expr_str``.

    torch's deserializer passes ``expr_str`` to ``sympy.sympify``, which ``eval``s it: a plain
    ``__import__('os').system(...)`` runs during ``torch.export.load``.
    """
    tree = _parse_expression(text)
    for node in ast.walk(tree):
        if _check_common(node):
            continue
        if isinstance(node, ast.Name):
            if node.id not in _SYMPY_NAMES and node.id not in _SYMPY_CALLS:
                raise Unsafe(f"name {node.id!r} is not allowed")
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                raise Unsafe(f"call of {ast.unparse(node.func)[:40]!r} is not allowed")
        elif isinstance(node, ast.keyword):
            if node.arg is None or not _SAFE_NAME.match(node.arg):
                raise Unsafe("keyword argument is not allowed")
        else:
            raise Unsafe(f"{type(node).__name__} is not allowed")
    return tree


def check_guard(text: str) -> None:
    """Allow only size/stride comparisons in ``guards_code``.

    ``ExportedProgram.module()`` pastes every guard into Python source and ``exec``s it.
    """
    tree = _parse_expression(text)
    for node in ast.walk(tree):
        if _check_common(node):
            continue
        if isinstance(node, ast.Name):
            if node.id not in _GUARD_NAMES and node.id not in _GUARD_CALLS:
                raise Unsafe(f"name {node.id!r} is not allowed")
        elif isinstance(node, ast.Subscript):
            if not isinstance(node.slice, ast.Constant):
                raise Unsafe("only constant subscripts are allowed")
        elif isinstance(node, ast.Attribute):
            on_math = isinstance(node.value, ast.Name) and node.value.id == "math"
            if node.attr not in (_GUARD_MATH if on_math else _GUARD_METHODS):
                raise Unsafe(f"attribute {node.attr!r} is not allowed")
        elif isinstance(node, ast.Call):
            func = node.func
            ok = (isinstance(func, ast.Attribute)
                  or (isinstance(func, ast.Name) and func.id in _GUARD_CALLS))
            if not ok or node.keywords:
                raise Unsafe(f"call of {ast.unparse(func)[:40]!r} is not allowed")
        else:
            raise Unsafe(f"{type(node).__name__} is not allowed")


def walk_json(obj: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Yield (path, key, value) for every dict item in a JSON tree, without recursion."""
    stack: list[tuple[str, Any]] = [(path, obj)]
    while stack:
        here, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                yield here, key, item
                stack.append((f"{here}.{key}" if here else key, item))
        elif isinstance(value, list):
            stack.extend((f"{here}[{i}]", item) for i, item in enumerate(value))


def _unsafe_treespec(spec: Any) -> str | None:
    """Why a serialized pytree spec is unsafe to load, or None.

    ``treespec_loads`` imports ``fqn`` of any ``{"__enum__": ...}`` context object and, for
    defaultdicts, imports a module and takes an attribute that the file names.
    """
    if spec is None:
        return None
    try:
        tree = json.loads(spec) if isinstance(spec, str) else spec
    except (ValueError, RecursionError):
        return "not valid JSON"
    pending = [tree]
    while pending:
        for _, key, value in walk_json(pending.pop()):
            if key == "__enum__":
                return "enum context (imports a module named in the file)"
            if key == "type" and isinstance(value, str) and "defaultdict" in value:
                return "defaultdict context (imports a module named in the file)"
            if key == "context" and isinstance(value, str):
                try:
                    pending.append(json.loads(value))
                except (ValueError, RecursionError):
                    return "context is not valid JSON"
    return None


def check_program_strings(model: dict[str, Any]) -> None:
    for here, key, value in walk_json(model):
        if key == "expr_str":
            try:
                check_sympy_expression(value)
            except Unsafe as exc:
                raise refuse("archive_unsafe_expression", "a symbolic shape expression in "
                             f"models/model.json is not one torch.export writes ({exc}); "
                             "torch would evaluate it as Python, so the archive is refused",
                             entry=MODEL_JSON, where=here, expression=str(value)[:200]) from None
        elif key in ("in_spec", "out_spec"):
            reason = _unsafe_treespec(value)
            if reason:
                raise refuse("archive_unsafe_treespec", f"an input/output structure spec in "
                             f"models/model.json is not allowed: {reason}", entry=MODEL_JSON,
                             where=f"{here}.{key}", reason=reason)
    guards = model.get("guards_code") or []
    if not isinstance(guards, list):
        raise schema_error("guards_code is not a list", model)
    for i, guard in enumerate(guards):
        try:
            check_guard(guard)
        except Unsafe as exc:
            raise refuse("archive_unsafe_expression", f"guard {i} in models/model.json is not "
                         f"a shape check ({exc}); torch would run it as Python, so the archive "
                         "is refused", entry=MODEL_JSON, where=f"guards_code[{i}]",
                         expression=str(guard)[:200]) from None

