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
- strings that torch pastes into the source it generates: graph value names, FQNs, node
  targets (``pasted_names``).
- resource bombs: entries must tile the file (no prefix, gaps, overlaps or comment), so sizes
  and ratios are facts; JSON values are counted before parsing; powers and number strings in
  expressions are bounded; payloads declare no more bytes than their records hold. The API
  runs all of it in a memory-limited child (``isolated``).

It also reads the input signature and computes the three hashes the cache is keyed on.

One module per concern: ``zipdir`` (zip directory rules, bounded reads), ``code_strings``
(evaluated strings), ``pasted_names`` (strings pasted into source), ``signature``,
``hashing`` (payload configs and hashes), ``layout`` (entry names, limits, result types);
this module orchestrates.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile

from service.archive.code_strings import check_guard, check_program_strings, check_sympy_expression
from service.archive.hashing import (
    check_declared_bytes,
    graph_hash,
    model_hash_of,
    payload_entries,
    weights_hash,
)
from service.archive.layout import (
    CONSTANTS_CONFIG,
    CONSTANTS_DIR,
    DEFAULT_LIMITS,
    LEGACY_CONSTANTS,
    LEGACY_WEIGHTS,
    MAX_CD_RECORD,
    MODEL_JSON,
    PICKLE_SUFFIXES,
    SAMPLE_INPUTS_DIR,
    SCALAR_TYPES,
    SERIALIZATION_ID,
    UNVERIFIABLE_CONSTANT_PREFIXES,
    WEIGHTS_CONFIG,
    WEIGHTS_DIR,
    ArchiveInfo,
    ArchiveLimits,
    DimSpec,
    InputSpec,
    check_entry_name,
    refuse,
    schema_error,
)
from service.archive.pasted_names import (
    check_fqns_match,
    check_pasted_names,
    check_user_input_names,
)
from service.archive.signature import read_signature
from service.archive.zipdir import (
    check_directory,
    check_layout,
    directory_size,
    hash_entries,
    load_json,
    read_small,
)

