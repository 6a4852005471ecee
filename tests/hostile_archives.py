"""Builders of hostile ``.pt2`` archives, for any test that needs one.

Each builder starts from a real ``torch.export.save`` archive and changes what an attacker
would change, byte by byte where ``zipfile`` would not write it. Payloads that would run code
open (create) a canary file; ``run_unguarded`` loads an archive the way a service without
Kiln's checks would, in a fresh subprocess, so a test can prove the payload is live.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Members = list[tuple[zipfile.ZipInfo | str, bytes]]


def entries(path: Path) -> tuple[str, dict[str, bytes]]:
    """(root folder, {name below the root: bytes}) of an archive."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n.split("/", 1)[1]: zf.read(n) for n in names}


def write_zip(dest: Path, members: Members, compression: int = zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(dest, "w", compression) as zf:
            for info, data in members:
                zf.writestr(info, data)
    return dest


def derive(src: Path, dest: Path, *, add: dict[str, bytes] | None = None,
           replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
           raw: Members | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy of a real archive with entries added/replaced/dropped (names below the root)."""
    root, found = entries(src)
    members: Members = []
    for name, data in found.items():
        if name not in drop:
            members.append((f"{root}/{name}", (replace or {}).get(name, data)))
    members += [(f"{root}/{name}", data) for name, data in (add or {}).items()]
    members += raw or []
    return write_zip(dest, members, compression)


def raw_zip(dest: Path, names: list[bytes], flags: int = 0, zip64: bool = False) -> Path:
    """A valid zip of empty stored entries, written directly (zipfile takes ~5 s for 100k)."""
    local, central = bytearray(), bytearray()
    for name in names:
        offset = len(local)
        local += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, 0, 0, 0x21, 0, 0, 0,
                             len(name), 0) + name
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, flags, 0, 0,
                               0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset) + name
    count, cd_offset, cd_size = len(names), len(local), len(central)
    tail = bytearray()
    if zip64 or count >= 0xFFFF:
        zip64_at = cd_offset + cd_size
        tail += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                            cd_size, cd_offset)
        tail += struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_at, 1)
        count = 0xFFFF
    tail += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0)
    dest.write_bytes(bytes(local + central + tail))
    return dest


def zinfo(name: str, mode: int | None = None, method: int = zipfile.ZIP_STORED
          ) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type = method
    if mode is not None:
        info.create_system = 3
        info.external_attr = mode << 16
    return info


def edit_json(base: Path, dest: Path, edits: dict[str, Callable[[Any], None]],
              compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy of ``base`` with each named JSON entry edited in place by its function."""
    found = entries(base)[1]
    replace = {}
    for name, edit in edits.items():
        document = json.loads(found[name])
        edit(document)
        replace[name] = json.dumps(document).encode()
    return derive(base, dest, replace=replace, compression=compression)


def edit_model_json(base: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    return edit_json(base, dest, {"models/model.json": edit})


# ---- payloads that run code ---------------------------------------------------------------


def open_canary(canary: Path) -> str:
    """A Python expression that creates ``canary``, written without '.' or '#' (torch splits
    FQNs at dots) so it fits any string torch pastes into source."""
    codes = ",".join(str(b) for b in str(canary).encode())
    return f'open(str(bytes([{codes}]),"latin1"),"w")'


def rename_value(model: dict[str, Any], old: str, new: str, *,
                 in_signature: bool = True) -> None:
    """Rename graph value ``old`` everywhere torch reads it (graph, tensor_values, nodes)."""
    graph_module = model["graph_module"]
    stack: list[Any] = [graph_module["graph"]]
    if in_signature:
        stack.append(graph_module["signature"])
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            for key in ("name", "as_name"):
                if value.get(key) == old and "arg" not in value:
                    value[key] = new
            for table in ("tensor_values", "sym_int_values"):
                if isinstance(value.get(table), dict) and old in value[table]:
                    value[table][new] = value[table].pop(old)
            stack.extend(v for k, v in value.items() if k != "metadata")


def rename_fqn(base: Path, dest: Path, old: str, new: str) -> Path:
    """Rename parameter/buffer ``old`` in the signature and the weights config alike."""
    def model_edit(model: dict[str, Any]) -> None:
        for spec in model["graph_module"]["signature"]["input_specs"]:
            for body in spec.values():
                for field in ("parameter_name", "buffer_name"):
                    if isinstance(body, dict) and body.get(field) == old:
                        body[field] = new

    def config_edit(config: dict[str, Any]) -> None:
        config["config"][new] = config["config"].pop(old)

    return edit_json(base, dest, {"models/model.json": model_edit,
                                  "data/weights/model_weights_config.json": config_edit})


def fqn_payload(canary: Path) -> str:
    """An FQN that ``.module()`` pastes as ``getattr(self, "<fqn>")``, running the canary."""
    return f'shift") if {open_canary(canary)} else getattr(self, "shift'


def call_target_payload(model: dict[str, Any], target: str, canary: Path) -> None:
    """Point the first aten node at ``target`` (any callable torch can reach by attribute),
    called with one string argument: the shell command that creates the canary."""
    for node in model["graph_module"]["graph"]["nodes"]:
        if node["target"].startswith("torch.ops.aten"):
            node["target"] = target
            node["inputs"] = [{"name": "", "arg": {"as_string": f"touch {canary}"},
                               "kind": 1}]
            return
    raise AssertionError("no aten node to replace")


def torch_save_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


UNGUARDED_LOAD = """
import json, sys, torch
program = torch.export.load(sys.argv[1])
if sys.argv[2] == "call":
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*[d if isinstance(d, int) else 2 for d in shape], generator=gen)
            for shape in json.loads(sys.argv[3])]
    program.module()(*args)
"""


def run_unguarded(path: Path, call_shapes: list[list[int]] | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Load ``path`` with plain ``torch.export.load`` in a fresh process (no Kiln checks), and
    call ``.module()`` on random inputs of ``call_shapes`` when given. Errors are expected:
    the payload's effect (the canary) is what the caller checks."""
    argv = [sys.executable, "-c", UNGUARDED_LOAD, str(path),
            "call" if call_shapes else "load", json.dumps(call_shapes or [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
