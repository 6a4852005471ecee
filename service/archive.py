"""Inspect an uploaded ``.pt2`` (``torch.export.save`` output) without torch and without pickle.

The API host must never run code that an upload chose, so this module reads the zip's central
directory and the archive's JSON entries only. It refuses what ``torch.export.load`` would turn
into code execution before a worker ever sees the file:

- entries that torch unpickles with full pickle and that no check can make safe (custom
  TorchScript objects, opaque objects) and compiled code (``data/aotinductor/``, shared
  libraries). Pickled tensor entries are only *listed* here; the worker checks them with a
  restricted unpickler (``workers.program_guard``) before loading.
- strings that torch hands to ``eval``/``exec``: every symbolic-shape ``expr_str`` goes through
  ``sympy.sympify`` while loading, and every ``guards_code`` line is ``exec``-ed by
  ``ExportedProgram.module()``. Both must pass a small AST allowlist.
- pytree specs whose context asks ``importlib.import_module`` for a module named in the file.

It also reads the input signature and computes the three hashes the cache is keyed on.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service.errors import KilnError

MiB = 1024**2

# torch._export.serde.schema.ScalarType, by value. Written out rather than imported because
# this module must not import torch; tests/test_archive.py checks it against torch's own map.
SCALAR_TYPES: dict[int, str] = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    9: "complex32",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
    28: "uint16",
    29: "float8_e4m3fn",
    30: "float8_e5m2",
    31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz",
    33: "float8_e8m0fnu",
    34: "uint32",
    35: "uint64",
}
LAYOUT_STRIDED = 7
KNOWN_SCHEMA_MAJOR = 8

MODEL_NAME = "model"
MODEL_JSON = "models/model.json"
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS_DIR = "data/sample_inputs/"
SERIALIZATION_ID = ".data/serialization_id"
# Legacy (torch <= 2.7) weight/constant files: torch prefers them over the configs when present
# and loads them with a pickle fallback, so they would make weights_hash describe other bytes.
LEGACY_WEIGHTS = "data/weights/model.pt"
LEGACY_CONSTANTS = "data/constants/model.pt"

COMPILED_DIRS = ("data/aotinductor/",)
COMPILED_SUFFIXES = (".so", ".dll", ".dylib", ".cubin", ".fatbin", ".ptx", ".hsaco", ".exe")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")
# torch loads these constants with torch._C._pickle_load_obj (TorchScript unpickler) and
# pickle.loads: no restricted loader exists for them, so they are refused, not verified.
UNVERIFIABLE_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")

# Older exports wrote sys.maxsize - 1 for "no upper bound" before int_oo serialised as null.
_UNBOUNDED_MAX = sys.maxsize - 1
# Generous bytes per central-directory record (46 fixed + name + extra + comment).
_MAX_CD_RECORD = 4096


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds checked against the zip's central directory before any entry is read.

    The compression-ratio rule applies per entry, and only to entries whose declared size is
    above ``ratio_check_min_bytes``: a small entry cannot expand to anything harmful (the total
    is bounded by ``max_uncompressed_bytes`` anyway), while tiny JSON files routinely compress
    10-50x. ``torch.export.save`` stores every entry uncompressed (ratio 1), so only archives
    re-zipped by hand can come near the limit.
    """

    max_entries: int = 10_000
    max_uncompressed_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 200.0
    ratio_check_min_bytes: int = 1 * MiB
    max_json_bytes: int = 256 * MiB


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class DimSpec:
    static: int | None
    symbol: str | None
    min: int | None
    max: int | None
    hint: int | None
    derived: bool = False

    def to_json(self) -> int | dict[str, Any]:
        if self.static is not None:
            return self.static
        out: dict[str, Any] = {"symbol": self.symbol, "min": self.min, "max": self.max}
        if self.derived:
            out["derived"] = True
        return out


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    dims: tuple[DimSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d.to_json() for d in self.dims],
            "example_shape": [d.hint for d in self.dims],
        }