__all__ = [
    "DEFAULT_LIMITS", "SCALAR_TYPES", "SERIALIZATION_ID", "ArchiveInfo", "ArchiveLimits", "DimSpec",
    "InputSpec", "check_guard", "check_sympy_expression", "inspect_archive",
]


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
    - ``graph_hash``: see ``graph_hash``; equal for a fine-tuned copy of an architecture.
    - ``weights_hash``: sha256 over sorted (weight|constant, fqn, tensor meta, use_pickle,
      sha256 of bytes) rows of the weights and constants configs.
    """
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise refuse("not_a_zip", f"the upload cannot be opened ({exc.strerror})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        declared, cd_size = directory_size(fh, size)
        # zipfile reads the directory by its byte size, not its stated count: bound both.
        if declared > limits.max_entries or cd_size > limits.max_entries * MAX_CD_RECORD:
            raise refuse("archive_too_many_entries", f"the archive has {declared} entries "
                         f"({cd_size} directory bytes), over the limit of {limits.max_entries}"
                         " entries", entries=declared, directory_bytes=cd_size,
                         limit=limits.max_entries)
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise refuse("not_a_zip", f"the upload is not a readable zip archive ({exc}); "
                         "upload the file written by torch.export.save") from None
        with zf:
            spans = check_layout(fh, zf, size)
            try:
                return _inspect(zf, limits, fh.fileno(), spans)
            except RecursionError:
                # json.loads bounds nesting by the recursion limit; hashing walks the same tree
                # from a deeper stack, so a file right at that bound can trip it here instead.
                raise refuse("archive_bad_json", "a JSON entry of the archive is nested too "
                             "deeply to process; re-export with torch.export.save") from None


def _inspect(zf: zipfile.ZipFile, limits: ArchiveLimits, fd: int,
             spans: dict[str, tuple[int, int]]) -> ArchiveInfo:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise refuse("archive_too_many_entries", f"the archive has {len(infos)} entries, over "
                     f"the limit of {limits.max_entries}", entries=len(infos),
                     limit=limits.max_entries)
    if not infos:
        raise refuse("not_an_exported_program", "the archive is empty; upload the file written "
                     "by torch.export.save")
    _, entries, total = check_directory(infos, limits)

    # Layout: exactly one program, named "model". torch.export.load deserializes every
    # models/*.json, pickles and expressions included, yet returns only "model": a second
    # program would be loaded for nothing, so refusing it beats checking what is never used.
    required = ("archive_format", "archive_version", MODEL_JSON)
    if any(n not in entries for n in required):
        raise refuse("not_an_exported_program", "the archive is not a torch.export program "
                     f"(no {' or '.join(required)}); save it with torch.export.save",
                     missing=[n for n in required if n not in entries])
    others = sorted(n for n in entries if n.startswith("models/") and n != MODEL_JSON)
    if others:
        raise refuse("archive_multiple_models", "the archive holds more than one program; "
                     "Kiln accepts a single program saved by torch.export.save as 'model'",
                     entries=others[:20])
    for legacy in (LEGACY_WEIGHTS, LEGACY_CONSTANTS):
        if legacy in entries:
            raise refuse("archive_legacy_format", f"the archive has {legacy!r}, the pickled "
                         "weight format of torch <= 2.7; re-export with torch.export.save from "
                         "a current torch", entry=legacy)
    for name in entries:
        if name.startswith(CONSTANTS_DIR) and name[len(CONSTANTS_DIR):].startswith(
                UNVERIFIABLE_CONSTANT_PREFIXES):
            raise refuse("archive_custom_object", f"archive entry {name!r} is a custom "
                         "(TorchScript or opaque) object; torch loads those with unrestricted "
                         "pickle, so Kiln does not accept them", entry=name)
        check_entry_name(name)
    if SERIALIZATION_ID in entries:
        serialization_id = (read_small(zf, entries[SERIALIZATION_ID], SERIALIZATION_ID, 64)
                            if entries[SERIALIZATION_ID].file_size <= 64 else b"")
        if not re.fullmatch(rb"[0-9A-Za-z_-]{1,64}", serialization_id):
            raise refuse("archive_bad_serialization_id", f"{SERIALIZATION_ID} is not the short "
                         "id torch.export.save writes (up to 64 letters and digits); upload "
                         "the file exactly as torch.export.save wrote it",
                         entry=SERIALIZATION_ID)

    # Compared exactly, as torch's reader does.
    if read_small(zf, entries["archive_format"], "archive_format", 64) != b"pt2":
        raise refuse("not_an_exported_program", "archive_format is not 'pt2'; save the program "
                     "with torch.export.save", entry="archive_format")
    version = read_small(zf, entries["archive_version"], "archive_version", 64)
    if version != b"0":
        raise refuse("archive_unsupported_schema", f"archive_version is {version[:20]!r}; "
                     "Kiln reads version 0 archives", entry="archive_version")

    model = load_json(zf, entries, MODEL_JSON, limits)
    if not isinstance(model, dict):
        raise schema_error("top level is not an object", model)
    for config in (WEIGHTS_CONFIG, CONSTANTS_CONFIG):
        if config not in entries:
            raise refuse("not_an_exported_program", f"the archive has no {config}; save the "
                         "program with torch.export.save", missing=config)
    weights_config = load_json(zf, entries, WEIGHTS_CONFIG, limits)
    constants_config = load_json(zf, entries, CONSTANTS_CONFIG, limits)
    weights = payload_entries(weights_config, WEIGHTS_DIR, WEIGHTS_CONFIG, entries)
    constants = payload_entries(constants_config, CONSTANTS_DIR, CONSTANTS_CONFIG, entries)
    check_declared_bytes(weights, WEIGHTS_DIR, entries, limits)
    check_declared_bytes(constants, CONSTANTS_DIR, entries, limits)

    check_program_strings(model)
    check_user_input_names(model)
    check_pasted_names(model)
    schema = model.get("schema_version")
    schema_version = (f"{schema.get('major')}.{schema.get('minor')}"
                      if isinstance(schema, dict) else "")
    try:
        inputs, outputs = read_signature(model)
    except (KeyError, TypeError, AttributeError) as exc:
        raise schema_error(f"unexpected structure ({type(exc).__name__}: {exc})",
                           model) from None
    check_fqns_match(model, [f for f, _ in weights], [f for f, _ in constants])
    torch_version = model.get("torch_version")

    pickled = {WEIGHTS_DIR + m["path_name"] for _, m in weights if m.get("use_pickle")}
    pickled |= {CONSTANTS_DIR + m["path_name"] for _, m in constants if m.get("use_pickle")}
    pickled |= {n for n in entries
                if n.startswith(SAMPLE_INPUTS_DIR) or n.lower().endswith(PICKLE_SUFFIXES)}
    # An empty entry unpickles nothing: torch reads empty sample inputs as "none saved".
    pickled = {n for n in pickled if entries[n].file_size > 0}

    # Content is read only now, after every directory-level limit has passed.
    digests = hash_entries(zf, fd, entries, spans)
    payloads = [("weight", fqn, m, digests[WEIGHTS_DIR + m["path_name"]]) for fqn, m in weights]
    payloads += [("constant", fqn, m, digests[CONSTANTS_DIR + m["path_name"]])
                 for fqn, m in constants]

    return ArchiveInfo(
        model_hash=model_hash_of(digests),
        graph_hash=graph_hash(model, weights_config, constants_config),
        weights_hash=weights_hash(payloads),
        torch_version=torch_version if isinstance(torch_version, str) else "",
        inputs=inputs,
        outputs=outputs,
        pickled_entries=tuple(sorted(pickled)),
        entry_count=len(infos),
        uncompressed_bytes=total,
        schema_version=schema_version,
        entry_sha256=tuple(sorted(digests.items())),
    )
