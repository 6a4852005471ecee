"""The admin dashboard: each page shows what the database holds, the charts draw the numbers
behind them, everything is escaped, and only admins get in.

Rows are made through the real code paths (upload, submit, claim, succeed) with a worker row
registered the way a worker registers itself; no build runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service import dashboard_queries, jobs, worker_registry
from service.cache import CacheRequest, Target
from service.dashboard_charts import Axis, nice_scale, range_bar
from service.db import upgrade
from service.models import Engine, Model, Submission
from service.services import Services
from service.uploads import save_upload
from tests.conftest import make_settings

TARGET = Target("aoti", "cpu", "x86_64-test", "torch=test")
HOSTILE_NAME = "two<script>alert(1)</script>.pt2"
HOSTILE_LOG = "step 1\n<img src=x onerror=alert(1)>\n"
TIMINGS = {"queued_s": 0.5, "fetch_s": 0.1, "load_s": 0.8, "build_s": 12.0, "validate_s": 2.0,
           "store_s": 0.2, "child_s": 15.1}


def _register_worker(services: Services) -> None:
    with services.db.session() as s:
        worker_registry.heartbeat(
            s, "w1", "gpu-host-1",
            [{**TARGET.as_dict(), "toolchain": {"torch": "test"},
              "queue": worker_registry.queue_name(TARGET)}],
            {"gpu": {"name": "NVIDIA H100", "compute_capability": "sm_90",
                     "memory_mb": 81559, "count": 1}})


def _reports(profile: list[dict[str, Any]], slower_at: tuple[str, ...] = ()
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validation and benchmark reports shaped as workers.validation writes them."""
    validation: dict[str, Any] = {"passed": True, "shapes": {}}
    benchmark: dict[str, Any] = {"unit": "ms", "statistic": "median", "shapes": {}}
    for label in ("min", "opt", "max"):
        shapes = [p[label] for p in profile]
        validation["shapes"][label] = {"shapes": shapes, "passed": True, "outputs": [
            {"output": 0, "dtype": "float32", "max_abs": 2.5e-7, "max_rel": 1.5e-6,
             "atol": 1e-3, "rtol": 1e-3, "nonfinite": 0, "passed": True}]}
        engine_ms, eager_ms = (0.9, 0.3) if label in slower_at else (0.1, 0.4)
        benchmark["shapes"][label] = {"shapes": shapes, "engine_ms": engine_ms,
                                      "eager_ms": eager_ms, "speedup": eager_ms / engine_ms,
                                      "slower_than_eager": engine_ms > eager_ms}
    return validation, benchmark


def _build(services: Services, job_id: str, slower_at: tuple[str, ...] = ()) -> Engine:
    """Claim the job as worker w1 and finish it as workers.tasks does."""
    with services.db.session() as s:
        job = jobs.claim(s, job_id, "w1", lease_s=60)
        assert job is not None
        model = s.get(Model, job.model_id)
        validation, benchmark = _reports(job.profile, slower_at)
        fields = {
            "model_hash": model.model_hash, "graph_hash": model.graph_hash,
            "weights_hash": model.weights_hash, "backend": job.backend, "device": job.device,
            "arch": job.arch, "toolchain_id": job.toolchain_id,
            "toolchain": {"torch": "test"}, "options": job.options, "profile": job.profile,
            "artifact_uri": "file:///nowhere/engine.so", "sha256": "0" * 64,
            "size": 3 * 2**20, "build_seconds": TIMINGS["build_s"],
            "build_report": {"torch": "test", "artifact_suffix": ".so"},
            "validation": validation, "benchmark": benchmark,
        }
        engine = jobs.succeed(s, job.id, job.attempts, "w1", fields, TIMINGS, "built\n")
        assert engine is not None
        return engine


@dataclass
class World:
    services: Services
    model_id: str
    done_job: str
    active_job: str
    engine: Engine


