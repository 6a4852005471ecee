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
from sqlalchemy import func, select

from service import jobs, queries, worker_registry
from service.cache import CacheRequest, Target
from service.dashboard import queries as dashboard_queries
from service.dashboard.charts import Axis, nice_scale, range_bar
from service.db import upgrade
from service.models import ApiKey, AuditEntry, Engine, Job, Model, Submission, Worker, utcnow
from service.services import Services
from service.uploads import save_upload
from tests.conftest import make_settings
from tests.factories import record_engine

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
        blob = services.settings.scratch_dir / f"{job.id}.so"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"engine-bytes")
        uri = services.store.put_file(blob, f"engines/{job.id}.so")
        record = record_engine(
            model, job, toolchain={"torch": "test"}, artifact_uri=uri,
            size=3 * 2**20, build_seconds=TIMINGS["build_s"],
            build_report={"torch": "test", "artifact_suffix": ".so"},
            validation=validation, benchmark=benchmark)
        engine = jobs.succeed(s, job.id, job.attempts, "w1", record, TIMINGS, "built\n")
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
    return make_world(app, programs)


def make_world(app: Flask, programs: dict[str, Path], owner: str = "alice") -> World:
    """One built engine; 2 cache hits, 2 new builds and 1 join; one build still running."""
    services: Services = app.extensions["kiln"]
    _register_worker(services)
    with open(programs["two_inputs"], "rb") as f:
        model, _ = save_upload(services, owner, f, HOSTILE_NAME)
    request = {"model_id": model.id, "backend": "aoti", "device": "cpu"}
    first = jobs.submit(services, owner, CacheRequest(**request))
    assert first.status == "queued"
    engine = _build(services, first.job.id, slower_at=("max",))
    hits = [jobs.submit(services, owner, CacheRequest(**request)).status for _ in range(2)]
    assert hits == ["cached"] * 2
    rebuild = {**request, "reuse": "never"}
    second = jobs.submit(services, owner, CacheRequest(**rebuild))
    assert second.status == "queued"
    assert jobs.submit(services, owner, CacheRequest(**rebuild)).status == "joined"
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

ADMIN_KEY, USER_KEY = "k2-admin-secret", "k1-user-secret"


@pytest.fixture
def keyed_app(tmp_path: Path) -> Flask:
    from service.app import create_app

    settings = make_settings(tmp_path / "kiln", api_keys={USER_KEY: ("alice", "user"),
                                                          ADMIN_KEY: ("root", "admin")})
    upgrade(settings.database_url)
    return create_app(settings)


@pytest.fixture
def keyed_client(keyed_app: Flask) -> FlaskClient:
    return keyed_app.test_client()


def csrf_token(client: FlaskClient, path: str = "/admin/login") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def sign_in(client: FlaskClient, key: str, next_: str = "/admin/") -> Any:
    return client.post("/admin/login", data={"key": key, "next": next_,
                                              "csrf_token": csrf_token(client)})


def session_cookie(client: FlaskClient) -> str | None:
    cookie = client.get_cookie("kiln_session", path="/admin")
    return cookie.value if cookie else None


