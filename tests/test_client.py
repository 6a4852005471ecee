"""kiln.compile / kiln.load / kiln.Client against a real running Kiln (API + worker)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

import kiln
from kiln.client import KilnAPIError
from kiln.compiler import model_hash
from kiln.engine_format import EngineFormatError, file_sha256, read_metadata, sidecar_path
from kiln.loader import ProfileError
from service.archive import inspect_archive
from service.artifacts import open_store
from service.db import Database
from service.models import Engine
from tests.conftest import ROOT, LiveKiln
from tests.kiln_fixtures import INPUT, convnet

pytest_plugins = ["tests.kiln_fixtures"]


def test_import_kiln_needs_no_torch_or_server_packages() -> None:
    code = ("import sys, kiln, kiln.cli; bad = [m for m in ('torch', 'onnxruntime', 'flask', "
            "'sqlalchemy', 'celery', 'service') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_local_model_hash_equals_the_servers(programs: dict[str, Path]) -> None:
    assert model_hash(programs["convnet"]) == inspect_archive(programs["convnet"]).model_hash


def test_compile_a_module_given_only_inputs(compiled_module: dict[str, Any]) -> None:
    engine, module = compiled_module["engine"], compiled_module["module"]
    stats = engine.stats
    assert stats.exported and stats.uploaded and not stats.engine_from_server_cache
    assert stats.bytes_uploaded > 0 and stats.bytes_downloaded == engine.record["size"]
    assert engine.kind == "aoti"
    assert engine.profile[0]["name"] == "x" and engine.profile[0]["max"] == [16, 3, 32, 32]
    with torch.no_grad():
        for batch in (1, 4, 16):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(engine(x), module(x), rtol=1e-3, atol=1e-3)
    print(f"first kiln.compile (export + upload + build + download): "
          f"{compiled_module['seconds']:.1f} s")


def test_engine_refuses_out_of_range_input_with_named_error(compiled_module: dict[str, Any]
                                                            ) -> None:
    engine = compiled_module["engine"]
    with pytest.raises(ProfileError) as err:
        engine(torch.randn(17, 3, 32, 32))
    assert (err.value.input, err.value.dim, err.value.value, err.value.range) == \
        ("x", 0, 17, (1, 16))
    assert "dim 0 of input 'x' is 17, outside the engine's range [1, 16]" in str(err.value)
    with pytest.raises(ProfileError, match=r"dim 2 of input 'x' is 64, outside the engine's "
                                           r"range 32"):
        engine(torch.randn(2, 3, 64, 64))  # a changed static dim: wrong numbers if it ran
    with pytest.raises(ProfileError, match="dim 0 of input 'x' is 0"):
        engine(torch.randn(0, 3, 32, 32))
    with pytest.raises(ProfileError, match="is float64; the engine takes float32"):
        engine(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ProfileError, match="takes 1 inputs"):
        engine(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))


SECOND_CALL = """
import json, sys, time
sys.path.insert(0, "examples")
import torch, kiln
from tests.kiln_fixtures import INPUT, convnet
module = convnet()
t0 = time.perf_counter()
engine = kiln.compile(module, inputs=[kiln.Input(**INPUT)], server=sys.argv[1],
                      cache_dir=sys.argv[2])
seconds = time.perf_counter() - t0
x = torch.randn(3, 3, 32, 32)
ok = torch.allclose(engine(x), module(x), atol=1e-3)
s = engine.stats
print(json.dumps({"seconds": seconds, "up": s.bytes_uploaded, "down": s.bytes_downloaded,
                  "exported": s.exported, "server_hit": s.engine_from_server_cache,
                  "local_hit": s.engine_from_local_cache, "ok": ok}))
