"""Weight/constant payload configs and the three hashes the cache is keyed on."""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Any

from service.archive.layout import (
    ITEM_SIZES,
    SCALAR_TYPES,
    SERIALIZATION_ID,
    UNVERIFIABLE_CONSTANT_PREFIXES,
    ArchiveLimits,
    refuse,
)
from service.archive.zipdir import path_problem


def payload_entries(config: Any, directory: str, config_name: str,
                     entries: dict[str, zipfile.ZipInfo]) -> list[tuple[str, dict[str, Any]]]:
    """[(fqn, payload meta)] of one config, after checking each entry it points at."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise refuse("archive_unsupported_schema", f"{config_name} has no 'config' object",
                     entry=config_name)
    out = []
    for fqn, meta in config["config"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise refuse("archive_unsupported_schema", f"{config_name}: entry {fqn!r} has no "
                         "path_name", entry=config_name, fqn=fqn)
        path_name = meta["path_name"]
        if "/" in path_name or path_problem(path_name):
            raise refuse("archive_unsafe_path", f"{config_name}: entry {fqn!r} points at "
                         f"{path_name!r}, which is not a plain file name", entry=config_name,
                         fqn=fqn)
        if path_name.startswith(UNVERIFIABLE_CONSTANT_PREFIXES):
            raise refuse("archive_custom_object", f"constant {fqn!r} is a custom (TorchScript "
                         "or opaque) object; torch loads those with unrestricted pickle, so "
                         "Kiln does not accept them", entry=directory + path_name, fqn=fqn)
        if directory + path_name not in entries:
            raise refuse("not_an_exported_program", f"{config_name} names {path_name!r} for "
                         f"{fqn!r}, but the archive has no such entry",
                         entry=directory + path_name, fqn=fqn)
        out.append((fqn, meta))
    return out


def _declared_span(meta: Any) -> int | None:
    """Bytes a plain payload's tensor_meta addresses (storage offset + strided extent), or
    None when a size, stride or offset is not a plain int."""
    try:
        sizes = [d["as_int"] for d in meta["sizes"]]
        strides = [d["as_int"] for d in meta["strides"]]
        offset = meta["storage_offset"]["as_int"]
        item = ITEM_SIZES[SCALAR_TYPES[meta["dtype"]]]
    except (KeyError, TypeError):
        return None
    values = [*sizes, *strides, offset]
    if any(type(v) is not int or v < 0 for v in values) or len(sizes) != len(strides):
        return None
    if any(v == 0 for v in sizes):
        return 0
    return (offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1) * item


def check_declared_bytes(payloads: list[tuple[str, dict[str, Any]]], directory: str,
                         entries: dict[str, zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    """A payload declares no more bytes than its record holds, and all are bounded.

    torch allocates ``torch.zeros(declared shape)`` for an empty record and views any other
    record with the declared strides: a few bytes of JSON could otherwise ask the loader for
    terabytes. A record may be larger than the span (torch stores a view's whole storage).
    Pickled payloads are bounded in total only: the worker's guard checks what they hold.
    """
    total = 0
    for fqn, meta in payloads:
        name = directory + meta["path_name"]
        span = _declared_span(meta.get("tensor_meta"))
        if span is None:
            raise refuse("archive_unsupported_schema", f"payload {fqn!r} has no plain tensor "
                         "metadata (dtype, int sizes, strides and offset)", entry=name, fqn=fqn)
        total += span
        record = entries[name].file_size
        if not meta.get("use_pickle") and span > record:
            raise refuse("archive_payload_size", f"payload {fqn!r} declares {span} bytes, but "
                         f"its record {name!r} holds {record}; torch would allocate the "
                         "difference", entry=name, fqn=fqn, declared=span, record=record)
    if total > limits.max_uncompressed_bytes:
        raise refuse("archive_too_large", f"the payloads declare {total} bytes, over the limit "
                     f"of {limits.max_uncompressed_bytes}", declared=total,
                     limit=limits.max_uncompressed_bytes)


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


def graph_hash(model: dict[str, Any], weights_config: Any, constants_config: Any) -> str:
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


def weights_hash(payloads: list[tuple[str, str, dict[str, Any], str]]) -> str:
    rows = sorted(
        [kind, fqn, meta.get("tensor_meta"), bool(meta.get("use_pickle")), digest]
        for kind, fqn, meta, digest in payloads
    )
    return hashlib.sha256(b"kiln-weights-v1\n" + _canonical(rows)).hexdigest()


def model_hash_of(digests: dict[str, str]) -> str:
    rows = sorted([name, digest] for name, digest in digests.items() if name != SERIALIZATION_ID)
    return hashlib.sha256(b"kiln-model-v1\n" + _canonical(rows)).hexdigest()

