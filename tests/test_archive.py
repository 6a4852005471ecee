"""service.archive (inspection without torch or pickle) and workers.program_guard (the load).

Programs are tiny and exported once per module. The hostile corpus is built here, byte by byte
where zipfile would not write what an attacker can; payloads that would run code create a
canary file, and the controls show that plain torch.export.load does create it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.export import Dim, export, save

from service.archive import SCALAR_TYPES, ArchiveLimits, inspect_archive
from service.errors import KilnError
from tests import hostile_archives as hostile
from tests.hostile_archives import derive as _derive
from tests.hostile_archives import edit_model_json as _edit_model_json
from tests.hostile_archives import entries as _entries
from tests.hostile_archives import raw_zip as _raw_zip
from tests.hostile_archives import torch_save_bytes as _torch_save_bytes
from tests.hostile_archives import write_zip as _write_zip
from tests.hostile_archives import zinfo as _zinfo
from workers.program_guard import load_program, verify_pickled_entries

REPO = Path(__file__).resolve().parents[1]

# The same model source is compiled under different file names to get exports that differ only
# in metadata (stack traces, module paths), as when two scripts export one architecture.
NET_SOURCE = """
import torch

class Net(torch.nn.Module):
    def __init__(self, scale, padding):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=padding)
        self.register_buffer("shift", torch.linspace(0, 1, 4).reshape(1, 4, 1, 1))
        self.scale = scale

    def forward(self, x, y):
        return self.conv(x) * self.scale + self.shift, y.sum(dim=1) * self.scale