def test_only_admins_get_in(keyed_client: FlaskClient) -> None:
    assert "Sign in" in _html(keyed_client, "/admin/", 401)
    user = keyed_client.get("/admin/", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert user.status_code == 403 and "admin" in user.get_data(as_text=True)
    assert keyed_client.get("/admin/engines", headers={"X-API-Key": ADMIN_KEY}).status_code == 200
    # The old cookie that carried the key itself is no longer read.
    keyed_client.set_cookie("kiln_key", ADMIN_KEY, path="/admin")
    assert keyed_client.get("/admin/").status_code == 401
    assert keyed_client.get("/admin/static/kiln.css").status_code == 200  # the sign-in page's


def test_sign_in_checks_the_key_before_storing_anything(keyed_client: FlaskClient) -> None:
    wrong = sign_in(keyed_client, "not-a-key")
    assert wrong.status_code == 401 and "not accepted" in wrong.get_data(True)
    assert "key_hash" not in keyed_client.get("/admin/login").get_data(True)
    user = sign_in(keyed_client, USER_KEY)
    assert user.status_code == 403 and "user key" in user.get_data(True)
    assert keyed_client.get("/admin/").status_code == 401  # nothing was stored for either

    ok = sign_in(keyed_client, ADMIN_KEY, "/admin/engines")
    assert ok.status_code == 302 and ok.location == "/admin/engines"
    cookie = ok.headers["Set-Cookie"]
    assert cookie.startswith("kiln_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert ADMIN_KEY not in cookie  # the session holds the key's hash, signed, never the key
    assert keyed_client.get("/admin/engines").status_code == 200
    # The session never authenticates the API, whose writes must not be forgeable cross-site.
    assert keyed_client.get("/api/v1/jobs").status_code == 401


def test_sign_in_refuses_a_post_without_its_csrf_token(keyed_client: FlaskClient) -> None:
    response = keyed_client.post("/admin/login", data={"key": ADMIN_KEY})
    assert response.status_code == 400 and "CSRF" in response.get_data(True)
    assert keyed_client.get("/admin/").status_code == 401


@pytest.mark.parametrize("target", [
    "https://evil.test/", "//evil.test/", "/admin/\r\nSet-Cookie: x=1",
    "/admin\nLocation: https://evil.test", "/api/v1/jobs", "/admin/\\evil.test"])
def test_next_never_leaves_the_dashboard_and_never_breaks(keyed_client: FlaskClient,
                                                          target: str) -> None:
    page = keyed_client.get("/admin/login", query_string={"next": target})
    assert page.status_code == 200
    response = sign_in(keyed_client, ADMIN_KEY, target)
    assert response.status_code == 302 and response.location == "/admin/"
    assert "x=1" not in str(response.headers)


def test_the_403_page_does_not_link_back_into_a_403(keyed_client: FlaskClient) -> None:
    html = _html_with(keyed_client, "/admin/jobs", 403, {"Authorization": f"Bearer {USER_KEY}"})
    links = set(re.findall(r'href="([^"]+)"', html)) - {"/admin/static/kiln.css"}
    assert links == {"/admin/login"}
    assert keyed_client.get("/admin/login", headers={"Authorization": f"Bearer {USER_KEY}"}
                            ).status_code == 200


def _html_with(client: FlaskClient, path: str, status: int, headers: dict[str, str]) -> str:
    response = client.get(path, headers=headers)
    assert response.status_code == status
    return response.get_data(as_text=True)


def test_sign_out_is_a_post_with_csrf_and_ends_the_session(keyed_client: FlaskClient) -> None:
    sign_in(keyed_client, ADMIN_KEY)
    assert keyed_client.get("/admin/logout").status_code == 405
    assert keyed_client.post("/admin/logout").status_code == 400  # no token
    assert keyed_client.get("/admin/").status_code == 200
    out = keyed_client.post("/admin/logout", data={"csrf_token": csrf_token(keyed_client,
                                                                             "/admin/")})
    assert out.status_code == 302
    assert keyed_client.get("/admin/").status_code == 401


def test_a_revoked_database_key_ends_its_sessions(keyed_app: Flask) -> None:
    from service import api_keys

    services: Services = keyed_app.extensions["kiln"]
    with services.db.session() as s:
        new = api_keys.create(s, "ops", "admin")
    client = keyed_app.test_client()
    assert sign_in(client, new.secret).status_code == 302
    assert client.get("/admin/keys").status_code == 200
    with services.db.session() as s:
        api_keys.revoke(s, new.row.id)
    assert client.get("/admin/keys").status_code == 401


def test_without_keys_the_dashboard_is_open(client: FlaskClient) -> None:
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/login").status_code == 302
    # A browser asking for the service root lands on the dashboard; a script gets the index.
    root = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert root.status_code == 302 and root.location == "/admin/"
    assert client.get("/").get_json()["dashboard"] == "/admin/"


# ---- the role matrix and CSRF on every form ---------------------------------------------------

def _routes(app: Flask) -> list[tuple[str, str]]:
    """Every dashboard route and method, with the world's ids filled in."""
    out = []
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("dashboard.") or rule.endpoint == "dashboard.static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, rule.rule))
    return out


def _fill(rule: str, world: World) -> str:
    return (rule.replace("<job_id>", world.active_job).replace("<engine_id>", world.engine.id)
            .replace("<worker_id>", "w1").replace("<key_id>", "key_x"))


def test_a_user_key_gets_no_dashboard_data_anywhere(keyed_app: Flask,
                                                    programs: dict[str, Path]) -> None:
    # alice's objects and root's; alice holds a user key.
    world = make_world(keyed_app, programs, owner="alice")
    client = keyed_app.test_client()
    routes = _routes(keyed_app)
    assert len(routes) >= 20
    for method, rule in routes:
        if rule == "/admin/login":
            continue
        path = _fill(rule, world)
        response = client.open(path, method=method,
                               headers={"Authorization": f"Bearer {USER_KEY}"})
        if method == "POST":  # a user cannot even get a token: refused before the view
            assert response.status_code in (400, 403), (method, path)
        else:
            assert response.status_code == 403, (method, path)
        body = response.get_data(as_text=True)
        assert world.engine.id not in body and world.done_job not in body, (method, path)
    # And with a token from a real admin session, a user key still gets 403 on every POST.
    admin = keyed_app.test_client()
    sign_in(admin, ADMIN_KEY)
    token = csrf_token(admin, "/admin/")
    for method, rule in routes:
        if method == "POST" and rule not in ("/admin/login", "/admin/logout"):
            response = admin.post(_fill(rule, world), data={"csrf_token": token},
                                  headers={"Authorization": f"Bearer {USER_KEY}"})
            assert response.status_code == 403, rule
    with keyed_app.extensions["kiln"].db.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action != "session.sign_in")) == 0
        assert s.get(Engine, world.engine.id) is not None