@pytest.fixture
def world(app: Flask, programs: dict[str, Path]) -> World:
    """One built engine; 2 cache hits, 2 new builds and 1 join; one build still running."""
    services: Services = app.extensions["kiln"]
    _register_worker(services)
    with open(programs["two_inputs"], "rb") as f:
        model, _ = save_upload(services, "alice", f, HOSTILE_NAME)
    request = {"model_id": model.id, "backend": "aoti", "device": "cpu"}
    first = jobs.submit(services, "alice", CacheRequest(**request))
    assert first.status == "queued"
    engine = _build(services, first.job.id, slower_at=("max",))
    hits = [jobs.submit(services, "alice", CacheRequest(**request)).status for _ in range(2)]
    assert hits == ["cached"] * 2
    rebuild = {**request, "reuse": "never"}
    second = jobs.submit(services, "alice", CacheRequest(**rebuild))
    assert second.status == "queued"
    assert jobs.submit(services, "alice", CacheRequest(**rebuild)).status == "joined"
    with services.db.session() as s:
        claimed = jobs.claim(s, second.job.id, "w1", lease_s=60)
        assert jobs.renew(s, second.job.id, claimed.attempts, "w1", 60, log_text=HOSTILE_LOG)
    return World(services, model.id, first.job.id, second.job.id, engine)


def _html(client: FlaskClient, path: str, status: int = 200) -> str:
    response = client.get(path)
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "text/html"
    return response.get_data(as_text=True)


def _range_bars(html: str) -> dict[str, dict[str, str]]:
    """Drawn shape ranges by dim label ("x[0]"): the min, max and opt texts in each SVG."""
    out = {}
    for label, body in re.findall(r'<svg class="chart range"[^>]*aria-label="([^":]*):[^"]*"'
                                  r'[^>]*>(.*?)</svg>', html, re.S):
        texts = dict(re.findall(r'<text[^>]*class="(min|max|opt)"[^>]*>([^<]*)</text>', body))
        out[label] = texts
    return out