@dataclass(frozen=True)
class ArchiveInfo:
    model_hash: str
    graph_hash: str
    weights_hash: str
    torch_version: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    pickled_entries: tuple[str, ...]
    entry_count: int
    uncompressed_bytes: int
    schema_version: str = ""
    # (entry name without root folder, sha256 hex) for every file entry, sorted. The worker
    # compares these with what torch's own zip reader returns, so a zip crafted to read
    # differently in Python's zipfile and in torch's miniz cannot slip past these checks.
    entry_sha256: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model_hash": self.model_hash,
            "graph_hash": self.graph_hash,
            "weights_hash": self.weights_hash,
            "torch_version": self.torch_version,
            "schema_version": self.schema_version,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": list(self.outputs),
            "pickled_entries": list(self.pickled_entries),
            "entry_count": self.entry_count,
            "uncompressed_bytes": self.uncompressed_bytes,
        }


def _refuse(code: str, message: str, **details: Any) -> KilnError:
    return KilnError(code, message, 400, details)


# --------------------------------------------------------------------------------------------
# Zip directory


def _directory_size(fh: Any, file_size: int) -> tuple[int, int]:
    """(entry count, central directory bytes) from the end-of-central-directory record.

    Read before ``zipfile`` builds a ZipInfo per entry, so a directory of millions of entries is
    refused without the memory it would take to list it. ``zipfile._EndRecData`` is private, but
    it is the function ``ZipFile`` itself uses to find the record (fast path, comment search,
    zip64 override): with a parser of our own, a crafted tail could make the two read different
    records.
    """
    if file_size < 22:
        raise _refuse("not_a_zip", "the upload is not a zip archive (too short); upload the "
                      "file written by torch.export.save", size=file_size)
    try:
        endrec = zipfile._EndRecData(fh)
    except (zipfile.BadZipFile, OSError, struct.error) as exc:
        raise _refuse("not_a_zip", f"the upload is not a readable zip archive ({exc})") from None
    if endrec is None:
        raise _refuse("not_a_zip", "the upload is not a zip archive, or it is truncated; upload "
                      "the complete file written by torch.export.save")
    return int(endrec[zipfile._ECD_ENTRIES_TOTAL]), int(endrec[zipfile._ECD_SIZE])


_DRIVE = re.compile(r"^[A-Za-z]:")


def _path_problem(name: str) -> str | None:
    if not name:
        return "empty name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE.match(name):
        return "drive letter"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "control character in name"
    parts = name.rstrip("/").split("/")
    if any(p == ".." for p in parts):
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component"
    return None


def _file_type(info: zipfile.ZipInfo) -> int:
    return stat.S_IFMT(info.external_attr >> 16)