"""


def _net(seed: int, scale: float = 2.0, padding: int = 1, filename: str = "net_a.py"
         ) -> torch.nn.Module:
    namespace: dict[str, Any] = {"__name__": Path(filename).stem}
    exec(compile(NET_SOURCE, filename, "exec"), namespace)  # noqa: S102 - our own source
    torch.manual_seed(seed)
    return namespace["Net"](scale, padding).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(2, 3, 16, 8, generator=gen), torch.randn(2, 5, generator=gen)


BATCH = Dim("batch", min=1, max=32)
HEIGHT = Dim("height", min=4, max=64)
DYNAMIC = {"x": {0: BATCH, 2: HEIGHT}, "y": {0: BATCH, 1: Dim("n")}}


def _export(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save(export(module, _inputs(), dynamic_shapes=DYNAMIC), str(path))
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("programs")
    base_ep = export(_net(0), _inputs(), dynamic_shapes=DYNAMIC)
    paths = {"base": root / "one" / "base.pt2", "base_again": root / "one" / "again.pt2",
             "base_renamed": root / "two" / "renamed.pt2"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        save(base_ep, str(path))
    paths["other_weights"] = _export(_net(1), root / "w.pt2")
    paths["other_scale"] = _export(_net(0, scale=3.0), root / "s.pt2")
    paths["other_script"] = _export(_net(0, filename="/elsewhere/net_b.py"), root / "b.pt2")

    class Derived(torch.nn.Module):
        def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, a]) + c

    b = Dim("b", min=1, max=8)
    save(export(Derived(), (torch.randn(3), torch.randn(6)),
                dynamic_shapes={"a": {0: b}, "c": {0: 2 * b}}), str(root / "derived.pt2"))
    paths["derived"] = root / "derived.pt2"

    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
            return x * n

    save(export(Scaled(), (torch.randn(3), 4)), str(root / "int_input.pt2"))
    paths["int_input"] = root / "int_input.pt2"
    return paths


# ---------------------------------------------------------------------------------------------
# Signature and hashes


def test_signature_of_dynamic_program(programs: dict[str, Path]) -> None:
    info = inspect_archive(programs["base"])
    x, y = info.inputs
    assert (x.name, x.dtype, y.name, y.dtype) == ("x", "float32", "y", "float32")
    batch, channels, height, width = x.dims
    assert (batch.min, batch.max, batch.hint) == (1, 32, 2)
    assert batch.static is None and batch.symbol and not batch.derived
    assert (height.min, height.max, height.hint) == (4, 64, 16)
    assert height.symbol != batch.symbol
    assert (channels.static, width.static) == (3, 8)
    # One Dim object used twice is one symbol; a Dim without bounds has no max.
    assert y.dims[0].symbol == batch.symbol
    assert y.dims[1].symbol not in (batch.symbol, height.symbol)
    assert y.dims[1].max is None and y.dims[1].hint == 5
    assert info.outputs and len(info.outputs) == 2
    assert info.pickled_entries == ("data/sample_inputs/model.pt",)
    assert info.torch_version == torch.__version__
    assert info.schema_version.split(".")[0] == "8"

    doc = info.to_json()
    json.dumps(doc)
    assert doc["inputs"][0]["shape"] == [
        {"symbol": batch.symbol, "min": 1, "max": 32, "label": "dim 0 of x"}, 3,
        {"symbol": height.symbol, "min": 4, "max": 64, "label": "dim 2 of x"}, 8]
    # A symbol shared by two inputs keeps the label of its first occurrence; no label is a
    # bare internal symbol.
    assert y.dims[0].label == "dim 0 of x" and y.dims[1].label == "dim 1 of y"
    assert doc["inputs"][0]["example_shape"] == [2, 3, 16, 8]
    assert doc["inputs"][1]["shape"][1]["max"] is None


def test_derived_dim(programs: dict[str, Path]) -> None:
    a, c = inspect_archive(programs["derived"]).inputs
    (root,), (derived,) = a.dims, c.dims
    assert (root.min, root.max, root.derived) == (1, 8, False)
    assert derived.derived and derived.symbol == f"2*{root.symbol}"
    assert (derived.min, derived.max, derived.hint) == (2, 16, 6)
    assert derived.to_json() == {"symbol": f"2*{root.symbol}", "min": 2, "max": 16,
                                 "derived": True, "label": "dim 0 of c"}


def test_dim_names_do_not_survive_torch_export_save(programs: dict[str, Path]) -> None:
    # BATCH and HEIGHT are Dim("batch") and Dim("height"): no entry of the archive names them,
    # so labels fall back to positions. If a torch release starts keeping them, this fails and
    # the signature should read them.
    for data in _entries(programs["base"])[1].values():
        assert b"batch" not in data and b"height" not in data


def test_non_tensor_input_is_refused(programs: dict[str, Path]) -> None:
    with pytest.raises(KilnError) as err:
        inspect_archive(programs["int_input"])
    assert err.value.code == "unsupported_input"
    assert err.value.details["input"] == "n"


def test_same_program_saved_twice_or_renamed_hashes_the_same(programs: dict[str, Path]) -> None:
    infos = [inspect_archive(programs[k]) for k in ("base", "base_again", "base_renamed")]
    for attr in ("model_hash", "graph_hash", "weights_hash"):
        assert len({getattr(i, attr) for i in infos}) == 1, attr
    raw = {programs[k].read_bytes() for k in ("base", "base_again", "base_renamed")}
    assert len(raw) > 1  # the files themselves differ (root folder name)


def test_other_weights_change_weights_and_model_hash_only(programs: dict[str, Path]) -> None:
    base, other = inspect_archive(programs["base"]), inspect_archive(programs["other_weights"])
    assert base.graph_hash == other.graph_hash
    assert base.weights_hash != other.weights_hash
    assert base.model_hash != other.model_hash


def test_other_op_argument_changes_graph_hash(programs: dict[str, Path]) -> None:
    base, other = inspect_archive(programs["base"]), inspect_archive(programs["other_scale"])
    assert base.graph_hash != other.graph_hash
    assert base.weights_hash == other.weights_hash


def test_other_script_changes_metadata_only(programs: dict[str, Path]) -> None:
    base, other = inspect_archive(programs["base"]), inspect_archive(programs["other_script"])
    # Stack traces name the exporting file: raw content differs, the computation does not.
    assert base.model_hash != other.model_hash
    assert base.graph_hash == other.graph_hash
    assert base.weights_hash == other.weights_hash


def test_dtype_table_matches_torch() -> None:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    theirs = {int(code): str(dtype).removeprefix("torch.")
              for code, dtype in _SERIALIZE_TO_TORCH_DTYPE.items()}
    assert SCALAR_TYPES == theirs


def test_inspection_does_not_import_torch(programs: dict[str, Path]) -> None:
    code = ("import sys; from service.archive import inspect_archive; "
            f"inspect_archive({str(programs['base'])!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_legit_program_loads_and_runs(programs: dict[str, Path]) -> None:
    program = load_program(programs["base"])
    x, y = torch.randn(5, 3, 24, 8), torch.randn(5, 7)
    got = program.module()(x, y)
    want = _net(0)(x, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# Hostile corpus: zip structure


def _claimed_size_bomb(base: Path, dest: Path, json_bytes: int) -> Path:
    """The 0.3 MB upload that took the API to 4.8 GB: a deflated model.json whose directory
    record claims a compressed size large enough to pass a ratio rule computed from claims."""
    root, found = _entries(base)
    members: list[tuple[zipfile.ZipInfo | str, bytes]] = []
    for name, data in found.items():
        if name == "models/model.json":
            data = b'{"graph_module": [' + b"0," * (json_bytes // 2) + b'0]}'
            members.append((_zinfo(f"{root}/{name}", method=zipfile.ZIP_DEFLATED), data))
        else:
            members.append((f"{root}/{name}", data))
    _write_zip(dest, members)
    raw = bytearray(dest.read_bytes())
    at = raw.index(b"PK\x01\x02")
    while True:  # find model.json's central directory record and patch its compressed size
        name_len = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46:at + 46 + name_len].endswith(b"models/model.json"):
            struct.pack_into("<I", raw, at + 20, json_bytes // 100)
            break
        at = raw.index(b"PK\x01\x02", at + 4)
    dest.write_bytes(bytes(raw))
    return dest


def _case(name: str, base: Path, tmp: Path) -> tuple[Path, ArchiveLimits]:
    dest = tmp / f"{name}.pt2"
    limits = ArchiveLimits()
    root = _entries(base)[0]
    if name == "not_a_zip":
        dest.write_bytes(b"this is not a zip archive\n" * 100)
    elif name == "truncated":
        dest.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    elif name == "empty_zip":
        _write_zip(dest, [])
    elif name == "zip_bomb":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{root}/archive_format", b"pt2")
            zf.writestr(f"{root}/data/weights/weight_0", bytes(16 * 1024**2))
    elif name == "too_many_entries":
        _raw_zip(dest, [f"{root}/e{i}".encode() for i in range(100_000)])
    elif name == "too_large":
        dest.write_bytes(base.read_bytes())
        limits = ArchiveLimits(max_uncompressed_bytes=1000)
    elif name == "json_over_limit":
        dest.write_bytes(base.read_bytes())
        limits = ArchiveLimits(max_json_bytes=100)
    elif name == "json_values":
        dest.write_bytes(base.read_bytes())
        limits = ArchiveLimits(max_json_values=100)
    elif name == "traversal":
        _derive(base, dest, add={"../../evil": b"x"})
    elif name == "absolute":
        _derive(base, dest, raw=[("/etc/evil", b"x")])
    elif name == "backslash":
        _derive(base, dest, raw=[(f"{root}\\..\\evil", b"x")])
    elif name == "drive_letter":
        _derive(base, dest, raw=[("C:/evil", b"x")])
    elif name == "symlink":
        _derive(base, dest, raw=[(_zinfo(f"{root}/extra/link", stat.S_IFLNK | 0o777),
                                  b"/etc/passwd")])
    elif name == "duplicate":
        _derive(base, dest, raw=[(f"{root}/models/model.json", b"{}")])
    elif name == "encrypted":
        _raw_zip(dest, [f"{root}/archive_format".encode()], flags=0x1)
    elif name == "bzip2":
        _derive(base, dest, raw=[(_zinfo(f"{root}/extra/x", method=zipfile.ZIP_BZIP2), b"x")])
    elif name == "aotinductor":
        _derive(base, dest, add={"data/aotinductor/model/model.so": b"\x7fELF"})
    elif name == "shared_library":
        _derive(base, dest, add={"extra/helper.so": b"\x7fELF"})
    elif name == "outside_root":
        _derive(base, dest, raw=[("version", b"1")])
    elif name == "no_model":
        _derive(base, dest, drop=("models/model.json",))
    elif name == "second_model":
        _derive(base, dest, add={"models/evil.json": b"{}"})
    elif name == "bad_json":
        _derive(base, dest, replace={"models/model.json": b'{"graph_module": '})
    elif name == "custom_object":
        _derive(base, dest, add={"data/constants/custom_obj_0": b"\x80\x04N."})
    elif name == "legacy_weights":
        _derive(base, dest, add={"data/weights/model.pt": b"\x80\x04N."})
    elif name == "crc_mismatch":
        # Entries are stored uncompressed, so the JSON is in the file verbatim.
        data = bytearray(base.read_bytes())
        at = data.index(b'"graph_module"') + 2
        data[at] ^= 0x20
        dest.write_bytes(bytes(data))
    elif name == "weight_crc_mismatch":
        # A weight's bytes changed after it was written: read straight from the file (not
        # through zipfile's reader), its CRC-32 is still checked.
        data = bytearray(base.read_bytes())
        with zipfile.ZipFile(base) as zf:
            info = next(i for i in zf.infolist() if "/data/weights/" in i.filename
                        and i.file_size > 0)
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                         info.header_offset + 30])
        data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
        dest.write_bytes(bytes(data))
    elif name == "unreadable_schema":
        _derive(base, dest, replace={"models/model.json": json.dumps(
            {"schema_version": {"major": 99, "minor": 0}, "graph_module": []}).encode()})
    elif name == "config_path":
        config = json.loads(_entries(base)[1]["data/weights/model_weights_config.json"])
        config["config"]["conv.weight"]["path_name"] = "../../models/model.json"
        _derive(base, dest, replace={
            "data/weights/model_weights_config.json": json.dumps(config).encode()})
    elif name == "extra_file":
        _derive(base, dest, add={"extra/notes.txt": b"x" * 100})
    elif name == "unexpected_entry":
        _derive(base, dest, add={"data/weights/nested/w": b"x"})
    elif name == "prefix":
        dest.write_bytes(b"#!/bin/sh\n" * 10 + base.read_bytes())
    elif name == "comment":
        _derive(base, dest)
        with zipfile.ZipFile(dest, "a") as zf:
            zf.comment = b"not part of any entry"
    elif name == "claimed_compressed_size":
        _claimed_size_bomb(base, dest, json_bytes=4 * 1024**2)
    elif name == "directory_with_content":
        _derive(base, dest, raw=[(f"{root}/data/", b"hidden bytes torch would read")])
    elif name == "serialization_id":
        _derive(base, dest, replace={".data/serialization_id": b"9" * 5000})
    elif name == "serialization_id_charset":
        _derive(base, dest, replace={".data/serialization_id": b"../../x"})
    elif name == "empty_weight_record":
        config = json.loads(_entries(base)[1]["data/weights/model_weights_config.json"])
        meta = config["config"]["conv.weight"]
        meta["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
        meta["tensor_meta"]["strides"] = [{"as_int": 1 << 20}, {"as_int": 1}]
        _derive(base, dest, replace={
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/" + meta["path_name"]: b""})
    elif name == "missing_weight":
        config = json.loads(_entries(base)[1]["data/weights/model_weights_config.json"])
        _derive(base, dest, drop=("data/weights/" + config["config"]["conv.bias"]["path_name"],))
    else:
        raise AssertionError(name)
    return dest, limits


HOSTILE = {
    "not_a_zip": "not_a_zip",
    "truncated": "not_a_zip",
    "empty_zip": "not_an_exported_program",
    "zip_bomb": "archive_compression_ratio",
    "too_many_entries": "archive_too_many_entries",
    "too_large": "archive_too_large",
    "json_over_limit": "archive_too_large",
    "json_values": "archive_json_too_complex",
    "traversal": "archive_unsafe_path",
    "absolute": "archive_unsafe_path",
    "backslash": "archive_unsafe_path",
    "drive_letter": "archive_unsafe_path",
    "symlink": "archive_link",
    "duplicate": "archive_duplicate_entry",
    "encrypted": "archive_encrypted",
    "bzip2": "archive_unsupported_compression",
    "aotinductor": "archive_compiled_code",
    "shared_library": "archive_compiled_code",
    "outside_root": "not_an_exported_program",
    "no_model": "not_an_exported_program",
    "second_model": "archive_multiple_models",
    "bad_json": "archive_bad_json",
    "custom_object": "archive_custom_object",
    "legacy_weights": "archive_legacy_format",
    "crc_mismatch": "archive_corrupt",
    "weight_crc_mismatch": "archive_corrupt",
    "unreadable_schema": "archive_unsupported_schema",
    "config_path": "archive_unsafe_path",
    "missing_weight": "not_an_exported_program",
    "extra_file": "archive_extra_files",
    "unexpected_entry": "archive_unexpected_entry",
    "prefix": "archive_extra_bytes",
    "comment": "archive_extra_bytes",
    "claimed_compressed_size": "archive_extra_bytes",
    "directory_with_content": "archive_directory_entry",
    "serialization_id": "archive_bad_serialization_id",
    "serialization_id_charset": "archive_bad_serialization_id",
    "empty_weight_record": "archive_payload_size",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case: str, programs: dict[str, Path],
                                    tmp_path: Path) -> None:
    path, limits = _case(case, programs["base"], tmp_path)
    with pytest.raises(KilnError) as err:
        inspect_archive(path, limits)
    assert err.value.code == HOSTILE[case], err.value.message
    assert err.value.status == 400
    assert err.value.message and isinstance(err.value.details, dict)


def test_unknown_schema_version_is_recorded_not_refused(programs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    def edit(model: dict[str, Any]) -> None:
        model["schema_version"] = {"major": 9, "minor": 1}

    info = inspect_archive(_edit_model_json(programs["base"], tmp_path / "v9.pt2", edit))
    assert info.schema_version == "9.1"
    assert [i.name for i in info.inputs] == ["x", "y"]


def test_non_tensor_user_input_is_refused(programs: dict[str, Path], tmp_path: Path) -> None:
    def edit(model: dict[str, Any]) -> None:
        specs = model["graph_module"]["signature"]["input_specs"]
        specs.append({"user_input": {"arg": {"as_sym_int": {"as_name": "k"}}}})

    with pytest.raises(KilnError) as err:
        inspect_archive(_edit_model_json(programs["base"], tmp_path / "symint.pt2", edit))
    assert err.value.code == "unsupported_input"
    assert (err.value.details["input"], err.value.details["kind"]) == ("k", "as_sym_int")


def test_too_many_entries_is_refused_from_the_end_record(programs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    path, _ = _case("too_many_entries", programs["base"], tmp_path)
    with pytest.raises(KilnError) as err:
        inspect_archive(path)
    assert err.value.details["entries"] == 100_000
    assert err.value.details["limit"] == 10_000
    # Same check, smaller directory: a limit below the count refuses a legit archive too.
    with pytest.raises(KilnError) as err:
        inspect_archive(programs["base"], ArchiveLimits(max_entries=5))
    assert err.value.code == "archive_too_many_entries"


def test_compression_ratio_applies_only_to_large_entries(programs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    # Small, highly compressible entries are normal (JSON); they are within the total bound.
    root, entries = _entries(programs["base"])
    dest = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(f"{root}/{name}", data)
    assert inspect_archive(dest).model_hash


# ---------------------------------------------------------------------------------------------
# Hostile corpus: code execution through pickles and evaluated strings


class _Payload:
    """Unpickling this opens (creates) ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _payload_archive(kind: str, base: Path, dest: Path, canary: Path) -> Path:
    if kind == "sample_inputs":
        return _derive(base, dest, replace={
            "data/sample_inputs/model.pt": _torch_save_bytes(_Payload(canary))})
    if kind == "use_pickle_weight":
        entries = _entries(base)[1]
        config = json.loads(entries["data/weights/model_weights_config.json"])
        meta = config["config"]["conv.weight"]
        meta["use_pickle"] = True
        return _derive(base, dest, replace={
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/" + meta["path_name"]: _torch_save_bytes(_Payload(canary))})
    if kind == "expr_str":
        def edit(model: dict[str, Any]) -> None:
            size = model["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
            size["as_expr"]["expr_str"] = (
                f"__import__('builtins').open({str(canary)!r}, 'w') and "
                + size["as_expr"]["expr_str"])
        return _edit_model_json(base, dest, edit)
    if kind == "guards_code":
        def edit(model: dict[str, Any]) -> None:
            model["guards_code"].append(
                f"__import__('builtins').open({str(canary)!r}, 'w') is not None")
        return _edit_model_json(base, dest, edit)
    raise AssertionError(kind)


def _unguarded(kind: str, path: Path) -> None:
    """What a service without the guard would do with the archive."""
    with contextlib.suppress(Exception):
        program = torch.export.load(str(path))
        if kind == "guards_code":
            program.module()(*_inputs())


PAYLOADS = {
    # kind: (code from inspect_archive, or None when inspection lists it as pickled,
    #        code from load_program)
    "sample_inputs": (None, "archive_unsafe_pickle"),
    "use_pickle_weight": (None, "archive_unsafe_pickle"),
    "expr_str": ("archive_unsafe_expression", "archive_unsafe_expression"),
    "guards_code": ("archive_unsafe_expression", "archive_unsafe_expression"),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_code_in_archive_never_runs(kind: str, programs: dict[str, Path],
                                    tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = _payload_archive(kind, programs["base"], tmp_path / f"{kind}.pt2", canary)
    inspect_code, load_code = PAYLOADS[kind]

    if inspect_code is None:
        info = inspect_archive(path)
        assert any(e.startswith(("data/sample_inputs/", "data/weights/"))
                   for e in info.pickled_entries)
    else:
        with pytest.raises(KilnError) as err:
            inspect_archive(path)
        assert err.value.code == inspect_code
    assert not canary.exists()

    with pytest.raises(KilnError) as err:
        load_program(path)
    assert err.value.code == load_code
    assert err.value.details.get("entry")
    assert not canary.exists()

    # Control: the payload is live, so the assertions above mean something.
    _unguarded(kind, path)
    assert canary.exists(), f"{kind} payload did not run without the guard"


def test_enum_treespec_is_refused(programs: dict[str, Path], tmp_path: Path) -> None:
    def edit(model: dict[str, Any]) -> None:
        sig = model["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(sig["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps(
            [{"__enum__": True, "fqn": "os:path", "name": "sep"}])
        sig["in_spec"] = json.dumps(spec)

    path = _edit_model_json(programs["base"], tmp_path / "enum.pt2", edit)
    with pytest.raises(KilnError) as err:
        inspect_archive(path)
    assert err.value.code == "archive_unsafe_treespec"


def test_pickled_plain_tensor_weight_loads(programs: dict[str, Path], tmp_path: Path) -> None:
    entries = _entries(programs["base"])[1]
    config = json.loads(entries["data/weights/model_weights_config.json"])
    meta = config["config"]["conv.weight"]
    weight = torch.nn.Parameter(_net(0).conv.weight.detach().clone())
    meta["use_pickle"] = True
    path = _derive(programs["base"], tmp_path / "pickled_weight.pt2", replace={
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        "data/weights/" + meta["path_name"]: _torch_save_bytes(weight)})
    info = inspect_archive(path)
    assert "data/weights/" + meta["path_name"] in info.pickled_entries
    program = load_program(path)
    x, y = _inputs()
    torch.testing.assert_close(program.module()(x, y)[0], _net(0)(x, y)[0])


def test_pickled_entry_with_other_objects_is_refused(programs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    # weights_only=True accepts torch.Size and dtypes; the guard wants tensors and plain values.
    path = _derive(programs["base"], tmp_path / "size.pt2", replace={
        "data/sample_inputs/model.pt": _torch_save_bytes(((torch.Size([2, 3]),), {}))})
    with pytest.raises(KilnError) as err:
        verify_pickled_entries(path)
    assert err.value.code == "archive_unsafe_pickle"
    assert err.value.details["entry"] == "data/sample_inputs/model.pt"


def test_reader_disagreement_is_refused(programs: dict[str, Path]) -> None:
    info = inspect_archive(programs["base"])
    forged = dataclasses.replace(info, entry_sha256=tuple(
        (name, "0" * 64 if name == "models/model.json" else digest)
        for name, digest in info.entry_sha256))
    with pytest.raises(KilnError) as err:
        verify_pickled_entries(programs["base"], forged)
    assert err.value.code == "archive_reader_mismatch"


@pytest.mark.parametrize("zip64", [False, True])
def test_raw_zip_builder_writes_valid_archives(zip64: bool, tmp_path: Path) -> None:
    # The 100k-entry case is only meaningful if its file is a real zip (zip64 there).
    path = _raw_zip(tmp_path / "raw.zip", [b"r/a", b"r/b"], zip64=zip64)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["r/a", "r/b"]
        assert zf.testzip() is None
    assert zlib.crc32(b"") == 0  # the builder writes CRC 0 for its empty entries


# ---------------------------------------------------------------------------------------------
# Hostile corpus: strings torch pastes into generated source

SHAPES = [[2, 3, 16, 8], [2, 5]]


def _pasting_archive(kind: str, base: Path, dest: Path, canary: Path) -> Path:
    payload = "y=" + hostile.open_canary(canary)
    if kind == "input_name":  # the last placeholder gets a default argument, run by exec
        return _edit_model_json(base, dest, lambda m: hostile.rename_value(m, "y", payload))
    if kind == "graph_value_name":  # the same in the graph only; the signature still says y
        return _edit_model_json(base, dest, lambda m: hostile.rename_value(
            m, "y", payload, in_signature=False))
    if kind == "buffer_fqn":  # .module() writes getattr(self, "<fqn>")
        return hostile.rename_fqn(base, dest, "shift", hostile.fqn_payload(canary))
    raise AssertionError(kind)


PASTING = {
    "input_name": "archive_unsafe_input_name",
    "graph_value_name": "archive_unsafe_value_name",
    "buffer_fqn": "archive_unsafe_fqn",
}


@pytest.mark.parametrize("kind", sorted(PASTING))
def test_names_pasted_into_source_never_run(kind: str, programs: dict[str, Path],
                                            tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = _pasting_archive(kind, programs["base"], tmp_path / f"{kind}.pt2", canary)
    for check in (inspect_archive, load_program):
        with pytest.raises(KilnError) as err:
            check(path)
        assert err.value.code == PASTING[kind]
        assert err.value.status == 400
        assert err.value.details["entry"] == "models/model.json"
        assert "open(" in err.value.details["name"]  # the offending string, named
    assert not canary.exists()

    # Control: plain torch.export.load (and .module()) in a fresh process runs the payload.
    hostile.run_unguarded(path, SHAPES)
    assert canary.exists(), f"{kind} payload did not run without Kiln's checks"


def test_subgraph_value_names_are_checked(tmp_path: Path) -> None:
    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda a: a + 1, lambda a: a - 1, (x,))

    base = tmp_path / "cond.pt2"
    save(export(Branchy(), (torch.randn(3),)), str(base))
    assert inspect_archive(base).inputs[0].name == "x"  # a real subgraph passes

    def edit(model: dict[str, Any]) -> None:
        cond = next(n for n in model["graph_module"]["graph"]["nodes"]
                    if n["target"] == "torch.ops.higher_order.cond")
        subgraph = cond["inputs"][1]["arg"]["as_graph"]["graph"]
        old = subgraph["inputs"][0]["as_tensor"]["name"]
        hostile.rename_value({"graph_module": {"graph": subgraph, "signature": {}}}, old,
                             "a=" + hostile.open_canary(tmp_path / "canary"))

    with pytest.raises(KilnError) as err:
        inspect_archive(_edit_model_json(base, tmp_path / "evil_cond.pt2", edit))
    assert err.value.code == "archive_unsafe_value_name"
    assert ".as_graph.graph." in err.value.details["where"]


@pytest.mark.parametrize("target", [
    "torch.os.system",  # any callable reachable from torch by attribute resolves
    "builtins.eval",
    "torch.ops.aten.__getattr__.default",
    "torch.ops.aten.__class__.default",
    "torch.ops.aten.__and__.__init__",
    "torch.ops.mylib.evil.default",
    "torch.ops.higher_order.evil",
    "#extension",
])
def test_node_targets_outside_the_operator_allowlist_are_refused(
        target: str, programs: dict[str, Path], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = _edit_model_json(programs["base"], tmp_path / "target.pt2",
                            lambda m: hostile.call_target_payload(m, target, canary))
    with pytest.raises(KilnError) as err:
        inspect_archive(path)
    assert err.value.code == "archive_unsafe_target"
    assert err.value.details["name"] == target
    assert not canary.exists()


@pytest.mark.parametrize("name,code", [
    ("lambda", "archive_unsafe_value_name"),
    ("__class__", "archive_unsafe_value_name"),
    ("torch", "archive_unsafe_value_name"),
    ("a b", "archive_unsafe_value_name"),
    ("a\u0301", "archive_unsafe_value_name"),  # non-ASCII: Python normalises identifiers
])
def test_value_names_must_be_plain_identifiers(name: str, code: str, programs: dict[str, Path],
                                               tmp_path: Path) -> None:
    def edit(model: dict[str, Any]) -> None:
        node = model["graph_module"]["graph"]["nodes"][-1]
        old = node["outputs"][0]["as_tensor"]["name"]
        hostile.rename_value(model, old, name)

    with pytest.raises(KilnError) as err:
        inspect_archive(_edit_model_json(programs["base"], tmp_path / "n.pt2", edit))
    assert err.value.code == code
    assert err.value.details["name"] == name


def test_payload_names_must_match_the_signature(programs: dict[str, Path],
                                                tmp_path: Path) -> None:
    def extra_payload(config: dict[str, Any]) -> None:
        config["config"]["stowaway"] = dict(config["config"]["shift"])

    path = hostile.edit_json(programs["base"], tmp_path / "extra.pt2",
                             {"data/weights/model_weights_config.json": extra_payload})
    with pytest.raises(KilnError) as err:
        inspect_archive(path)
    assert (err.value.code, err.value.details["fqn"]) == ("archive_fqn_mismatch", "stowaway")

    def lift_missing(model: dict[str, Any]) -> None:
        for spec in model["graph_module"]["signature"]["input_specs"]:
            if "buffer" in spec:
                spec["buffer"]["buffer_name"] = "ghost"

    with pytest.raises(KilnError) as err:
        inspect_archive(_edit_model_json(programs["base"], tmp_path / "ghost.pt2",
                                         lift_missing))
    assert err.value.code == "archive_fqn_mismatch"


def test_carriage_return_in_node_metadata_is_refused(programs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    def edit(model: dict[str, Any]) -> None:
        node = model["graph_module"]["graph"]["nodes"][0]
        node["metadata"]["stack_trace"] = 'File "a.py", line 1, in f\r__import__("os")\n  x'

    with pytest.raises(KilnError) as err:
        inspect_archive(_edit_model_json(programs["base"], tmp_path / "cr.pt2", edit))
    assert err.value.code == "archive_control_character"


def test_real_exports_pass_the_name_allowlists(tmp_path: Path) -> None:
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
            self.norm = torch.nn.LayerNorm(8)
            self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.register_buffer("scratch", torch.ones(8), persistent=False)
            self.table = torch.arange(8.0)  # a lifted tensor constant

        def forward(self, input: torch.Tensor, mask: torch.Tensor) -> Any:  # noqa: A002
            for layer in self.layers:
                input = layer(input)
            y, _ = self.att(self.norm(input), input, input)
            torch._check(input.shape[1] < 100)
            return (y + self.scratch + self.table).softmax(-1), mask.nonzero().shape[0]

    path = tmp_path / "mixed.pt2"
    seq = Dim("seq", max=64)
    save(export(Mixed(), (torch.randn(2, 5, 8), torch.ones(3, dtype=torch.bool)),
                dynamic_shapes={"input": {0: Dim("batch", max=16), 1: seq}, "mask": None}),
         str(path))
    info = inspect_archive(path)
    assert [i.name for i in info.inputs] == ["input", "mask"]


@pytest.mark.parametrize("expression", [
    "Integer(2)**Integer(3)**Integer(100)",  # right-associative: 2**(3**100)
    "Pow(Pow(Integer(2), Integer(64)), Integer(64))",
    "Pow(Integer(10), Pow(Integer(10), Integer(12)))",
    "PowByNatural(Integer(2), Symbol('s77', integer=True, positive=True))",
    "Mul(Float('1e99999'), Symbol('s77'))",
    f"Add(Integer('{'9' * 5000}'), Symbol('s77'))",
])
def test_expressions_torch_would_spin_on_are_refused(expression: str,
                                                     programs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    def edit(model: dict[str, Any]) -> None:
        size = model["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = expression

    with pytest.raises(KilnError) as err:
        inspect_archive(_edit_model_json(programs["base"], tmp_path / "pow.pt2", edit))
    assert err.value.code == "archive_unsafe_expression"
    assert err.value.details["where"].endswith("sizes[0].as_expr")


def test_bounded_powers_torch_writes_pass() -> None:
    from service.archive import check_guard, check_sympy_expression

    check_sympy_expression("Pow(Symbol('s0', integer=True, positive=True), Integer(2))")
    check_sympy_expression("FloatPow(Symbol('s0'), Float('0.5'))")
    check_guard("L['x'].size()[0] ** 2 <= 4096")


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["convnet-torch211.pt2", "tiny-torch211.pt2"])
def test_archives_torch_2_11_wrote_on_the_gpu_host_pass_intake(name: str) -> None:
    """Saved by torch 2.11 under Python 3.12 on the lent H200 (zip64 end records). Python 3.12's
    zipfile reports the zip64 record's offset as the end record's location, which once made
    intake refuse every such upload as having "bytes after its end record"."""
    path = DATA / name
    raw = path.read_bytes()
    assert raw.rfind(b"PK\x06\x06") > 0, "the fixture is a zip64 archive"
    first = inspect_archive(path).inputs[0]
    assert first.name == "x" and first.dims[0].min == 1 and first.dims[0].label == "dim 0 of x"


def test_a_byte_after_the_end_record_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "extra.pt2"
    bad.write_bytes((DATA / "tiny-torch211.pt2").read_bytes() + b"\0")
    with pytest.raises(KilnError) as exc:
        inspect_archive(bad)
    assert exc.value.code == "archive_extra_bytes"


class _MaskAnd(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * ((mask > 0) & (x > 0)).float()


def test_aten_operators_with_dunder_names_pass(tmp_path: Path) -> None:
    """``a & b`` on tensors exports as aten.__and__.Tensor (transformers' mask code has it):
    MiniLM's architecture was refused until these were allowed."""
    path = tmp_path / "mask_and.pt2"
    save(export(_MaskAnd(), (torch.randn(2, 4), torch.ones(2, 4))), path)
    assert "torch.ops.aten.__and__.Tensor" in zipfile.ZipFile(path).read(
        next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("models/model.json"))
    ).decode()
    assert inspect_archive(path).inputs[0].name == "x"
