"""Intake of uploads: content-addressed blobs that are never overwritten, repair on re-upload,
one pass plus a hard link into a local store, and memory bombs refused with the API's memory
measured."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.artifacts import LocalArtifactStore
from service.db import upgrade
from service.errors import KilnError
from service.services import Services
from service.uploads import blob_key, save_upload
from tests import hostile_archives as hostile
from tests.conftest import export_two_inputs, make_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def services(tmp_path: Path) -> Services:
    services = Services(make_settings(tmp_path / "kiln"))
    upgrade(services.settings.database_url)
    return services


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_two_inputs(tmp_path_factory.mktemp("uploads") / "two_inputs.pt2")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upload(services: Services, owner: str, path: Path):  # type: ignore[no-untyped-def]
    with open(path, "rb") as stream:
        return save_upload(services, owner, stream, path.name)


def _blob(services: Services, uri: str) -> Path:
    store = services.store
    assert isinstance(store, LocalArtifactStore)
    return store.local_path(uri)


def test_blob_is_stored_under_the_sha256_of_the_uploaded_bytes(services: Services,
                                                               program: Path) -> None:
    model, created = _upload(services, "alice", program)
    assert created
    assert model.sha256 == _sha(program)
    assert model.blob_uri.endswith("/" + blob_key(model.sha256))
    assert _blob(services, model.blob_uri).read_bytes() == program.read_bytes()
    # Nothing is left in scratch; the canonical hash stays the model's key.
    assert not list((services.settings.scratch_dir / "uploads").iterdir())
    assert model.model_hash != model.sha256


def test_same_program_other_bytes_never_touches_another_users_blob(
        services: Services, program: Path, tmp_path: Path) -> None:
    alice, _ = _upload(services, "alice", program)
    alice_bytes = _blob(services, alice.blob_uri).read_bytes()
    # The same program under another root folder name: same canonical hash, other bytes.
    root, found = hostile.entries(program)
    other = hostile.write_zip(tmp_path / "renamed.pt2",
                              [(f"other_root/{n}", d) for n, d in found.items()])
    assert _sha(other) != alice.sha256
    mallory, created = _upload(services, "mallory", other)
    assert created and mallory.model_hash == alice.model_hash
    assert mallory.blob_uri != alice.blob_uri
    assert _blob(services, alice.blob_uri).read_bytes() == alice_bytes
    assert _blob(services, mallory.blob_uri).read_bytes() == other.read_bytes()


def test_reupload_repairs_a_missing_blob(services: Services, program: Path) -> None:
    model, _ = _upload(services, "alice", program)
    _blob(services, model.blob_uri).unlink()
    again, created = _upload(services, "alice", program)
    assert not created and again.id == model.id
    assert _sha(_blob(services, again.blob_uri)) == model.sha256


def test_reupload_repairs_a_damaged_blob(services: Services, program: Path) -> None:
    model, _ = _upload(services, "alice", program)
    blob = _blob(services, model.blob_uri)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    again, created = _upload(services, "alice", program)
    assert not created
    assert _sha(_blob(services, again.blob_uri)) == model.sha256


def test_reupload_with_other_bytes_repairs_from_the_new_bytes(
        services: Services, program: Path, tmp_path: Path) -> None:
    model, _ = _upload(services, "alice", program)
    _blob(services, model.blob_uri).unlink()
    root, found = hostile.entries(program)
    other = hostile.write_zip(tmp_path / "renamed.pt2",
                              [(f"elsewhere/{n}", d) for n, d in found.items()])
    again, created = _upload(services, "alice", other)
    assert not created and again.id == model.id
    assert again.sha256 == _sha(other)
    assert _sha(_blob(services, again.blob_uri)) == again.sha256
    with services.db.session() as s:  # the row was updated, not only the returned object
        from service.models import Model
        row = s.get(Model, model.id)
        assert row is not None and (row.sha256, row.blob_uri) == (again.sha256, again.blob_uri)


def test_intact_blob_is_never_replaced(tmp_path: Path) -> None:
    store = LocalArtifactStore((tmp_path / "store").as_uri())
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    uri = store.put_file(first, "models/x.pt2")
    assert store.put_file(second, "models/x.pt2") == uri
    assert store.local_path(uri).read_bytes() == b"first"
    # A caller that names the sha256 of what the key holds keeps it too.
    sha_first = hashlib.sha256(b"first").hexdigest()
    store.put_file(second, "models/x.pt2", sha256=sha_first)
    assert store.local_path(uri).read_bytes() == b"first"
    assert store.exists(uri) and not store.exists(uri + ".missing")


def test_handover_links_into_a_local_store_instead_of_copying(tmp_path: Path) -> None:
    store = LocalArtifactStore((tmp_path / "store").as_uri())
    local = tmp_path / "upload"
    local.write_bytes(os.urandom(4096))
    linked = store.local_path(store.put_file(local, "models/a.pt2", handover=True))
    copied = store.local_path(store.put_file(local, "models/b.pt2"))
    assert linked.stat().st_ino == local.stat().st_ino
    assert copied.stat().st_ino != local.stat().st_ino  # the default keeps the caller's file apart
    assert not [p for p in linked.parent.iterdir() if p.name.startswith(".incoming-")]


# ---- memory: the API process must not grow on a bomb -------------------------------------

MEASURE = """
import json, resource, sys
from pathlib import Path
from service.db import upgrade
from service.errors import KilnError
from service.services import Services
from service.uploads import save_upload
from tests.conftest import make_settings