def test_every_form_post_without_its_token_is_refused(client: FlaskClient, world: World
                                                      ) -> None:
    app = client.application
    for method, rule in _routes(app):
        if method != "POST":
            continue
        path = _fill(rule, world)
        for data in ({}, {"csrf_token": "forged"}):
            response = client.post(path, data=data)
            assert response.status_code == 400, (path, data)
            assert "CSRF" in response.get_data(as_text=True)
    with world.services.db.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEntry)) == 0
        assert s.get(Engine, world.engine.id).pinned is False
        assert queries.get_job(s, world.active_job, None).status == "building"


# ---- actions, each audited -----------------------------------------------------------------

def _post(client: FlaskClient, path: str, **data: str) -> Any:
    return client.post(path, data={"csrf_token": csrf_token(client, "/admin/keys"), **data})


def _audit(services: Services) -> list[tuple[str, str, str]]:
    with services.db.session() as s:
        return [(e.actor, e.action, e.object_id) for e in
                s.scalars(select(AuditEntry).order_by(AuditEntry.id))]


def test_actions_change_state_and_are_audited(client: FlaskClient, world: World) -> None:
    services = world.services
    engine_id = world.engine.id
    assert _post(client, f"/admin/engines/{engine_id}/pin").status_code == 302
    with services.db.session() as s:
        assert s.get(Engine, engine_id).pinned is True
    refused = _post(client, f"/admin/engines/{engine_id}/evict")
    assert refused.status_code == 409 and "unpin it first" in refused.get_data(True)
    assert _post(client, f"/admin/engines/{engine_id}/unpin").status_code == 302
    assert _post(client, f"/admin/jobs/{world.active_job}/cancel").status_code == 302
    with services.db.session() as s:
        assert queries.get_job(s, world.active_job, None).status == "cancelled"
    retried = _post(client, f"/admin/jobs/{world.active_job}/retry")
    assert retried.status_code == 302
    new_job = retried.location.rsplit("/", 1)[1]
    with services.db.session() as s:
        again = queries.get_job(s, new_job, None)
        assert again.status == "queued" and again.owner == "alice" and new_job != world.active_job
    assert _post(client, "/admin/workers/w1/drain").status_code == 302
    with services.db.session() as s:
        assert s.get(Worker, "w1").drain_requested_at is not None
    assert "draining" in _html(client, "/admin/workers")
    blob = services.store.local_path(world.engine.artifact_uri)
    assert blob.exists()
    assert _post(client, f"/admin/engines/{engine_id}/evict").status_code == 302
    assert not blob.exists()
    with services.db.session() as s:
        assert s.get(Engine, engine_id) is None
        # the job keeps its record
        assert queries.get_job(s, world.done_job, None).engine_id is None
    assert _audit(services) == [
        ("local", "engine.pin", engine_id), ("local", "engine.unpin", engine_id),
        ("local", "job.cancel", world.active_job), ("local", "job.retry", world.active_job),
        ("local", "worker.drain", "w1"), ("local", "engine.evict", engine_id)]
    page = _html(client, "/admin/audit")
    assert page.count("<code>engine.") == 3 and "127.0.0.1" in page
    filtered = _html(client, "/admin/audit?state=job.cancel").split('id="audit"', 1)[1]
    assert "<code>job.cancel</code>" in filtered and "<code>engine.pin</code>" not in filtered


