"""GET /api/v1/jobs/<id>/events: Server-Sent Events of a job's phases, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from kiln.client import _parse_sse
from service.app import create_app
from service.db import upgrade
from service.job_events import parse_event_id, phase_key
from service.models import Job, Model
from tests.conftest import LiveKiln, make_settings

pytest_plugins = ["tests.kiln_fixtures"]
PHASES = ["queued", "building", "validating", "succeeded"]


def _events(url: str, last_event_id: str | None = None, log: bool = False
            ) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    resp = requests.get(url, headers=headers, params={"log": "1" if log else "0"}, stream=True,
                        timeout=60)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return list(_parse_sse(resp.iter_lines(decode_unicode=True)))


def test_client_followed_every_phase_in_order_live(compiled_module: dict[str, Any]) -> None:
    """kiln.compile followed the build over SSE (not by polling) and saw each phase once."""
    statuses = [e["status"] for e in compiled_module["events"]]
    assert statuses == PHASES
    assert compiled_module["events"][-1]["engine_id"] == compiled_module["engine"].record["id"]


def test_stream_replays_and_resumes_from_last_event_id(live: LiveKiln,
                                                       compiled_module: dict[str, Any]) -> None:
    job_id = compiled_module["engine"].stats.job_id
    url = f"{live.url}/api/v1/jobs/{job_id}/events"
    events = _events(url)
    states = [e for e in events if e["event"] == "state"]
    assert [e["data"]["status"] for e in states] == PHASES
    assert events[-1]["event"] == "end" and events[-1]["data"] == {"status": "succeeded"}
    ids = [e["id"] for e in states]
    assert len(set(ids)) == len(ids)
    resumed = _events(url, last_event_id=ids[1])  # seen: queued, building
    assert [e["data"]["status"] for e in resumed if e["event"] == "state"] == PHASES[2:]
    done = _events(url, last_event_id=ids[-1])
    assert [e["event"] for e in done] == ["end"]


def test_log_lines_resume_without_loss_or_repeat(live: LiveKiln,
                                                 compiled_module: dict[str, Any]) -> None:
    job_id = compiled_module["engine"].stats.job_id
    url = f"{live.url}/api/v1/jobs/{job_id}/events"
    full_log = requests.get(f"{live.url}/api/v1/jobs/{job_id}/log", timeout=30).text
    events = _events(url, log=True)
    logs = [e for e in events if e["event"] == "log"]
    assert "".join(e["data"]["text"] for e in logs) == full_log and full_log
    # Resume half-way through the log: the rest comes once.
    key, offset = parse_event_id(logs[0]["id"])
    resumed = _events(url, last_event_id=logs[0]["id"], log=True)
    text = "".join(e["data"]["text"] for e in resumed if e["event"] == "log")
    assert text == full_log[offset:]


def test_phase_keys_order_retries_after_the_first_attempt() -> None:
    order = [phase_key("queued", 0), phase_key("building", 1), phase_key("validating", 1),
             phase_key("queued", 1), phase_key("building", 2), phase_key("failed", 2)]
    assert order == sorted(order) and len(set(order)) == len(order)
    assert parse_event_id("garbage") == ((-1, -1), 0)


def _job(s: Any, owner: str, status: str) -> Job:
    model = Model(owner=owner, model_hash="a" * 64, graph_hash="b" * 64, weights_hash="c" * 64,
                  sha256="d" * 64, size=1, signature={"inputs": []}, blob_uri="file:///none")
    s.add(model)
    s.flush()
    job = Job(owner=owner, model_id=model.id, backend="aoti", device="cpu", arch="x",
              toolchain_id="t", queue="q", options={}, profile=[], cache_key="k" * 64,
              status=status, timings={}, log="")
    s.add(job)
    s.flush()
    return job


def test_events_are_authenticated_and_per_user(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "kiln", api_keys={"ka": ("alice", "user"),
                                                          "kb": ("bob", "user")})
    upgrade(settings.database_url)
    app = create_app(settings)
    with app.extensions["kiln"].db.session() as s:
        job_id = _job(s, "alice", "cancelled").id
    web = app.test_client()
    url = f"/api/v1/jobs/{job_id}/events"
    assert web.get(url).json["error"]["code"] == "unauthorized"
    other = web.get(url, headers={"Authorization": "Bearer kb"})
    assert other.status_code == 404 and other.json["error"]["code"] == "not_found"
    missing = web.get("/api/v1/jobs/job_nope/events", headers={"Authorization": "Bearer kb"})
    # "Someone else's" and "never existed" answer alike.
    assert missing.status_code == 404
    assert other.json["error"]["message"] == f"job {job_id} not found"
    assert missing.json["error"]["message"] == "job job_nope not found"
    own = web.get(url, headers={"Authorization": "Bearer ka"})
    events = list(_parse_sse(iter(own.get_data(as_text=True).split("\n"))))
    assert [(e["event"], e["data"]["status"]) for e in events] == [
        ("state", "cancelled"), ("end", "cancelled")]


def test_models_can_be_found_by_hash_per_user(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "kiln", api_keys={"ka": ("alice", "user"),
                                                          "kb": ("bob", "user")})
    upgrade(settings.database_url)
    app = create_app(settings)
    with app.extensions["kiln"].db.session() as s:
        _job(s, "alice", "cancelled")
    web = app.test_client()
    mine = web.get(f"/api/v1/models?model_hash={'a' * 64}", headers={"Authorization": "Bearer ka"})
    assert [m["model_hash"] for m in mine.json["models"]] == ["a" * 64]
    assert web.get(f"/api/v1/models?sha256={'d' * 64}",
                   headers={"Authorization": "Bearer ka"}).json["models"]
    # Bob cannot learn that alice uploaded it.
    assert web.get(f"/api/v1/models?model_hash={'a' * 64}",
                   headers={"Authorization": "Bearer kb"}).json == {"models": []}


def test_root_answers_an_index(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "kiln")
    upgrade(settings.database_url)
    index = create_app(settings).test_client().get("/")
    assert index.status_code == 200 and index.json["api"] == "/api/v1"
    assert index.json["dashboard"] == "/admin/"