"""


def test_second_call_from_a_fresh_process_hits_both_caches(
        live: LiveKiln, compiled_module: dict[str, Any], client_cache: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SECOND_CALL, live.url, str(client_cache)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"second kiln.compile in a fresh process: {result['seconds'] * 1000:.0f} ms")
    assert result["up"] == 0 and result["down"] == 0
    assert result["server_hit"] and result["local_hit"] and not result["exported"]
    assert result["ok"]
    assert result["seconds"] < 1.0


def test_compile_an_exported_program_with_custom_dims(live: LiveKiln, client_cache: Path
                                                      ) -> None:
    module = convnet(seed=11)
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(module, (torch.randn(4, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: batch}})
    engine = kiln.compile(program, inputs=[kiln.Input(min_shape=[2, 3, 32, 32],
                                                      opt_shape=[4, 3, 32, 32],
                                                      max_shape=[8, 3, 32, 32])],
                          server=live.url, cache_dir=client_cache, timeout_s=900)
    assert engine.profile[0]["min"] == [2, 3, 32, 32]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(engine(x), module(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(ProfileError, match="dim 0 of input 'x' is 1, outside the engine's "
                                           r"range \[2, 8\]"):
        engine(torch.randn(1, 3, 32, 32))
    # The same program again (fresh save: other bytes, same canonical hash): no upload.
    again = kiln.compile(program, inputs=[kiln.Input(min_shape=[2, 3, 32, 32],
                                                     opt_shape=[4, 3, 32, 32],
                                                     max_shape=[8, 3, 32, 32])],
                         server=live.url, cache_dir=client_cache)
    assert again.stats.bytes_uploaded == 0 and again.stats.bytes_downloaded == 0
    assert again.stats.engine_from_server_cache and again.stats.engine_from_local_cache


def test_interrupted_download_resumes_with_range(live: LiveKiln,
                                                 compiled_module: dict[str, Any],
                                                 tmp_path: Path) -> None:
    record = compiled_module["engine"].record
    whole = compiled_module["engine"].path.read_bytes()
    dest = tmp_path / "engine.pt2"
    half = len(whole) // 2
    (tmp_path / "engine.pt2.part").write_bytes(whole[:half])  # what an interrupted run left
    client = kiln.Client(live.url)
    client.download(record["id"], dest)
    assert dest.read_bytes() == whole
    assert client.bytes_downloaded == len(whole) - half
    assert not (tmp_path / "engine.pt2.part").exists()


def test_tampered_partial_download_is_refused_and_deleted(live: LiveKiln,
                                                          compiled_module: dict[str, Any],
                                                          tmp_path: Path) -> None:
    record = compiled_module["engine"].record
    part = tmp_path / "engine.pt2.part"
    part.write_bytes(b"\x00" * 1000)  # not a prefix of the engine
    with pytest.raises(KilnAPIError) as err:
        kiln.Client(live.url).download(record["id"], tmp_path / "engine.pt2")
    assert err.value.code == "checksum_mismatch"
    assert not (tmp_path / "engine.pt2").exists() and not part.exists()


def test_engine_altered_in_the_store_is_refused(live: LiveKiln, compiled_module: dict[str, Any],
                                                tmp_path: Path) -> None:
    record = compiled_module["engine"].record
    db = Database(live.settings.database_url)
    with db.session() as s:
        uri = s.get(Engine, record["id"]).artifact_uri
    db.dispose()
    blob = Path(open_store(live.settings.artifact_uri).local_path(uri))  # type: ignore[attr-defined]
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with pytest.raises(KilnAPIError) as err:
            kiln.Client(live.url).download(record["id"], tmp_path / "engine.pt2")
        assert err.value.code == "checksum_mismatch"
        assert not (tmp_path / "engine.pt2").exists()
    finally:
        blob.write_bytes(original)


def test_altered_cached_engine_is_downloaded_again_not_loaded(
        live: LiveKiln, compiled_module: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached = cache / "engines" / compiled_module["engine"].path.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the engine")
    sidecar_path(cached).write_text(sidecar_path(compiled_module["engine"].path).read_text())
    engine = kiln.compile(convnet(), inputs=[kiln.Input(**INPUT)], server=live.url,
                          cache_dir=cache)
    assert not engine.stats.engine_from_local_cache
    assert engine.stats.bytes_downloaded == engine.record["size"]
    assert cached.read_bytes() == compiled_module["engine"].path.read_bytes()


def test_load_enforces_the_profile_stored_with_the_file(compiled_module: dict[str, Any],
                                                        tmp_path: Path) -> None:
    src = compiled_module["engine"].path
    # The package as the worker built it carries its profile (kiln/engine.json under the
    # archive's root): the file alone is enough, as after a plain curl of the artifact.
    alone = tmp_path / "alone.pt2"
    alone.write_bytes(src.read_bytes())
    engine = kiln.load(alone)
    assert engine.kind == "aoti"
    assert [p["name"] for p in engine.profile] == ["x"]
    with pytest.raises(ProfileError, match="dim 0 of input 'x' is 33"):
        engine(torch.randn(33, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(engine(x), compiled_module["module"](x), rtol=1e-4, atol=1e-4)
    # A bare AOTInductor package (the same without that entry): no profile, so refused...
    copy = tmp_path / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not info.filename.endswith("kiln/engine.json"):
                zout.writestr(info, zin.read(info))
    with pytest.raises(EngineFormatError, match="carries no Kiln profile"):
        kiln.load(copy)
    # ... unless the sidecar the client writes is beside it.
    described = {**json.loads(sidecar_path(src).read_text()), "sha256": file_sha256(copy)}
    sidecar_path(copy).write_text(json.dumps(described))
    assert kiln.load(copy).profile == engine.profile
    # A sidecar that describes other bytes is refused.
    altered = bytearray(copy.read_bytes())
    altered[len(altered) // 2] ^= 0xFF  # inside an entry's data: still a readable zip
    copy.write_bytes(bytes(altered))
    with pytest.raises(EngineFormatError, match="replaced or altered"):
        read_metadata(copy)
    copy.write_bytes(bytes(altered[:-10]) + b"0123456789")  # its zip directory broken
    with pytest.raises(EngineFormatError, match="damaged"):
        read_metadata(copy)


def test_load_onnx_engine(live: LiveKiln, tmp_path: Path) -> None:
    from export_convnet import export

    program = tmp_path / "convnet3.pt2"
    export(str(program), seed=3)  # its own model: other tests count the jobs of theirs
    client = kiln.Client(live.url)
    model, _ = client.upload_once(program)
    profile = [{"name": "x", "min": [1, 3, 32, 32], "opt": [2, 3, 32, 32],
                "max": [8, 3, 32, 32]}]
    record = client.wait(client.submit(model["id"], backend="onnx", inputs=profile),
                         timeout_s=900)
    from kiln.cli import _fetch

    path = tmp_path / "convnet.onnx"
    _fetch(client, record, model, path)
    engine = kiln.load(path)
    assert engine.kind == "onnx"
    eager = torch.export.load(program).module()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(engine(x), eager(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(ProfileError, match="dim 0 of input 'x' is 9, outside the engine's range"):
        engine(torch.randn(9, 3, 32, 32))


class _CuttingProxy(ThreadingHTTPServer):
    """Relays to Kiln, but the first engine download stops half-way (connection closed)."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.cuts, self.ranges = upstream, 0, []
        super().__init__(("127.0.0.1", 0), _CuttingHandler)