def test_download_from_the_dashboard_streams_the_engine_and_is_audited(
        client: FlaskClient, world: World) -> None:
    services = world.services
    response = _post(client, f"/admin/engines/{world.engine.id}/download")
    assert response.status_code == 200 and response.get_data() == b"engine-bytes"
    assert "attachment" in response.headers["Content-Disposition"]
    assert _audit(services) == [("local", "engine.download", world.engine.id)]


def test_keys_are_created_shown_once_and_revoked_from_the_dashboard(
        keyed_app: Flask) -> None:
    client = keyed_app.test_client()
    sign_in(client, ADMIN_KEY)
    created = _post(client, "/admin/keys", owner="bob", role="user", note="ci")
    assert created.status_code == 201 and created.headers["Cache-Control"] == "no-store"
    secret = re.search(r'<pre class="secret">([^<]+)</pre>', created.get_data(True)).group(1)
    listing = _html(client, "/admin/keys")
    assert secret not in listing and "bob" in listing and "ci" in listing
    api = keyed_app.test_client()
    assert api.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"}
                   ).status_code == 200
    services: Services = keyed_app.extensions["kiln"]
    with services.db.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.owner == "bob")).one()
        assert row.key_hash != secret and secret not in str(row.__dict__)
    assert _post(client, f"/admin/keys/{row.id}/revoke").status_code == 302
    assert api.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"}
                   ).status_code == 401
    bad = _post(client, "/admin/keys", owner="eve", role="root")
    assert bad.status_code == 400 and "role must be one of" in bad.get_data(True)
    actions = [(a, o) for _, a, o in _audit(services)]
    assert ("key.create", row.id) in actions and ("key.revoke", row.id) in actions
    assert [a for _, a, _ in _audit(services)].count("key.create") == 1


# ---- finding things ------------------------------------------------------------------------

def test_lists_filter_search_and_page(client: FlaskClient, world: World) -> None:
    jobs_page = _html(client, "/admin/jobs?state=succeeded")
    table = jobs_page.split('id="jobs"', 1)[1]
    assert world.done_job in table and world.active_job not in table
    assert world.active_job in _html(client, f"/admin/jobs?q={world.active_job}")
    assert world.done_job not in _html(client, f"/admin/jobs?q={world.active_job}").split(
        'id="jobs"', 1)[1]
    assert "No jobs match" in _html(client, "/admin/jobs?owner=nobody")
    assert "No jobs match" in _html(client, "/admin/jobs?target=onnx")
    assert world.done_job in _html(client, "/admin/jobs?target=aoti/cpu")
    assert "No jobs match" in _html(client, "/admin/jobs?q=%25")  # LIKE wildcards are literal
    assert world.done_job in _html(client, f"/admin/jobs?model={world.model_id}")
    assert world.engine.id in _html(client, f"/admin/engines?q={world.engine.sha256[:10]}")
    assert "No engines match" in _html(client, "/admin/engines?state=pinned")
    models = _html(client, "/admin/models?q=script")
    assert world.model_id in models and "two&lt;script&gt;" in models
    row = models.split(world.model_id, 1)[1]
    # 2 jobs, 1 engine, 2 cache hits for this upload.
    assert re.search(r'>2</a></td>\s*<td class="num"><a [^>]*>1</a></td>\s*'
                     r'<td class="num">2</td>', row)
    # Paging: 30 more jobs make two pages of 25 on the jobs list.
    services = world.services
    with services.db.session() as s:
        template = queries.get_job(s, world.done_job, None)
        for i in range(30):
            s.add(Job(owner="alice", model_id=world.model_id, backend="aoti", device="cpu",
                      arch=template.arch, toolchain_id=template.toolchain_id,
                      queue=template.queue, options={}, profile=template.profile,
                      cache_key=f"k{i}", status="failed", error_code="build_failed",
                      timings={}, log="", miss_reasons=[]))
    first = _html(client, "/admin/jobs")
    assert "page 1 of 2 · 32 in all" in first and 'rel="next" href="/admin/jobs?page=2"' in first
    second = _html(client, "/admin/jobs?page=2&state=failed")
    assert "page 2 of 2 · 30 in all" in second and second.count('class="badge phase-failed"') == 5


