"""Allowlists for the strings torch pastes into source code while loading a program.

``torch.export.load`` rebuilds each graph as a ``torch.fx.GraphModule``, whose Python source is
generated from the names in the file and then ``exec``-ed:

- every graph value name (placeholders, node outputs, ``tensor_values`` keys, signature
  arguments, the same in every subgraph) becomes a parameter or variable name
  (``def forward(self, <name>, ...)``, ``<name> = torch.ops...``). A name such as
  ``y=open(...)`` is a default argument, evaluated when the source is ``exec``-ed;
- every parameter/buffer FQN becomes ``getattr(self, "<segment>")`` when ``.module()``
  unlifts the program, and a C++ string literal in AOTInductor's wrapper;
- every node target is resolved by attribute lookup from ``torch``, ``operator`` or ``math``
  (``torch.os.system`` resolves), then called.

Each string is checked against what ``torch.export`` itself writes; each kind of refusal has
its own error code and names the offending entry.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from service.archive.layout import MODEL_JSON, refuse
from service.errors import KilnError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}|[0-9]{1,9}")
# Names the generated source already binds: keywords, the globals torch.fx puts in front of
# every generated module (torch/fx/graph.py ``_register_custom_builtin``) and the ``self`` of
# ``forward``. Python builtins are not reserved: torch.export itself names a placeholder
# ``input`` after the user's argument, and shadowing a builtin makes a build fail, not run code.
_RESERVED = (frozenset(keyword.kwlist)
             | {"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree", "self"})

# Node targets: operator overloads of these namespaces (torch.ops.<ns>.<op>.<overload>) ...
_OP_NAMESPACES = frozenset({"aten", "prims"})
# aten's own operators with dunder names (``x & mask`` exports as aten.__and__.Tensor: the
# attention-mask code in transformers emits it). Other dunders would reach Python attributes
# of the namespace object (``__class__``), so only these are allowed.
_ATEN_DUNDERS = frozenset(f"__{n}__" for n in (
    "and", "or", "xor", "lshift", "rshift", "iand", "ior", "ixor", "ilshift", "irshift"))
# ... the higher-order operators torch.export emits (torch.ops.higher_order.<name>) ...
_HIGHER_ORDER = frozenset({
    "cond", "while_loop", "map_impl", "scan", "associative_scan", "invoke_subgraph",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "auto_functionalized",
    "auto_functionalized_v2", "with_effects", "run_const_graph", "flex_attention",
    "_export_tracepoint",
})
# ... and the symbolic-shape functions of torch._export.serde.serialize._SYM_OPS (and getitem).
_PLAIN_TARGETS = frozenset({
    *(f"_operator.{n}" for n in (
        "getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub",
        "floordiv", "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift", "not_",
        "abs")),
    *(f"torch.{n}" for n in (
        "sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt",
        "_sym_sqrt", "sym_sum")),
    "math.trunc", "math.ceil", "math.floor",
    # Pre-dispatch exports mark grad/autocast regions with plain calls instead of HOPs.
    "torch._C._set_grad_enabled", "torch.amp.autocast_mode._enter_autocast",
    "torch.amp.autocast_mode._exit_autocast",
})

# Dict keys whose value is a graph value name, and the tables keyed by value name.
_VALUE_NAME_KEYS = ("as_name", "user_input_name")
_VALUE_TABLES = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values",
                 "custom_obj_values")
_FQN_KEYS = ("parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name",
             "class_fqn")
# Control characters other than tab and newline: Python's tokenizer ends a line at \r, so one
# inside a stack trace that torch.fx copies into a comment would start a new source line.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def is_value_name(name: Any) -> bool:
    return (isinstance(name, str) and _IDENTIFIER.fullmatch(name) is not None
            and name not in _RESERVED and not name.startswith("__"))


def is_fqn(name: Any) -> bool:
    """A dotted path of identifiers or indices (``layers.0.weight``), no dunder segment."""
    if not isinstance(name, str) or len(name) > 1000:
        return False
    return all(_SEGMENT.fullmatch(p) is not None and not p.startswith("__")
               for p in name.split("."))


def is_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in _PLAIN_TARGETS:
        return True
    parts = target.split(".")
    if parts[:2] != ["torch", "ops"] or not all(_IDENTIFIER.fullmatch(p) for p in parts[2:]):
        return False
    if len(parts) == 4 and parts[2] == "higher_order":
        return parts[3] in _HIGHER_ORDER
    return (len(parts) == 5 and parts[2] in _OP_NAMESPACES
            and (not parts[3].startswith("__")
                 or (parts[2] == "aten" and parts[3] in _ATEN_DUNDERS))
            and not parts[4].startswith("__"))


def _module_path(fqn: Any) -> bool:
    """module_call_graph paths: an FQN, '' for the root, '@N' for the N-th repeated call."""
    if fqn == "":
        return True
    if not isinstance(fqn, str):
        return False
    path, _, call = fqn.partition("@")
    return is_fqn(path) and (call == "" or (call.isdigit() and len(call) < 10))


def _refuse_name(code: str, what: str, where: str, name: Any, rule: str) -> KilnError:
    shown = name[:200] if isinstance(name, str) else repr(name)[:200]
    return refuse(code, f"{what} {shown!r} in models/model.json is not {rule}; torch pastes it "
                  "into generated source code, so the archive is refused. Upload the file "
                  "exactly as torch.export.save wrote it", entry=MODEL_JSON, where=where,
                  name=shown)


def _path(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]... or None, for a JSON tree of any shape."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def check_user_input_names(model: dict[str, Any]) -> None:
    """User input names become binding names (keyword arguments of the compiled engine)."""
    specs = _path(model, "graph_module", "signature", "input_specs")
    for index, spec in enumerate(specs if isinstance(specs, list) else []):
        arg = _path(spec, "user_input", "arg")
        if not isinstance(arg, dict) or len(arg) != 1:
            continue
        inner = next(iter(arg.values()))
        name = (inner.get("name", inner.get("as_name")) if isinstance(inner, dict) else None)
        if name is not None and not is_value_name(name):
            raise _refuse_name("archive_unsafe_input_name", "user input name",
                               f"graph_module.signature.input_specs[{index}]", name,
                               "a Python identifier (and not a keyword)")


def check_pasted_names(model: dict[str, Any]) -> None:
    """Every name, FQN and target of every graph and subgraph, and no control characters."""
    stack: list[tuple[str, Any, bool]] = [("graph_module", model.get("graph_module"), False)]
    while stack:
        here, value, in_metadata = stack.pop()
        if isinstance(value, str):
            if _CONTROL.search(value):
                raise refuse("archive_control_character", "a string in models/model.json holds "
                             "a control character (such as a carriage return); torch copies "
                             "node metadata into generated source, so the archive is refused",
                             entry=MODEL_JSON, where=here)
            continue
        if isinstance(value, list):
            stack.extend((f"{here}[{i}]", item, in_metadata) for i, item in enumerate(value))
            continue
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            where = f"{here}.{key}"
            stack.append((where, item, in_metadata or key == "metadata"))
            if in_metadata or key == "metadata":
                continue
            if key in _VALUE_TABLES and isinstance(item, dict):
                for name in item:
                    if not is_value_name(name):
                        raise _refuse_name("archive_unsafe_value_name", "graph value name",
                                           where, name, "a Python identifier (and not a "
                                           "keyword or dunder)")
            elif key in _VALUE_NAME_KEYS or (key == "name" and "arg" not in value):
                # {"name": ..., "arg": ..., "kind": ...} is a keyword argument of a node;
                # every other "name" names a value (tensor, token, subgraph, node output).
                if not is_value_name(item):
                    raise _refuse_name("archive_unsafe_value_name", "graph value name", where,
                                       item, "a Python identifier (and not a keyword or "
                                       "dunder)")
            elif key == "name":
                # "" marks a positional argument (higher-order operators).
                if not (item == "" or (isinstance(item, str) and _IDENTIFIER.fullmatch(item)
                                       and not keyword.iskeyword(item))):
                    raise _refuse_name("archive_unsafe_argument_name", "keyword argument name",
                                       where, item, "a Python identifier")
            elif key in _FQN_KEYS:
                if not is_fqn(item):
                    raise _refuse_name("archive_unsafe_fqn", "parameter/buffer/constant name",
                                       where, item, "a dotted path of identifiers")
            elif key == "target":
                if not is_target(item):
                    raise _refuse_name("archive_unsafe_target", "node target", where, item,
                                       "an operator torch.export emits (aten, prims, "
                                       "higher-order and symbolic-shape operators)")
            elif key == "fqn" and here.startswith("graph_module.module_call_graph"):
                if not _module_path(item):
                    raise _refuse_name("archive_unsafe_fqn", "module path", where, item,
                                       "a dotted path of identifiers")
            elif key == "forward_arg_names" and isinstance(item, list):
                for name in item:
                    if not (isinstance(name, str) and _IDENTIFIER.fullmatch(name)
                            and not keyword.iskeyword(name)):
                        raise _refuse_name("archive_unsafe_input_name", "forward argument "
                                           "name", where, name, "a Python identifier")


def check_fqns_match(model: dict[str, Any], weights: list[str], constants: list[str]) -> None:
    """The payload configs and the signature name the same parameters, buffers and constants.

    torch assigns each payload to the module attribute its config key names; a key the
    signature does not lift would be set on the module unchecked, and a lifted name with no
    payload fails only inside the build.
    """
    specs = _path(model, "graph_module", "signature", "input_specs")
    lifted: dict[str, str] = {}
    for index, spec in enumerate(specs if isinstance(specs, list) else []):
        if not isinstance(spec, dict) or len(spec) != 1:
            continue
        kind, body = next(iter(spec.items()))
        field = {"parameter": "parameter_name", "buffer": "buffer_name",
                 "tensor_constant": "tensor_constant_name"}.get(kind)
        if field and isinstance(body, dict) and isinstance(body.get(field), str):
            lifted[body[field]] = f"graph_module.signature.input_specs[{index}]"
    stored = set(weights) | set(constants)
    for fqn in sorted(stored - set(lifted)):
        raise refuse("archive_fqn_mismatch", f"the payload {fqn!r} is not a parameter, buffer or "
                     "constant of the program's signature; upload the file exactly as "
                     "torch.export.save wrote it", entry=MODEL_JSON, fqn=fqn)
    for fqn in sorted(set(lifted) - stored):
        raise refuse("archive_fqn_mismatch", f"the signature lifts {fqn!r}, but the archive "
                     "stores no weight or constant under that name", entry=MODEL_JSON, fqn=fqn,
                     where=lifted[fqn])
