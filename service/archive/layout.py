"""What ``torch.export.save`` writes (entry names, dtype codes) and what inspection returns.

Shared by every part of ``service.archive``; nothing here reads a file.
"""

from __future__ import annotations

import sys
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

# Every entry torch.export.save writes for one program; anything else is refused. torch reads
# extra/ files into memory whole, and unknown entries are at best dead weight in the hash.
PLAIN_ENTRIES = frozenset({"archive_format", "archive_version", "byteorder", ".data/version",
                           SERIALIZATION_ID, MODEL_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG})
PAYLOAD_DIRS = (WEIGHTS_DIR, CONSTANTS_DIR, SAMPLE_INPUTS_DIR)

# Bytes per element, by dtype name (torch._utils._element_size).
ITEM_SIZES: dict[str, int] = {
    "uint8": 1, "int8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "int16": 2, "uint16": 2,
    "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "float32": 4, "complex32": 4,
    "int64": 8, "uint64": 8, "float64": 8, "complex64": 8, "complex128": 16,
}

COMPILED_DIRS = ("data/aotinductor/",)
COMPILED_SUFFIXES = (".so", ".dll", ".dylib", ".cubin", ".fatbin", ".ptx", ".hsaco", ".exe")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")
# torch loads these constants with torch._C._pickle_load_obj (TorchScript unpickler) and
# pickle.loads: no restricted loader exists for them, so they are refused, not verified.
UNVERIFIABLE_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")

# Older exports wrote sys.maxsize - 1 for "no upper bound" before int_oo serialised as null.
UNBOUNDED_MAX = sys.maxsize - 1
# Generous bytes per central-directory record (46 fixed + name + extra + comment).
MAX_CD_RECORD = 4096


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
    # About 500 MB of parsed objects at most; the example encoder's model.json holds ~3 k.
    max_json_values: int = 8_000_000


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class DimSpec:
    static: int | None
    symbol: str | None
    min: int | None
    max: int | None
    hint: int | None
    derived: bool = False
    # What people see instead of torch's internal symbol (s77): the user's torch.export.Dim
    # name where the archive carries it, else "dim N of INPUT" (the first dim with the symbol).
    label: str | None = None

    def to_json(self) -> int | dict[str, Any]:
        if self.static is not None:
            return self.static
        out: dict[str, Any] = {"symbol": self.symbol, "min": self.min, "max": self.max}
        if self.derived:
            out["derived"] = True
        if self.label is not None:
            out["label"] = self.label
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


def check_entry_name(name: str) -> None:
    """Refuse an entry that torch.export.save does not write (names below the root)."""
    if name in PLAIN_ENTRIES:
        return
    for directory in PAYLOAD_DIRS:
        if name.startswith(directory) and "/" not in name[len(directory):]:
            return
    if name.startswith("extra/"):
        raise refuse("archive_extra_files", f"archive entry {name!r} is an extra file; torch "
                     "reads extra files into memory whole, so Kiln does not accept them. Save "
                     "the program without extra_files", entry=name)
    raise refuse("archive_unexpected_entry", f"archive entry {name!r} is not one that "
                 "torch.export.save writes; upload the file exactly as it wrote it", entry=name)


def refuse(code: str, message: str, **details: Any) -> KilnError:
    return KilnError(code, message, 400, details)


def schema_error(reason: str, model: dict[str, Any]) -> KilnError:
    version = model.get("schema_version") if isinstance(model, dict) else None
    return refuse("archive_unsupported_schema", f"models/model.json does not have the layout "
                  f"Kiln reads ({reason}); it was written with schema version {version}, Kiln "
                  f"knows major version {KNOWN_SCHEMA_MAJOR}. Re-export with torch.export.save "
                  "from a supported torch release", entry=MODEL_JSON, reason=reason,
                  schema_version=version)
