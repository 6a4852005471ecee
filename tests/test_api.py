"""The API's contract without builds: uploads, errors in one shape, search, explain, covering
choice, and what one user can see of another's work. Engines are recorded the way a worker
records them (jobs.claim + jobs.succeed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from flask import Flask

from service import jobs, queries, worker_registry
from service.app import create_app
from service.cache import CacheRequest, Target
from service.db import upgrade
from service.services import Services
from tests.conftest import export_two_inputs, make_settings
from tests.factories import record_engine

TARGET = Target("aoti", "cpu", "x86_64-test", "torch=test")
KEYS = {"ka": ("alice", "user"), "kb": ("bob", "user"), "kr": ("root", "admin")}


def _register_worker(services: Services) -> None:
    with services.db.session() as s:
        worker_registry.heartbeat(s, "w1", "host", [{**TARGET.as_dict(), "toolchain": {},
                                                    "queue": worker_registry.queue_name(TARGET)}],
                                  {})


def _profile(lo: int, opt: int, hi: int, seq: tuple[int, int, int] = (2, 16, 128)) -> list[dict]:
    return [{"name": "x", "min": [lo, seq[0], 8], "opt": [opt, seq[1], 8], "max": [hi, seq[2], 8]},
            {"name": "mask", "min": [lo, seq[0]], "opt": [opt, seq[1]], "max": [hi, seq[2]]}]


def _build(services: Services, owner: str, model_id: str, profile: list[dict]) -> str:
    """Submit and finish a job as a worker would, without running a compiler."""
    result = jobs.submit(services, owner, CacheRequest(**{"model_id": model_id, "backend": "aoti",
                                           "device": "cpu", "inputs": profile,
                                           "reuse": "exact"}))
    job = result.job
    with services.db.session() as s:
        model = queries.get_model(s, model_id, None)
        claimed = jobs.claim(s, job.id, "w1", 60)
        engine = jobs.succeed(s, job.id, claimed.attempts, "w1", record_engine(model, job),
                              {}, "")
        return engine.id


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Flask, Services]:
    settings = make_settings(tmp_path / "kiln", api_keys=KEYS)
    upgrade(settings.database_url)
    app = create_app(settings)
    services = app.extensions["kiln"]
    _register_worker(services)
    return app, services


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_upload_multipart_and_raw_dedupe_and_errors(client, programs: dict[str, Path]) -> None:
    data = programs["two_inputs"].read_bytes()
    first = client.post("/api/v1/models", data={"file": (io.BytesIO(data), "m.pt2")},
                        content_type="multipart/form-data")
    assert first.status_code == 201
    again = client.post("/api/v1/models?filename=x.pt2", data=data)
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    for body, code in ((b"", "empty_upload"), (b"not a zip", "not_a_zip"),
                       (data[: len(data) // 2], "not_a_zip")):
        r = client.post("/api/v1/models", data=body)
        assert r.status_code == 400 and r.json["error"]["code"] == code, r.json
        assert set(r.json["error"]) == {"code", "message", "details"}
    missing = client.get("/api/v1/models/mdl_nope")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"


def test_upload_over_limit_is_413_and_leaves_nothing(tmp_path: Path,
                                                     programs: dict[str, Path]) -> None:
    settings = make_settings(tmp_path / "kiln", max_upload_bytes=10_000)
    upgrade(settings.database_url)
    app = create_app(settings)
    r = app.test_client().post("/api/v1/models", data=programs["two_inputs"].read_bytes())
    assert r.status_code == 413 and r.json["error"]["code"] in ("upload_too_large",
                                                                "request_entity_too_large")
    assert not list((settings.scratch_dir / "uploads").glob("*"))
    assert app.test_client().get("/api/v1/models").json["models"] == []


def test_covering_lookup_picks_nearest_opt_then_narrowest(keyed, programs) -> None:
    app, services = keyed
    c = app.test_client()
    model_id = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                      headers=_auth("ka")).json["id"]
    wide = _build(services, "alice", model_id, _profile(1, 16, 32))
    near = _build(services, "alice", model_id, _profile(1, 4, 32))
    narrow_near = _build(services, "alice", model_id, _profile(2, 4, 8))
    ask = {"model_id": model_id, "inputs": _profile(2, 4, 8, (4, 16, 64))}
    r = c.post("/api/v1/jobs", json=ask, headers=_auth("ka"))
    assert r.status_code == 200 and r.json["engine_id"] == narrow_near
    ask = {"model_id": model_id, "inputs": _profile(2, 4, 16, (4, 16, 64))}
    assert c.post("/api/v1/jobs", json=ask, headers=_auth("ka")).json["engine_id"] == near
    ask = {"model_id": model_id, "inputs": _profile(2, 20, 30, (4, 16, 64))}
    assert c.post("/api/v1/jobs", json=ask, headers=_auth("ka")).json["engine_id"] == wide
    found = c.get(f"/api/v1/engines?model={model_id}&covers=x:2x4x8,8x64x8",
                  headers=_auth("ka")).json["engines"]
    assert [e["id"] for e in found] == [narrow_near, near, wide]  # narrowest first
    # The mask's batch is the same dim as x's: it follows x's range, so only near and wide
    # (batch 1..32) serve batch 1..16; with an opt of 16, wide (tuned at 16) comes first.
    found = c.get(f"/api/v1/engines?model={model_id}&covers=x:1x4x8,16x16x8,16x64x8",
                  headers=_auth("ka")).json["engines"]
    assert [e["id"] for e in found] == [wide, near]
    # Past the program's own range is a bad request, as it is for a submit.
    outside = c.get(f"/api/v1/engines?model={model_id}&covers=x:1x4x8,64x64x8",
                    headers=_auth("ka"))
    assert outside.status_code == 400
    assert outside.json["error"]["code"] == "invalid_profile"


def test_miss_explains_weights_and_range(keyed, programs, tmp_path: Path) -> None:
    app, services = keyed
    c = app.test_client()
    base = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                  headers=_auth("ka")).json
    _build(services, "alice", base["id"], _profile(1, 4, 8))
    other = export_two_inputs(tmp_path / "scaled.pt2", scale=2.0)
    variant = c.post("/api/v1/models", data=other.read_bytes(), headers=_auth("ka")).json
    assert variant["graph_hash"] == base["graph_hash"]
    r = c.get(f"/api/v1/engines/explain?model_id={variant['id']}", headers=_auth("ka")).json
    assert r["hit"] is False
    fields = {d["field"] for m in r["misses"] for d in m["differs"]}
    assert "weights" in fields
    r = c.get(f"/api/v1/engines/explain?model_id={base['id']}&reuse=covering",
              headers=_auth("ka")).json
    profile_miss = [d for m in r["misses"] for d in m["differs"] if d["field"] == "profile"]
    assert profile_miss and profile_miss[0]["input"] == "x" and profile_miss[0]["dim"] == 0


def test_users_see_only_their_own_work(keyed, programs) -> None:
    app, services = keyed
    c = app.test_client()
    alice_model = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                         headers=_auth("ka")).json["id"]
    engine = _build(services, "alice", alice_model, _profile(1, 4, 8))
    assert c.get("/api/v1/models").status_code == 401
    for path in (f"/api/v1/models/{alice_model}", f"/api/v1/engines/{engine}",
                 f"/api/v1/engines/{engine}/artifact"):
        bob = c.get(path, headers=_auth("kb"))
        never = c.get(path.replace(engine, "eng_never").replace(alice_model, "mdl_never"),
                      headers=_auth("kb"))
        assert bob.status_code == never.status_code == 404
        assert bob.json["error"]["code"] == never.json["error"]["code"] == "not_found"
    assert c.get("/api/v1/engines", headers=_auth("kb")).json["engines"] == []
    submit = c.post("/api/v1/jobs", json={"model_id": alice_model}, headers=_auth("kb"))
    assert submit.status_code == 404
    assert c.get(f"/api/v1/engines/{engine}", headers=_auth("kr")).status_code == 200
    assert c.post(f"/api/v1/engines/{engine}/pin", headers=_auth("ka")).status_code == 403
    pinned = c.post(f"/api/v1/engines/{engine}/pin", headers=_auth("kr"))
    assert pinned.status_code == 200 and pinned.json["pinned"] is True


def test_unknown_backend_device_and_options_are_400(client, programs) -> None:
    model_id = client.post("/api/v1/models", data=programs["two_inputs"].read_bytes()).json["id"]
    for body, code in (({"backend": "tvm"}, "unknown_backend"),
                       ({"backend": "tensorrt", "device": "cpu"}, "unsupported_device"),
                       ({"options": {"opt_level": 9}}, "invalid_options"),
                       ({"reuse": "sometimes"}, "invalid_request")):
        r = client.post("/api/v1/jobs", json={"model_id": model_id, **body})
        assert r.status_code == 400 and r.json["error"]["code"] == code, r.json
    r = client.post("/api/v1/jobs", json={"model_id": model_id})
    assert r.status_code == 503 and r.json["error"]["code"] == "no_worker_for_target"


def test_openapi_document_lists_the_api(client) -> None:
    doc = client.get("/api/v1/docs/openapi.json").json
    assert {"/api/v1/jobs", "/api/v1/models", "/api/v1/engines"} <= set(doc["paths"])


def test_a_remembered_hit_whose_engine_was_evicted_is_resolved_afresh(keyed, programs) -> None:
    from sqlalchemy import select, update

    from service.models import Engine, Job, Submission

    app, services = keyed
    c = app.test_client()
    model_id = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                      headers=_auth("ka")).json["id"]
    gone = _build(services, "alice", model_id, _profile(1, 4, 32))
    ask = {"model_id": model_id, "inputs": _profile(2, 4, 8, (4, 16, 64))}
    for _ in range(3):  # the first resolves; the next two reuse this process's answer
        r = c.post("/api/v1/jobs", json=ask, headers=_auth("ka"))
        assert r.status_code == 200 and r.json["engine_id"] == gone
    assert r.json["engine"]["hits"] == 3
    with services.db.session() as s:  # evicted as store_budget.evict does, blob aside
        s.execute(update(Job).where(Job.engine_id == gone).values(engine_id=None))
        s.delete(s.get(Engine, gone))
    other = _build(services, "alice", model_id, _profile(1, 8, 16))
    # Well within RECENT_HIT_S: the remembered engine is gone, so the lookup runs again.
    r = c.post("/api/v1/jobs", json=ask, headers=_auth("ka"))
    assert r.status_code == 200 and r.json["engine_id"] == other
    with services.db.session() as s:
        served = s.scalars(select(Submission.engine_id).where(Submission.outcome == "cached")
                           ).all()
        assert served == [gone] * 3 + [other]  # no submission row counted for the evicted one
        assert s.get(Engine, other).hits == 1


def test_a_download_serves_the_engine_and_marks_it_used_at_most_once_a_minute(
        keyed, programs, tmp_path: Path) -> None:
    """Eviction spares engines used within its grace period: a download marks the engine
    (not every download: at most once a minute), and the bytes and headers are the engine's."""
    import hashlib
    from datetime import timedelta
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from sqlalchemy import update

    from service.models import Engine, utcnow

    app, services = keyed
    c = app.test_client()
    model = c.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                   headers=_auth("ka")).json["id"]
    engine_id = _build(services, "alice", model, _profile(1, 4, 8))
    made = tmp_path / "made.pt2"
    made.write_bytes(b"engine bytes " * 1000)
    blob = Path(url2pathname(urlparse(services.store.put_file(made, "engines/test.pt2")).path))
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    long_ago = utcnow() - timedelta(hours=2)
    with services.db.session() as s:
        s.execute(update(Engine).where(Engine.id == engine_id).values(
            artifact_uri=blob.as_uri(), sha256=sha, size=blob.stat().st_size,
            last_used_at=long_ago))

    def last_used() -> object:
        with services.db.session() as s:
            return s.get(Engine, engine_id).last_used_at  # type: ignore[union-attr]

    r = c.get(f"/api/v1/engines/{engine_id}/artifact", headers=_auth("ka"))
    assert r.status_code == 200 and r.data == blob.read_bytes()
    assert r.headers["X-Kiln-Sha256"] == sha and r.headers["ETag"] == f'"{sha}"'
    assert r.headers["Content-Disposition"] == f"attachment; filename={engine_id}.pt2"
    marked = last_used()
    assert marked is not None and marked > long_ago + timedelta(hours=1)
    again = c.get(f"/api/v1/engines/{engine_id}/artifact", headers={**_auth("ka"),
                                                                   "Range": "bytes=0-5"})
    assert again.status_code == 206 and again.data == b"engine"
    assert last_used() == marked  # within the minute: no second write