def _check_directory(
    infos: list[zipfile.ZipInfo], limits: ArchiveLimits
) -> tuple[str, dict[str, zipfile.ZipInfo], int]:
    """Every check that needs only the central directory. Returns (root, entries, total)."""
    seen: set[str] = set()
    total = 0
    roots: set[str] = set()
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        problem = _path_problem(name)
        if problem:
            raise _refuse("archive_unsafe_path", f"archive entry {name!r} has an unsafe name "
                          f"({problem}); upload the file exactly as torch.export.save wrote it",
                          entry=name, reason=problem)
        ftype = _file_type(info)
        if ftype == stat.S_IFLNK:
            raise _refuse("archive_link", f"archive entry {name!r} is a symbolic link; links are "
                          "not allowed in uploaded programs", entry=name)
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse("archive_link", f"archive entry {name!r} is not a regular file "
                          f"(mode {oct(ftype)}); only files are allowed", entry=name)
        if name in seen:
            raise _refuse("archive_duplicate_entry", f"archive entry {name!r} appears more than "
                          "once; zip readers disagree on which copy wins, so such archives are "
                          "refused", entry=name)
        seen.add(name)
        if info.flag_bits & 0x1:
            raise _refuse("archive_encrypted", f"archive entry {name!r} is encrypted; upload an "
                          "unencrypted archive", entry=name)
        # torch's reader (miniz) understands only these two; anything else would read
        # differently there than here.
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse("archive_unsupported_compression", f"archive entry {name!r} uses zip "
                          f"compression method {info.compress_type}; torch can read only stored "
                          "or deflated entries", entry=name, method=info.compress_type)
        total += info.file_size
        if total > limits.max_uncompressed_bytes:
            raise _refuse("archive_too_large", "the archive expands to more than "
                          f"{limits.max_uncompressed_bytes} bytes; that is over the limit",
                          limit=limits.max_uncompressed_bytes, entry=name)
        if info.file_size > limits.ratio_check_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                limit = limits.max_compression_ratio
                raise _refuse("archive_compression_ratio", f"archive entry {name!r} expands "
                              f"{ratio:.0f}x, over the limit of {limit:.0f}x; upload the file "
                              "as torch.export.save wrote it (uncompressed)",
                              entry=name, ratio=round(ratio, 1),
                              limit=limits.max_compression_ratio)
        root, _, rest = name.partition("/")
        roots.add(root)
        # Checked for directory entries too: torch finds AOTInductor models by name prefix.
        if rest.startswith(COMPILED_DIRS) or rest.lower().endswith(COMPILED_SUFFIXES):
            raise _refuse("archive_compiled_code", f"archive entry {rest!r} is compiled code; "
                          "Kiln accepts programs only (torch.export.save), never AOTInductor "
                          "packages or native libraries", entry=rest)
        if name.endswith("/"):
            continue
        if not rest:
            raise _refuse("not_an_exported_program", f"archive entry {name!r} is not inside the "
                          "archive's root folder; torch.export.save puts every entry in one "
                          "folder", entry=name)
        entries[rest] = info
    if len(roots) != 1:
        raise _refuse("not_an_exported_program", "the archive's entries are not all in one root "
                      "folder, as torch.export.save writes them", roots=sorted(roots)[:10])
    return roots.pop(), entries, total


# --------------------------------------------------------------------------------------------
# Reading entries


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limit: int) -> bytes:
    if info.file_size > limit:
        raise _refuse("archive_too_large", f"archive entry {name!r} is {info.file_size} bytes, "
                      f"over the limit of {limit} for metadata files", entry=name, limit=limit)
    try:
        with zf.open(info) as fh:
            # Read one byte past the limit: the declared size is not trusted.
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise _corrupt(name, exc) from None
    if len(data) > limit:
        raise _refuse("archive_too_large", f"archive entry {name!r} is over the limit of "
                      f"{limit} bytes for metadata files", entry=name, limit=limit)
    return data


def _corrupt(name: str, exc: BaseException) -> KilnError:
    return _refuse("archive_corrupt", f"archive entry {name!r} cannot be read ({exc}); the "
                   "archive is damaged: upload it again", entry=name, reason=str(exc)[:300])


def _sha256_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> str:
    digest = hashlib.sha256()
    read = 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(MiB):
                read += len(chunk)
                if read > info.file_size:
                    raise _refuse("archive_corrupt", f"archive entry {name!r} holds more data "
                                  "than its directory record says", entry=name)
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise _corrupt(name, exc) from None
    return digest.hexdigest()


def _load_json(zf: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], name: str,
               limits: ArchiveLimits) -> Any:
    data = _read_small(zf, entries[name], name, limits.max_json_bytes)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _refuse("archive_bad_json", f"archive entry {name!r} is not valid JSON ({exc}); "
                      "re-export the program with torch.export.save", entry=name,
                      reason=str(exc)[:300]) from None


# --------------------------------------------------------------------------------------------
# Strings that torch evaluates as code

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
_SAFE_STRING = re.compile(r"^([A-Za-z][A-Za-z0-9_]{0,127}|[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)$")
_SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub,
              ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt,
              ast.GtE)
_POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_MAX_EXPR_CHARS = 8192
_MAX_EXPR_NODES = 2000
# sympy evaluates integer powers eagerly: a small file could otherwise ask for 10**(10**12).
_MAX_EXPONENT = 64


class _Unsafe(Exception):
    pass


def _constant_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "Integer" and len(node.args) == 1):
        return _constant_int(node.args[0])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _constant_int(node.operand)
        return None if inner is None else -inner
    return None