class _CuttingHandler(BaseHTTPRequestHandler):
    server: _CuttingProxy

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "if-range")}
        self.server.ranges.append(headers.get("Range"))
        up = requests.get(self.server.upstream + self.path, headers=headers, timeout=60)
        body = up.content
        self.send_response(up.status_code)
        for k, v in up.headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.end_headers()
        if "/artifact" in self.path and self.server.cuts == 0:
            self.server.cuts += 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


def test_download_cut_mid_stream_resumes_where_it_stopped(
        live: LiveKiln, compiled_module: dict[str, Any], tmp_path: Path) -> None:
    record = compiled_module["engine"].record
    whole = compiled_module["engine"].path.read_bytes()
    proxy = _CuttingProxy(live.url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = kiln.Client(f"http://127.0.0.1:{proxy.server_port}")
        dest = client.download(record["id"], tmp_path / "engine.pt2",
                               expected_sha256=record["sha256"], expected_size=record["size"])
    finally:
        proxy.shutdown()
    assert dest.read_bytes() == whole
    assert proxy.cuts == 1 and proxy.ranges[0] is None and len(proxy.ranges) == 2
    start = int(proxy.ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(whole) // 2  # resumed from what it had kept, not from zero
    assert client.bytes_downloaded == len(whole)  # no byte fetched twice
