"""The HTTP edge as an attacker sends it: no body is read before the key is checked, bodies are
bounded and must be JSON, headers are built by the framework, and "someone else's" looks like
"missing". Raw sockets where the test client would hide what goes over the wire."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, update
from werkzeug.serving import make_server

from service.app import create_app
from service.db import upgrade
from service.models import Engine
from service.services import Services
from tests.conftest import make_settings
from tests.test_api import KEYS, _auth, _build, _profile, _register_worker

ERROR_KEYS = {"code", "message", "details"}


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body = response.json
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body
    return body["error"]


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Flask, Services]:
    settings = make_settings(tmp_path / "kiln", api_keys=KEYS, metrics_token="scrape-me")
    upgrade(settings.database_url)
    app = create_app(settings)
    services = app.extensions["kiln"]
    _register_worker(services)
    return app, services


@pytest.fixture
def served(keyed: tuple[Flask, Services]) -> Iterator[tuple[int, Flask, Services]]:
    """The app behind a real HTTP server on a thread (werkzeug's, as in the live fixture)."""
    app, services = keyed
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port, app, services
    finally:
        server.shutdown()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def gunicorn_api(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The API as production runs it (gunicorn, one sync worker): (port, worker pid)."""
    settings = make_settings(tmp_path / "kiln")
    upgrade(settings.database_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **settings.to_env(), "KILN_API_KEYS": "ka:alice:user"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-w", "1", "-b",
                             f"127.0.0.1:{port}", "service.app:create_app()"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    if b" 200 " in sock.recv(100):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "gunicorn did not start"
            time.sleep(0.3)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        yield port, int(children[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _raw(port: int, head: bytes, body_chunks: Iterator[bytes] = iter(()),
         timeout: float = 10) -> tuple[int, bytes, float]:
    """Send a request head (and body chunks while the server lets us); return the status,
    the raw response and how long the answer took from the end of the head."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        t0 = time.monotonic()
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                (re.search(rb"Content-Length: (\d+)", data) or [0, b"0"])[1]):
            part = sock.recv(65536)
            if not part:
                break
            data += part
        elapsed = time.monotonic() - t0
    status = int(data.split(b" ", 2)[1])
    return status, data, elapsed


def _json_part(raw: bytes) -> dict[str, Any]:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


# ---- authentication before the body ----------------------------------------------------------

def test_unauthenticated_32mib_body_is_answered_401_without_being_read(gunicorn_api) -> None:
    port, worker_pid = gunicorn_api
    size = 32 * 1024 * 1024
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    # Only the head is sent: a server that reads the body before checking the key would wait
    # for 32 MiB that never come and the answer would not arrive.
    status, raw, elapsed = _raw(port, head, timeout=10)
    assert status == 401 and elapsed < 5
    assert _json_part(raw)["error"]["code"] == "unauthorized"
    # And with the bytes actually sent (deep JSON, the worst to parse), the API holds none.
    chunk = b"[" * (1024 * 1024)
    before = _rss_bytes(worker_pid)
    for _ in range(3):
        status, raw, _ = _raw(port, head, iter([chunk] * 32), timeout=30)
        assert status == 401
    assert _rss_bytes(worker_pid) - before < 4 * 1024 * 1024
    # With a key, the same body is refused by its declared size, still unread.
    keyed_head = head.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer ka")
    status, raw, elapsed = _raw(port, keyed_head, timeout=10)
    assert status == 413 and elapsed < 5
    assert _json_part(raw)["error"]["code"] == "body_too_large"
    assert _rss_bytes(worker_pid) - before < 4 * 1024 * 1024


def test_every_api_route_needs_a_key_and_metrics_an_admin_or_the_scrape_token(keyed) -> None:
    app, _ = keyed
    c = app.test_client()
    for path in ("/api/v1/workers", "/api/v1/targets", "/api/v1/models", "/api/v1/jobs",
                 "/api/v1/engines", "/api/v1/engines/eng_x", "/api/v1/jobs/job_x/log"):
        _error(c.get(path), 401, "unauthorized")
    _error(c.post("/api/v1/models", data=b"PK\x03\x04"), 401, "unauthorized")
    assert c.get("/api/v1/workers", headers=_auth("ka")).status_code == 200
    assert c.get("/healthz").status_code == 200
    _error(c.get("/metrics"), 401, "unauthorized")
    _error(c.get("/metrics", headers=_auth("ka")), 403, "forbidden")
    _error(c.get("/metrics", headers=_auth("wrong")), 401, "unauthorized")
    for headers in (_auth("kr"), _auth("scrape-me")):
        r = c.get("/metrics", headers=headers)
        assert r.status_code == 200 and b"kiln_http_requests_total" in r.data
    # The scrape token is no API key.
    _error(c.get("/api/v1/models", headers=_auth("scrape-me")), 401, "unauthorized")


# ---- bodies ----------------------------------------------------------------------------------

def test_json_bodies_are_bounded_json_and_shallow(keyed) -> None:
    app, _ = keyed
    c = app.test_client()
    h = _auth("ka")
    big = json.dumps({"model_id": "m", "options": {"pad": "x" * (2 * 1024 * 1024)}})
    err = _error(c.post("/api/v1/jobs", data=big, content_type="application/json", headers=h),
                 413, "body_too_large")
    assert err["details"]["limit"] == 1024 * 1024
    err = _error(c.post("/api/v1/jobs", data={"model_id": "m"}, headers=h), 400,
                 "unsupported_body")
    assert err["details"]["content_type"] == "application/x-www-form-urlencoded"
    _error(c.post("/api/v1/jobs", data="model_id=m", content_type="text/plain", headers=h),
           400, "unsupported_body")
    for broken in ('{"model_id": ', "{'model_id': 'm'}", "\xff\xfe", "NaN]"):
        _error(c.post("/api/v1/jobs", data=broken, content_type="application/json",
                      headers=h), 400, "malformed_json")
    for depth in (40, 100_000):
        nested = '{"model_id": "m", "options": {"a": ' + "[" * depth + "]" * depth + "}}"
        _error(c.post("/api/v1/jobs", data=nested, content_type="application/json",
                      headers=h), 400, "json_too_deep")
    # Within the limits the request reaches the handler (here: a model that does not exist).
    _error(c.post("/api/v1/jobs", json={"model_id": "mdl_none"}, headers=h), 404, "not_found")


def test_chunked_body_over_the_limit_is_refused_while_reading(served) -> None:
    port, _, _ = served
    head = (b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ka\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    # Valid JSON of 4 MiB, so only its size can be refused.
    parts = [b'{"model_id": "'] + [b"x" * 65536] * 64 + [b'"}']
    chunks = iter([b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"])
    status, raw, _ = _raw(port, head, chunks, timeout=30)
    assert status == 413, raw[:300]
    assert set(_json_part(raw)["error"]) == ERROR_KEYS


def test_profile_dims_are_bounded(keyed, programs) -> None:
    app, _ = keyed
    c = app.test_client()
    model_id = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                      headers=_auth("ka")).json["id"]
    for hi, code in ((2**63, "dim_too_large"), (2**31, "dim_too_large")):
        inputs = _profile(1, 2, 4)
        inputs[0]["max"][0] = hi
        err = _error(c.post("/api/v1/jobs", json={"model_id": model_id, "inputs": inputs},
                            headers=_auth("ka")), 400, "invalid_profile")
        assert [e["code"] for e in err["details"]["errors"]] == [code]
    from service.errors import KilnError
    from service.profiles import MAX_ELEMENTS, resolve_profile

    signature = [{"name": "x", "dtype": "float32", "example_shape": [1, 1],
                  "shape": [{"symbol": "a", "min": 1, "max": None},
                            {"symbol": "b", "min": 1, "max": None}]}]
    with pytest.raises(KilnError) as err_info:
        resolve_profile(signature, [{"name": "x", "min": [1, 1], "opt": [1, 1],
                                     "max": [2**20, 2**20]}])
    assert err_info.value.details["errors"][0]["code"] == "too_many_elements"
    assert err_info.value.details["errors"][0]["limit"] == MAX_ELEMENTS


def test_next_with_cr_lf_does_not_500(tmp_path: Path) -> None:
    for keys in ({}, KEYS):
        settings = make_settings(tmp_path / f"kiln{len(keys)}", api_keys=keys)
        upgrade(settings.database_url)
        c = create_app(settings).test_client()
        for nxt in ("/admin/%0d%0aSet-Cookie:%20a=b", "/admin%0aX: y", "/admin/\\\\evil"):
            r = c.get(f"/admin/login?next={nxt}")
            assert r.status_code in (200, 302), r.status_code
            assert "Set-Cookie" not in r.headers or "a=b" not in r.headers["Set-Cookie"]
            assert "\n" not in r.headers.get("Location", "")


# ---- downloads -------------------------------------------------------------------------------

def _stored_engine(app: Flask, services: Services, tmp_path: Path, programs,
                   suffix: str | None = None) -> tuple[str, bytes, str]:
    c = app.test_client()
    model_id = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                      headers=_auth("ka")).json["id"]
    engine_id = _build(services, "alice", model_id, _profile(1, 4, 8))
    payload = bytes(range(256)) * 64
    blob = tmp_path / "engine.bin"
    blob.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    uri = services.store.put_file(blob, f"engines/{sha}.bin")
    with services.db.session() as s:
        s.execute(update(Engine).where(Engine.id == engine_id).values(
            artifact_uri=uri, sha256=sha, size=len(payload),
            build_report={"artifact_suffix": suffix} if suffix else {}))
    return engine_id, payload, sha


def test_if_range_without_a_strong_matching_etag_gets_the_whole_file(keyed, programs,
                                                                      tmp_path) -> None:
    app, services = keyed
    engine_id, payload, sha = _stored_engine(app, services, tmp_path, programs)
    c = app.test_client()
    url = f"/api/v1/engines/{engine_id}/artifact"
    h = {**_auth("ka"), "Range": "bytes=10-19"}
    part = c.get(url, headers=h)
    assert part.status_code == 206 and part.data == payload[10:20]
    assert c.get(url, headers={**h, "If-Range": f'"{sha}"'}).status_code == 206
    for if_range in ("Tue, 01 Dec 2026 10:00:00 GMT", '""', "", f'W/"{sha}"', '"other"'):
        whole = c.get(url, headers={**h, "If-Range": if_range})
        assert whole.status_code == 200, if_range
        assert whole.data == payload and "Content-Range" not in whole.headers


def test_ranges_and_whole_files_under_gunicorn_are_byte_exact(gunicorn_api, programs,
                                                               tmp_path) -> None:
    """Local engines leave through gunicorn's file wrapper (sendfile from the range's offset
    for Content-Length bytes), whole or in part: every byte where it belongs, none past."""
    import requests

    port, _ = gunicorn_api
    settings = make_settings(tmp_path / "kiln", api_keys={"ka": ("alice", "user")})
    app = create_app(settings)  # the same data dir and database as the gunicorn process
    services = app.extensions["kiln"]
    _register_worker(services)
    engine_id, _, _ = _stored_engine(app, services, tmp_path, programs)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "big.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    uri = services.store.put_file(tmp_path / "big.bin", f"engines/{sha}.bin")
    with services.db.session() as s:
        s.execute(update(Engine).where(Engine.id == engine_id).values(
            artifact_uri=uri, sha256=sha, size=len(payload)))
    url = f"http://127.0.0.1:{port}/api/v1/engines/{engine_id}/artifact"
    whole = requests.get(url, headers=_auth("ka"), timeout=30)
    assert whole.status_code == 200 and whole.content == payload
    n = len(payload)
    for spec, want in (("0-0", payload[:1]), ("1000-2999999", payload[1000:3000000]),
                       ("-500", payload[-500:]), (f"{n - 3}-", payload[-3:]),
                       (f"5-{n + 100}", payload[5:])):
        part = requests.get(url, headers={**_auth("ka"), "Range": f"bytes={spec}"}, timeout=30)
        assert part.status_code == 206, spec
        assert part.content == want, spec
        assert int(part.headers["Content-Length"]) == len(want)


def test_content_disposition_is_built_by_the_framework(keyed, programs, tmp_path) -> None:
    app, services = keyed
    hostile = '.pt2"; filename*=x\r\nSet-Cookie: stolen=1'
    engine_id, payload, _ = _stored_engine(app, services, tmp_path, programs, suffix=hostile)
    c = app.test_client()
    for extra in ({}, {"Range": "bytes=0-9"}):
        r = c.get(f"/api/v1/engines/{engine_id}/artifact", headers={**_auth("ka"), **extra})
        assert r.status_code in (200, 206)
        assert r.headers["Content-Disposition"] == f"attachment; filename={engine_id}.pt2"
        assert "Set-Cookie" not in r.headers
    # A plain recorded suffix is kept.
    with services.db.session() as s:
        s.execute(update(Engine).where(Engine.id == engine_id).values(
            build_report={"artifact_suffix": ".zip"}))
    r = c.get(f"/api/v1/engines/{engine_id}/artifact", headers=_auth("ka"))
    assert r.headers["Content-Disposition"] == f"attachment; filename={engine_id}.zip"


def test_foreign_engine_404_does_the_same_query_work_as_a_missing_one(keyed, programs,
                                                                      tmp_path) -> None:
    app, services = keyed
    engine_id, _, _ = _stored_engine(app, services, tmp_path, programs)
    c = app.test_client()
    statements: list[str] = []

    def _count(conn, cursor, sql, params, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(sql)

    event.listen(services.db.engine, "before_cursor_execute", _count)
    try:
        answers = {}
        for name, ident in (("foreign", engine_id), ("missing", "eng_00000000000000000000")):
            for path in ("", "/artifact"):
                statements.clear()
                r = c.get(f"/api/v1/engines/{ident}{path}", headers=_auth("kb"))
                err = _error(r, 404, "not_found")
                answers[name, path] = (len(statements), err["message"].replace(ident, "ID"))
    finally:
        event.remove(services.db.engine, "before_cursor_execute", _count)
    assert answers["foreign", ""] == answers["missing", ""]
    assert answers["foreign", "/artifact"] == answers["missing", "/artifact"]
    # The owner does see it.
    assert c.get(f"/api/v1/engines/{engine_id}", headers=_auth("ka")).status_code == 200