def _check_exponent(node: ast.AST) -> None:
    value = _constant_int(node)
    if value is not None and abs(value) > _MAX_EXPONENT:
        raise _Unsafe(f"exponent {value} is too large")


def _check_common(node: ast.AST) -> bool:
    """Nodes both grammars accept. Returns True when handled."""
    if isinstance(node, (ast.Expression, ast.Load, *_OPERATORS)):
        return True
    if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            _check_exponent(node.right)
        return True
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, int, float)):
            if type(value) is int and abs(value) > 2**64:
                raise _Unsafe("integer literal out of range")
            return True
        if isinstance(value, str) and _SAFE_STRING.match(value):
            return True
        raise _Unsafe(f"constant {value!r:.40} is not allowed")
    return False


def _parse_expression(text: str) -> ast.Expression:
    if not isinstance(text, str):
        raise _Unsafe("not a string")
    if len(text) > _MAX_EXPR_CHARS:
        raise _Unsafe("expression too long")
    # No comments, line breaks, quotes that could close a string literal, or statement
    # separators: guards_code is pasted into generated source text, not only evaluated.
    if any(c in text for c in '#\n\r\\";@'):
        raise _Unsafe("forbidden character")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _Unsafe(f"not an expression ({type(exc).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > _MAX_EXPR_NODES:
        raise _Unsafe("expression too large")
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
                raise _Unsafe(f"name {node.id!r} is not allowed")
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                raise _Unsafe(f"call of {ast.unparse(node.func)[:40]!r} is not allowed")
            if node.func.id in _POW_CALLS and len(node.args) == 2:
                _check_exponent(node.args[1])
        elif isinstance(node, ast.keyword):
            if node.arg is None or not _SAFE_NAME.match(node.arg):
                raise _Unsafe("keyword argument is not allowed")
        else:
            raise _Unsafe(f"{type(node).__name__} is not allowed")
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
                raise _Unsafe(f"name {node.id!r} is not allowed")
        elif isinstance(node, ast.Subscript):
            if not isinstance(node.slice, ast.Constant):
                raise _Unsafe("only constant subscripts are allowed")
        elif isinstance(node, ast.Attribute):
            on_math = isinstance(node.value, ast.Name) and node.value.id == "math"
            if node.attr not in (_GUARD_MATH if on_math else _GUARD_METHODS):
                raise _Unsafe(f"attribute {node.attr!r} is not allowed")
        elif isinstance(node, ast.Call):
            func = node.func
            ok = (isinstance(func, ast.Attribute)
                  or (isinstance(func, ast.Name) and func.id in _GUARD_CALLS))
            if not ok or node.keywords:
                raise _Unsafe(f"call of {ast.unparse(func)[:40]!r} is not allowed")
        else:
            raise _Unsafe(f"{type(node).__name__} is not allowed")


def _walk(obj: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
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
        for _, key, value in _walk(pending.pop()):
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


def _check_program_strings(model: dict[str, Any]) -> None:
    for here, key, value in _walk(model):
        if key == "expr_str":
            try:
                check_sympy_expression(value)
            except _Unsafe as exc:
                raise _refuse("archive_unsafe_expression", "a symbolic shape expression in "
                              f"models/model.json is not one torch.export writes ({exc}); "
                              "torch would evaluate it as Python, so the archive is refused",
                              entry=MODEL_JSON, where=here, expression=str(value)[:200]) from None
        elif key in ("in_spec", "out_spec"):
            reason = _unsafe_treespec(value)
            if reason:
                raise _refuse("archive_unsafe_treespec", f"an input/output structure spec in "
                              f"models/model.json is not allowed: {reason}", entry=MODEL_JSON,
                              where=f"{here}.{key}", reason=reason)
    guards = model.get("guards_code") or []
    if not isinstance(guards, list):
        raise _schema_error("guards_code is not a list", model)
    for i, guard in enumerate(guards):
        try:
            check_guard(guard)
        except _Unsafe as exc:
            raise _refuse("archive_unsafe_expression", f"guard {i} in models/model.json is not "
                          f"a shape check ({exc}); torch would run it as Python, so the archive "
                          "is refused", entry=MODEL_JSON, where=f"guards_code[{i}]",
                          expression=str(guard)[:200]) from None


# --------------------------------------------------------------------------------------------
# Signature


class _NotMonotone(Exception):
    pass


def _eval_monotone(node: ast.AST, env: dict[str, int]) -> int:
    """Evaluate an expression that is non-decreasing in every symbol, else raise."""
    if isinstance(node, ast.Expression):
        return _eval_monotone(node.body, env)
    constant = _constant_int(node)
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
            _constant_int(a) is None or (_constant_int(a) or 0) > 0 for a in args
        ):
            out = 1
            for v in values:
                out *= v
            return out
        if fn in ("FloorDiv", "CeilDiv") and len(values) == 2 and _constant_int(args[1]):
            divisor = _constant_int(args[1]) or 0
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
            consts = [a for a in args if _constant_int(a) is not None]
            terms = [_render(a) for a in args if _constant_int(a) is None]
            text = " + ".join(terms)
            for c in consts:
                value = _constant_int(c) or 0
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
        raise _schema_error("range_constraints is not an object", model)
    for symbol, bounds in raw.items():
        if not isinstance(bounds, dict):
            raise _schema_error(f"range_constraints[{symbol!r}] is not an object", model)
        lo, hi = bounds.get("min_val"), bounds.get("max_val")
        lo = lo if type(lo) is int else None
        hi = hi if type(hi) is int and hi < _UNBOUNDED_MAX else None
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


def _schema_error(reason: str, model: dict[str, Any]) -> KilnError:
    version = model.get("schema_version") if isinstance(model, dict) else None
    return _refuse("archive_unsupported_schema", f"models/model.json does not have the layout "
                   f"Kiln reads ({reason}); it was written with schema version {version}, Kiln "
                   f"knows major version {KNOWN_SCHEMA_MAJOR}. Re-export with torch.export.save "
                   "from a supported torch release", entry=MODEL_JSON, reason=reason,
                   schema_version=version)


def _arg_kind(arg: Any) -> str:
    if isinstance(arg, dict) and len(arg) == 1:
        return next(iter(arg))
    return "unknown"


def _signature(
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
        raise _schema_error(f"missing {exc}", model) from None
    ranges = _symbol_ranges(model)
    inputs: list[InputSpec] = []
    for index, spec in enumerate(input_specs):
        if isinstance(spec, dict) and "constant_input" in spec:
            # A non-tensor forward argument that export specialised: the program still expects
            # it in every call, but no profile or engine input can describe it.
            const = spec["constant_input"] or {}
            raise _refuse("unsupported_input", f"input {const.get('name')!r} is a constant "
                          f"({_arg_kind(const.get('value'))[3:]}) fixed at export time, not a "
                          "tensor; Kiln compiles programs whose inputs are all tensors. Make it "
                          "a module attribute or a tensor input and export again", index=index,
                          input=const.get("name"), kind="constant_input")
        if not isinstance(spec, dict) or "user_input" not in spec:
            continue
        arg = (spec["user_input"] or {}).get("arg")
        kind = _arg_kind(arg)
        if kind != "as_tensor":
            inner = arg.get(kind) if isinstance(arg, dict) else None
            name = (inner.get("as_name") or inner.get("name")) if isinstance(inner, dict) else None
            raise _refuse("unsupported_input", f"user input {index}"
                          f"{f' ({name!r})' if name else ''} is a {kind[3:] or kind}, not a "
                          "tensor; Kiln compiles programs whose inputs are all tensors. Export "
                          "with the value baked in, or pass it as a tensor", index=index,
                          input=name, kind=kind)
        name = arg["as_tensor"]["name"]
        try:
            meta = tensor_values[name]
            code = meta["dtype"]
            dims = tuple(_dim(size, ranges) for size in meta["sizes"])
        except (KeyError, TypeError) as exc:
            raise _schema_error(f"tensor_values for input {name!r}: missing {exc}",
                                model) from None
        except _Unsafe as exc:  # unreachable after _check_program_strings; kept for safety
            raise _refuse("archive_unsafe_expression", str(exc), entry=MODEL_JSON) from None
        dtype = SCALAR_TYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise _refuse("unsupported_input", f"input {name!r} has dtype code {code!r}, which "
                          "Kiln does not know", input=name, dtype_code=code)
        if meta.get("layout", LAYOUT_STRIDED) != LAYOUT_STRIDED:
            raise _refuse("unsupported_input", f"input {name!r} is not a dense (strided) tensor;"
                          " sparse and other layouts are not supported", input=name,
                          layout=meta.get("layout"))
        inputs.append(InputSpec(name=name, dtype=dtype, dims=dims))
    outputs: list[str] = []
    for spec in output_specs:
        if not isinstance(spec, dict) or "user_output" not in spec:
            continue
        arg = (spec["user_output"] or {}).get("arg")
        kind = _arg_kind(arg)
        inner = arg.get(kind) if isinstance(arg, dict) else None
        if isinstance(inner, dict) and (inner.get("name") or inner.get("as_name")):
            outputs.append(str(inner.get("name") or inner.get("as_name")))
        else:
            outputs.append(kind)
    return tuple(inputs), tuple(outputs)


# --------------------------------------------------------------------------------------------
# Payload configs (weights and constants)


def _payload_entries(config: Any, directory: str, config_name: str,
                     entries: dict[str, zipfile.ZipInfo]) -> list[tuple[str, dict[str, Any]]]:
    """[(fqn, payload meta)] of one config, after checking each entry it points at."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise _refuse("archive_unsupported_schema", f"{config_name} has no 'config' object",
                      entry=config_name)
    out = []
    for fqn, meta in config["config"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise _refuse("archive_unsupported_schema", f"{config_name}: entry {fqn!r} has no "
                          "path_name", entry=config_name, fqn=fqn)
        path_name = meta["path_name"]
        if "/" in path_name or _path_problem(path_name):
            raise _refuse("archive_unsafe_path", f"{config_name}: entry {fqn!r} points at "
                          f"{path_name!r}, which is not a plain file name", entry=config_name,
                          fqn=fqn)
        if path_name.startswith(UNVERIFIABLE_CONSTANT_PREFIXES):
            raise _refuse("archive_custom_object", f"constant {fqn!r} is a custom (TorchScript "
                          "or opaque) object; torch loads those with unrestricted pickle, so "
                          "Kiln does not accept them", entry=directory + path_name, fqn=fqn)
        if directory + path_name not in entries:
            raise _refuse("not_an_exported_program", f"{config_name} names {path_name!r} for "
                          f"{fqn!r}, but the archive has no such entry",
                          entry=directory + path_name, fqn=fqn)
        out.append((fqn, meta))
    return out


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _strip_metadata(obj: Any) -> Any:
    """Copy of a model.json tree without per-node metadata (stack traces, module paths)."""
    if isinstance(obj, list):
        return [_strip_metadata(v) for v in obj]
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "nodes" and isinstance(value, list):
                out[key] = [
                    _strip_metadata({k: v for k, v in node.items() if k != "metadata"})
                    if isinstance(node, dict) else _strip_metadata(node)
                    for node in value
                ]
            else:
                out[key] = _strip_metadata(value)
        return out
    return obj


def _graph_hash(model: dict[str, Any], weights_config: Any, constants_config: Any) -> str:
    """Hash of what the program computes, weights' bytes left out.

    Left out as well: node metadata (stack traces with file paths, nn_module_stack, torch_fn,
    custom annotations) and the graph module's metadata, which change with the exporting script
    and not the computation; ``torch_version`` and ``schema_version``, which name the writer.
    Kept: nodes, op arguments, tensor shapes and dtypes, signature, range constraints, guards,
    module call graph, and the weights/constants configs (names, dtypes, shapes, strides).
    """
    stripped = {k: v for k, v in model.items() if k not in ("torch_version", "schema_version")}
    graph_module = dict(stripped.get("graph_module") or {})
    graph_module.pop("metadata", None)
    stripped["graph_module"] = graph_module
    document = {
        "model": _strip_metadata(stripped),
        "weights_config": weights_config,
        "constants_config": constants_config,
    }
    return hashlib.sha256(b"kiln-graph-v1\n" + _canonical(document)).hexdigest()


def _weights_hash(payloads: list[tuple[str, str, dict[str, Any], str]]) -> str:
    rows = sorted(
        [kind, fqn, meta.get("tensor_meta"), bool(meta.get("use_pickle")), digest]
        for kind, fqn, meta, digest in payloads
    )
    return hashlib.sha256(b"kiln-weights-v1\n" + _canonical(rows)).hexdigest()


def _model_hash(digests: dict[str, str]) -> str:
    rows = sorted([name, digest] for name, digest in digests.items() if name != SERIALIZATION_ID)
    return hashlib.sha256(b"kiln-model-v1\n" + _canonical(rows)).hexdigest()


# --------------------------------------------------------------------------------------------


def inspect_archive(
    path: str | os.PathLike[str], limits: ArchiveLimits = DEFAULT_LIMITS
) -> ArchiveInfo:
    """Check an uploaded ``.pt2`` and read its signature and hashes; raise KilnError to refuse.

    Nothing in the archive is unpickled or evaluated. Every limit is checked against the
    central directory before any entry's content is read.

    Hashes:
    - ``model_hash``: sha256 over the sorted (entry name without root folder, sha256 of the
      entry) pairs, leaving out ``.data/serialization_id``. The same program saved twice or
      under another file name hashes the same. Two exports of one model from different scripts
      usually differ here (node metadata holds stack traces; sample inputs are stored too).
    - ``graph_hash``: see ``_graph_hash``; equal for a fine-tuned copy of an architecture.
    - ``weights_hash``: sha256 over sorted (weight|constant, fqn, tensor meta, use_pickle,
      sha256 of bytes) rows of the weights and constants configs.
    """
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _refuse("not_a_zip", f"the upload cannot be opened ({exc.strerror})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        declared, cd_size = _directory_size(fh, size)
        # zipfile reads the directory by its byte size, not its stated count: bound both.
        if declared > limits.max_entries or cd_size > limits.max_entries * _MAX_CD_RECORD:
            raise _refuse("archive_too_many_entries", f"the archive has {declared} entries "
                          f"({cd_size} directory bytes), over the limit of {limits.max_entries}"
                          " entries", entries=declared, directory_bytes=cd_size,
                          limit=limits.max_entries)
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise _refuse("not_a_zip", f"the upload is not a readable zip archive ({exc}); "
                          "upload the file written by torch.export.save") from None
        with zf:
            try:
                return _inspect(zf, limits)
            except RecursionError:
                # json.loads bounds nesting by the recursion limit; hashing walks the same tree
                # from a deeper stack, so a file right at that bound can trip it here instead.
                raise _refuse("archive_bad_json", "a JSON entry of the archive is nested too "
                              "deeply to process; re-export with torch.export.save") from None


def _inspect(zf: zipfile.ZipFile, limits: ArchiveLimits) -> ArchiveInfo:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise _refuse("archive_too_many_entries", f"the archive has {len(infos)} entries, over "
                      f"the limit of {limits.max_entries}", entries=len(infos),
                      limit=limits.max_entries)
    if not infos:
        raise _refuse("not_an_exported_program", "the archive is empty; upload the file written "
                      "by torch.export.save")
    _, entries, total = _check_directory(infos, limits)

    # Layout: exactly one program, named "model". torch.export.load deserializes every
    # models/*.json, pickles and expressions included, yet returns only "model": a second
    # program would be loaded for nothing, so refusing it beats checking what is never used.
    required = ("archive_format", "archive_version", MODEL_JSON)
    if any(n not in entries for n in required):
        raise _refuse("not_an_exported_program", "the archive is not a torch.export program "
                      f"(no {' or '.join(required)}); save it with torch.export.save",
                      missing=[n for n in required if n not in entries])
    others = sorted(n for n in entries if n.startswith("models/") and n != MODEL_JSON)
    if others:
        raise _refuse("archive_multiple_models", "the archive holds more than one program; "
                      "Kiln accepts a single program saved by torch.export.save as 'model'",
                      entries=others[:20])
    for legacy in (LEGACY_WEIGHTS, LEGACY_CONSTANTS):
        if legacy in entries:
            raise _refuse("archive_legacy_format", f"the archive has {legacy!r}, the pickled "
                          "weight format of torch <= 2.7; re-export with torch.export.save from "
                          "a current torch", entry=legacy)
    for name in entries:
        if name.startswith(CONSTANTS_DIR) and name[len(CONSTANTS_DIR):].startswith(
                UNVERIFIABLE_CONSTANT_PREFIXES):
            raise _refuse("archive_custom_object", f"archive entry {name!r} is a custom "
                          "(TorchScript or opaque) object; torch loads those with unrestricted "
                          "pickle, so Kiln does not accept them", entry=name)

    # Compared exactly, as torch's reader does.
    if _read_small(zf, entries["archive_format"], "archive_format", 64) != b"pt2":
        raise _refuse("not_an_exported_program", "archive_format is not 'pt2'; save the program "
                      "with torch.export.save", entry="archive_format")
    version = _read_small(zf, entries["archive_version"], "archive_version", 64)
    if version != b"0":
        raise _refuse("archive_unsupported_schema", f"archive_version is {version[:20]!r}; "
                      "Kiln reads version 0 archives", entry="archive_version")

    model = _load_json(zf, entries, MODEL_JSON, limits)
    if not isinstance(model, dict):
        raise _schema_error("top level is not an object", model)
    for config in (WEIGHTS_CONFIG, CONSTANTS_CONFIG):
        if config not in entries:
            raise _refuse("not_an_exported_program", f"the archive has no {config}; save the "
                          "program with torch.export.save", missing=config)
    weights_config = _load_json(zf, entries, WEIGHTS_CONFIG, limits)
    constants_config = _load_json(zf, entries, CONSTANTS_CONFIG, limits)
    weights = _payload_entries(weights_config, WEIGHTS_DIR, WEIGHTS_CONFIG, entries)
    constants = _payload_entries(constants_config, CONSTANTS_DIR, CONSTANTS_CONFIG, entries)

    _check_program_strings(model)
    schema = model.get("schema_version")
    schema_version = (f"{schema.get('major')}.{schema.get('minor')}"
                      if isinstance(schema, dict) else "")
    try:
        inputs, outputs = _signature(model)
    except (KeyError, TypeError, AttributeError) as exc:
        raise _schema_error(f"unexpected structure ({type(exc).__name__}: {exc})",
                            model) from None
    torch_version = model.get("torch_version")

    pickled = {WEIGHTS_DIR + m["path_name"] for _, m in weights if m.get("use_pickle")}
    pickled |= {CONSTANTS_DIR + m["path_name"] for _, m in constants if m.get("use_pickle")}
    pickled |= {n for n in entries
                if n.startswith(SAMPLE_INPUTS_DIR) or n.lower().endswith(PICKLE_SUFFIXES)}
    # An empty entry unpickles nothing: torch reads empty sample inputs as "none saved".
    pickled = {n for n in pickled if entries[n].file_size > 0}

    # Content is read only now, after every directory-level limit has passed.
    digests = {name: _sha256_entry(zf, info, name) for name, info in entries.items()}
    payloads = [("weight", fqn, m, digests[WEIGHTS_DIR + m["path_name"]]) for fqn, m in weights]
    payloads += [("constant", fqn, m, digests[CONSTANTS_DIR + m["path_name"]])
                 for fqn, m in constants]

    return ArchiveInfo(
        model_hash=_model_hash(digests),
        graph_hash=_graph_hash(model, weights_config, constants_config),
        weights_hash=_weights_hash(payloads),
        torch_version=torch_version if isinstance(torch_version, str) else "",
        inputs=inputs,
        outputs=outputs,
        pickled_entries=tuple(sorted(pickled)),
        entry_count=len(infos),
        uncompressed_bytes=total,
        schema_version=schema_version,
        entry_sha256=tuple(sorted(digests.items())),
    )