services = Services(make_settings(Path(sys.argv[1])))
upgrade(services.settings.database_url)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = None
try:
    with open(sys.argv[2], "rb") as stream:
        save_upload(services, "mallory", stream, "bomb.pt2")
except KilnError as exc:
    code = exc.code
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "growth_mb": (after - before) / 1024}))
"""


def _measure_upload(tmp_path: Path, bomb: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "kiln"), str(bomb)],
                          capture_output=True, text=True, env=env, timeout=600, check=True,
                          cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _json_bomb(program: Path, dest: Path, json_bytes: int, compression: int) -> Path:
    """model.json replaced by ``json_bytes`` of empty lists: ~64 bytes of Python objects per
    3 bytes of JSON once parsed."""
    body = b'{"graph_module": [' + b"[]," * (json_bytes // 3) + b"[]]}"
    found = hostile.entries(program)[1]
    members: list[tuple[zipfile.ZipInfo | str, bytes]] = []
    for name, data in found.items():
        if name == "models/model.json":
            members.append((hostile.zinfo(f"r/{name}", method=compression), body))
        else:
            members.append((f"r/{name}", data))
    return hostile.write_zip(dest, members)


def test_claimed_size_bomb_leaves_api_memory_flat(program: Path, tmp_path: Path) -> None:
    # The 0.3 MB upload that took the API to 4.8 GB: 256 MiB of JSON, deflated, its directory
    # record claiming a compressed size that makes the ratio look harmless.
    bomb = _json_bomb(program, tmp_path / "bomb.pt2", 256 * 1024**2, zipfile.ZIP_DEFLATED)
    raw = bytearray(bomb.read_bytes())
    at = raw.index(b"PK\x01\x02")
    while not raw[at + 46:at + 46 + int.from_bytes(raw[at + 28:at + 30], "little")].endswith(
            b"models/model.json"):
        at = raw.index(b"PK\x01\x02", at + 4)
    raw[at + 20:at + 24] = (256 * 1024**2 // 100).to_bytes(4, "little")
    bomb.write_bytes(bytes(raw))
    assert bomb.stat().st_size < 2 * 1024**2
    result = _measure_upload(tmp_path, bomb)
    print("measured", result)
    assert result["code"] == "archive_extra_bytes"
    assert float(result["growth_mb"]) < 200  # type: ignore[arg-type]


def test_honest_json_bomb_leaves_api_memory_flat(program: Path, tmp_path: Path) -> None:
    # Stored, ratio 1, every size true: only the parse itself would be big (~1.4 GB).
    bomb = _json_bomb(program, tmp_path / "stored.pt2", 64 * 1024**2, zipfile.ZIP_STORED)
    result = _measure_upload(tmp_path, bomb)
    print("measured", result)
    assert result["code"] == "archive_json_too_complex"
    assert float(result["growth_mb"]) < 200  # type: ignore[arg-type]


def test_what_the_rules_miss_the_memory_limit_stops(program: Path, tmp_path: Path) -> None:
    from service.archive.isolated import inspect_isolated

    # 3 M empty objects: under the value-count rule (only the commas count them), ~250 MB
    # once parsed. The child's address-space cap stops it; the same cap passes a real program.
    body = b'{"graph_module": [' + b"{}," * 3_000_000 + b"{}]}"
    bomb = hostile.derive(program, tmp_path / "objects.pt2",
                          replace={"models/model.json": body})
    limit = 400 * 1024**2
    assert inspect_isolated(program, memory_bytes=limit).model_hash
    with pytest.raises(KilnError) as err:
        inspect_isolated(bomb, memory_bytes=limit)
    assert err.value.code == "archive_too_complex"
    assert err.value.details["memory_limit"] == limit


def test_refusal_reaches_the_client_in_the_error_shape(program: Path, tmp_path: Path) -> None:
    from service.app import create_app

    settings = make_settings(tmp_path / "api")
    upgrade(settings.database_url)
    client = create_app(settings).test_client()
    canary = tmp_path / "canary"
    evil = hostile.edit_model_json(program, tmp_path / "evil.pt2", lambda m: hostile.rename_value(
        m, "mask", "mask=" + hostile.open_canary(canary)))
    r = client.post("/api/v1/models", data=evil.read_bytes())
    assert r.status_code == 400
    body = r.get_json()["error"]
    assert body["code"] == "archive_unsafe_input_name"
    assert "mask=" in body["details"]["name"] and body["message"]
    assert not canary.exists()


def test_isolated_inspection_returns_the_same_info(program: Path) -> None:
    from service.archive import inspect_archive
    from service.archive.isolated import inspect_isolated

    assert inspect_isolated(program) == inspect_archive(program)
    with pytest.raises(KilnError) as err:
        inspect_isolated(Path(io.__file__))  # not a zip
    assert err.value.code == "not_a_zip"


def test_stream_to_file_hashes_every_byte_once_written(tmp_path: Path) -> None:
    from service.uploads import stream_to_file

    data = os.urandom(5 * 1024**2 + 123)  # several chunks and a partial one
    dest = tmp_path / "out"
    assert stream_to_file(io.BytesIO(data), dest, 1 << 30) == (
        hashlib.sha256(data).hexdigest(), len(data))
    assert dest.read_bytes() == data
    with pytest.raises(KilnError) as err:
        stream_to_file(io.BytesIO(data), tmp_path / "over", 1024**2)
    assert (err.value.code, err.value.status) == ("upload_too_large", 413)