def test_workers_page_shows_history_counts_and_queue_depth(client: FlaskClient, world: World
                                                           ) -> None:
    from datetime import timedelta

    services = world.services
    with services.db.session() as s:
        s.add(Worker(id="w-gone", hostname="old-host", targets=[], host={},
                     last_seen_at=utcnow() - timedelta(hours=2)))
        for job in s.scalars(select(Job)):
            job.log = f"kiln: job {job.id} attempt 1 on w1\n" + job.log
    html = _html(client, "/admin/workers")
    rows = dict(re.findall(r"<strong>([^<]+)</strong>.*?badge state-(\w+)", html, re.S))
    assert rows == {"w1": "online", "w-gone": "lost"}
    w1 = html.split("<strong>w1</strong>", 1)[1].split("</tr>", 1)[0]
    assert re.findall(r'<td class="num">(\d+)</td>', w1) == ["1", "0"]  # 1 built, 0 failed
    queues = html.split('id="queues"', 1)[1].split("</table>", 1)[0]
    assert "aoti/cpu" in queues and re.findall(r'<td class="num">(\d+)</td>', queues) == ["0", "1"]


def test_a_drained_worker_stops_taking_jobs_and_keeps_its_row(tmp_path: Path) -> None:
    """The real worker process: it reads the drain flag on its heartbeat, shuts down warm
    (Celery finishes the task in hand first), exits 0, and its row stays for the history."""
    import time

    from tests.conftest import start_worker, wait_for_worker

    settings = make_settings(tmp_path / "kiln", worker_ttl_s=6)
    upgrade(settings.database_url)
    proc = start_worker(settings, tmp_path / "worker.log", "--backends", "aoti")
    try:
        wait_for_worker(settings, proc)
        services = Services(settings)
        with services.db.session() as s:
            worker = s.scalars(select(Worker)).one()
            worker.drain_requested_at = utcnow()
            worker_id = worker.id
        t0 = time.monotonic()
        assert proc.wait(timeout=60) == 0
        took = time.monotonic() - t0
        log = (tmp_path / "worker.log").read_text()
        assert "drain requested" in log
        with services.db.session() as s:
            row = s.get(Worker, worker_id)
            assert row is not None and row.drain_requested_at is not None
        from service.app import create_app

        html = create_app(settings).test_client().get("/admin/workers").get_data(as_text=True)
        assert took < 30 and ("draining" in html or "drained" in html)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- defects fixed -------------------------------------------------------------------------

def test_failed_job_shows_plain_error_and_its_failing_phase(client: FlaskClient, world: World
                                                            ) -> None:
    from datetime import timedelta

    with world.services.db.session() as s:
        job = queries.get_job(s, world.active_job, None)
        job.status, job.finished_at = "failed", job.started_at + timedelta(seconds=9)
        job.error_code = "build_failed"
        job.error_message = "\x1b[1m\x1b[31merror:\x1b[0m undefined symbol"
        job.timings = {"queued_s": 0.5, "fetch_s": 0.5, "load_s": 1.0}
        job.log = "\x1b[33mwarning\x1b[0m: slow\n"
    html = _html(client, f"/admin/jobs/{world.active_job}")
    assert "\x1b" not in html and "[31m" not in html
    assert "error: undefined symbol" in html and "warning: slow" in html
    timeline = re.search(r'aria-label="phases of job[^"]*"[^>]*>(.*?)</svg>', html, re.S)
    assert timeline is not None
    assert re.findall(r'class="series-([\w-]+)"', timeline.group(1)) == [
        "queued", "fetch", "load", "build-failed"]
    assert "<title>build (failed) 7.5s</title>" in timeline.group(1)
    assert "Retry" in html and "Cancel job" not in html


def test_trends_page_draws_labelled_charts(client: FlaskClient, world: World) -> None:
    html = _html(client, "/admin/trends")
    for title in ("failed", "stored", "day (UTC); failed/finished above"):
        assert 'class="axis-title"' in html and f">{title}</text>" in html
    # One finished job today: a bar with its count, not a lone dot.
    failure = re.search(r'aria-label="failure rate per day"[^>]*>(.*?)</svg>', html, re.S)
    assert failure is not None and ">0/1</text>" in failure.group(1)
    assert "aoti/cpu (n=1)" in html
    assert "alice" in html.split('id="usage"', 1)[1]


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