def _expected_ranges(profile: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """two_inputs: x and mask share a dynamic batch dim (one symbol, drawn once) and a dynamic
    seq dim; x[2] is static and not drawn."""
    x = next(p for p in profile if p["name"] == "x")
    return {label: {"min": str(x["min"][i]), "max": str(x["max"][i]), "opt": f"opt {x['opt'][i]}"}
            for i, label in enumerate(["x[0], mask[0]", "x[1], mask[1]"])}


# ---- pages -------------------------------------------------------------------------------

def test_overview_shows_jobs_workers_hit_rate_and_store(client: FlaskClient, world: World
                                                        ) -> None:
    html = _html(client, "/admin/")
    assert world.done_job in html and world.active_job in html
    assert re.search(r'<span class="n">1</span><span class="label">succeeded</span>', html)
    assert re.search(r'<span class="n">1</span><span class="label">building</span>', html)
    assert 'class="badge phase-building"' in html and 'class="badge phase-succeeded"' in html
    # 5 submissions: 2 answered from the cache, 2 queued a build, 1 joined one.
    assert 'id="hit-rate-window">40%<' in html and 'id="hit-rate-overall">40%<' in html
    assert "2 cached of 5" in html
    # The hit-rate line has a point at 40% in the current hour; the volume bars stack 2+1+2.
    assert "40%</title>" in html
    assert re.search(r"<title>\d\d:00: 2 cached, 1 joined, 2 queued</title>", html)
    # The build-time chart has one bar for the one successful job, linked to it.
    assert f'href="/admin/jobs/{world.done_job}"><title>{world.done_job} · aoti/cpu' in html
    assert "w1" in html and "NVIDIA H100" in html and "aoti/cpu x86_64-test" in html
    assert "3.0 MiB" in html  # the store: one engine of 3 MiB
    assert "<script>alert" not in html and "two&lt;script&gt;" in html


def test_overview_filters_jobs_by_status(client: FlaskClient, world: World) -> None:
    html = _html(client, "/admin/?status=succeeded")
    table = html.split('id="jobs"', 1)[1]
    assert world.done_job in table and world.active_job not in table


def test_job_page_draws_phase_timeline_and_escapes_log(client: FlaskClient, world: World
                                                       ) -> None:
    html = _html(client, f"/admin/jobs/{world.done_job}")
    assert 'class="badge phase-succeeded"' in html and "data-refresh-ms" not in html
    timeline = re.search(r'<svg class="chart"[^>]*aria-label="phases of job[^"]*"[^>]*>(.*?)</svg>',
                         html, re.S)
    assert timeline is not None
    segments = re.findall(r'<rect[^>]*class="series-(\w+)"', timeline.group(1))
    assert segments == ["queued", "fetch", "load", "build", "validate", "store"]
    assert "<title>build 12s</title>" in timeline.group(1)
    assert world.engine.id in html

    active = _html(client, f"/admin/jobs/{world.active_job}")
    assert 'class="badge phase-building"' in active
    assert 'data-refresh-ms="2000"' in active and "kiln.js" in active
    assert "&lt;img src=x onerror=alert(1)&gt;" in active and "<img src=x" not in active
    # The second job was queued with reuse=never although the engine matched: explained.
    misses = active.split("Why the cache missed", 1)[1].split("Build log", 1)[0]
    assert world.engine.id in misses and "reuse=never" in misses


def test_engines_page_draws_each_dynamic_dim(client: FlaskClient, world: World) -> None:
    html = _html(client, "/admin/engines")
    expected = _expected_ranges(world.engine.profile)
    assert _range_bars(html) == expected
    assert expected["x[0], mask[0]"] == {"min": "1", "max": "32", "opt": "opt 2"}
    assert expected["x[1], mask[1]"] == {"min": "2", "max": "128", "opt": "opt 16"}
    row = html.split(world.engine.id, 1)[1]
    assert '<td class="num">2</td>' in row  # hits
    assert "0.1 ms" in row and "vs 0.4 ms eager" in row  # latency at opt
    assert "✓ passed" in row


def test_engine_page_shows_validation_and_benchmark(client: FlaskClient, world: World) -> None:
    html = _html(client, f"/admin/engines/{world.engine.id}")
    assert _range_bars(html) == _expected_ranges(world.engine.profile)
    assert "Slower than eager at: max." in html and "3.00× slower than eager" in html
    bench = re.search(r'aria-label="median latency, engine vs eager"[^>]*>(.*?)</svg>', html, re.S)
    assert bench is not None
    assert re.findall(r'class="series-(engine|eager)"', bench.group(1)) == ["engine", "eager"] * 3
    assert html.count("2.5e-07") == 3 and html.count("1.5e-06") == 3  # max abs/rel per shape
    assert "torch" in html and world.done_job in html


def test_unknown_ids_are_404_pages(client: FlaskClient, world: World) -> None:
    assert "job nope not found" in _html(client, "/admin/jobs/nope", 404)
    assert "engine nope not found" in _html(client, "/admin/engines/nope", 404)


def test_pages_render_on_an_empty_database(client: FlaskClient) -> None:
    for path in ("/admin/", "/admin/?window=30d", "/admin/engines"):
        assert "no data yet" in _html(client, path) or "No engines" in _html(client, path)


# ---- access ------------------------------------------------------------------------------

@pytest.fixture
def keyed_client(tmp_path: Path) -> FlaskClient:
    from service.app import create_app

    settings = make_settings(tmp_path / "kiln",
                             api_keys={"k1": ("alice", "user"), "k2": ("root", "admin")})
    upgrade(settings.database_url)
    return create_app(settings).test_client()


def test_only_admins_get_in(keyed_client: FlaskClient) -> None:
    assert "Sign in" in _html(keyed_client, "/admin/", 401)
    user = keyed_client.get("/admin/", headers={"Authorization": "Bearer k1"})
    assert user.status_code == 403 and "admin" in user.get_data(as_text=True)
    assert keyed_client.get("/admin/engines", headers={"X-API-Key": "k2"}).status_code == 200
    keyed_client.set_cookie("kiln_key", "k2", path="/admin")
    assert keyed_client.get("/admin/").status_code == 200
    keyed_client.set_cookie("kiln_key", "k1", path="/admin")
    assert keyed_client.get("/admin/").status_code == 403
    keyed_client.set_cookie("kiln_key", "wrong", path="/admin")
    assert "not accepted" in _html(keyed_client, "/admin/", 401)
    assert keyed_client.get("/admin/static/kiln.css").status_code == 200  # the sign-in page's


def test_login_sets_a_strict_httponly_cookie_for_the_dashboard_only(keyed_client: FlaskClient
                                                                    ) -> None:
    response = keyed_client.post("/admin/login", data={"key": "k2", "next": "/admin/engines"})
    assert response.status_code == 302 and response.location == "/admin/engines"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("kiln_key=k2;")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert keyed_client.get("/admin/engines").status_code == 200
    # The cookie never authenticates the API, whose writes must not be forgeable cross-site.
    keyed_client.set_cookie("kiln_key", "k2", path="/")
    assert keyed_client.get("/api/v1/jobs").status_code == 401
    # No open redirect off the dashboard.
    away = keyed_client.post("/admin/login", data={"key": "k2", "next": "https://evil.test/"})
    assert away.location == "/admin/"
    assert keyed_client.post("/admin/logout").status_code == 302


def test_without_keys_the_dashboard_is_open(client: FlaskClient) -> None:
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/login").status_code == 302


# ---- hit-rate buckets, on both databases ----------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def db_services(request: pytest.FixtureRequest, tmp_path: Path) -> Services:
    overrides = {}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    services = Services(make_settings(tmp_path / "kiln", **overrides))
    upgrade(services.settings.database_url)
    return services


def test_hit_rate_series_buckets_by_hour_and_day(db_services: Services) -> None:
    now = datetime(2024, 5, 1, 12, 30)
    at = {  # created_at -> outcome
        datetime(2024, 5, 1, 12, 10): "cached", datetime(2024, 5, 1, 12, 20): "queued",
        datetime(2024, 5, 1, 11, 59, 59): "cached", datetime(2024, 5, 1, 11, 0): "joined",
        datetime(2024, 4, 30, 13, 0): "queued",  # the first hour of the 24 h window
        datetime(2024, 4, 30, 12, 59): "cached",  # just outside it
        datetime(2024, 4, 20, 9, 0): "cached",  # outside the 7 d window too
    }
    with db_services.db.session() as s:
        s.add_all(Submission(owner="a", model_id="m", backend="aoti", device="cpu", outcome=o,
                             created_at=t) for t, o in at.items())
    with db_services.db.session() as s:
        hours = dashboard_queries.hit_rate_series(s, "24h", now)
        days = dashboard_queries.hit_rate_series(s, "7d", now)
        overall = dashboard_queries.outcomes_total(s)
    assert len(hours) == 24 and hours[0].start == datetime(2024, 4, 30, 13)
    assert hours[-1].counts == {"cached": 1, "joined": 0, "queued": 1}
    assert hours[-1].hit_rate == 0.5
    assert hours[-2].counts == {"cached": 1, "joined": 1, "queued": 0}
    assert hours[0].counts["queued"] == 1 and hours[0].hit_rate == 0.0
    assert sum(h.total for h in hours) == 5 and hours[5].hit_rate is None
    assert len(days) == 7 and days[-1].start == datetime(2024, 5, 1)
    assert days[-1].total == 4 and days[-2].total == 2 and sum(d.total for d in days) == 6
    assert overall.total == 7 and overall.hit_rate == pytest.approx(4 / 7)


# ---- chart helpers -----------------------------------------------------------------------------

def test_chart_helpers_scale_and_escape() -> None:
    assert [nice_scale(v) for v in (0, 3, 12, 22, 101)] == [
        (1, 1), (3, 1), (15, 5), (30, 10), (150, 50)]
    wide, narrow = Axis.fit(1, 4096), Axis.fit(2, 8)
    assert wide.log and wide.at(64) == pytest.approx(0.5) and not narrow.log
    svg = range_bar(2, 4, 8, narrow, label='<x>"[0]')
    assert "<x>" not in svg and "&lt;x&gt;&#34;[0]" in svg
