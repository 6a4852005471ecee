"""API keys in the database: made and revoked with `kiln keys`, stored as hashes, accepted
next to KILN_API_KEYS, the first `kiln serve` prints one admin key, and new builds are
rate-limited per key with 429 and Retry-After (hits and joins are not)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask, Response
from sqlalchemy import func, select, text

from service import api_keys, jobs, queries, worker_registry
from service.app import create_app
from service.cache import Target
from service.db import upgrade
from service.keys_cli import first_admin_key
from service.models import ApiKey, AuditEntry, Job, utcnow
from service.services import Services
from tests.conftest import ROOT, make_settings
from tests.factories import record_engine

TARGET = Target("aoti", "cpu", "x86_64-test", "torch=test")


def kiln(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_DATA_DIR": str(data_dir)}
    env.pop("KILN_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def keyed_app(tmp_path: Path) -> Flask:
    settings = make_settings(tmp_path / "kiln", api_keys={"env-admin-key": ("root", "admin")})
    upgrade(settings.database_url)
    return create_app(settings)


def test_cli_creates_lists_and_revokes_keys_stored_as_hashes(tmp_path: Path) -> None:
    data = tmp_path / "kiln"
    assert kiln(data, "db", "upgrade").returncode == 0
    made = kiln(data, "keys", "create", "--owner", "alice", "--role", "user")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert re.fullmatch(r"kiln_[A-Za-z0-9_-]{43}", secret)
    key_id = re.search(r"created (key_\w+) for alice \(user\)", made.stderr).group(1)
    listing = kiln(data, "keys", "list")
    assert key_id in listing.stdout and "alice" in listing.stdout
    assert secret not in listing.stdout and secret[:12] in listing.stdout  # the prefix only
    raw = (data / "kiln.db").read_bytes()
    assert secret.encode() not in raw and api_keys.hash_key(secret).encode() in raw

    app = create_app(make_settings(data))
    client = app.test_client()
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"}
                      ).status_code == 200
    assert client.get("/api/v1/jobs").status_code == 401  # keys exist: no more open mode
    assert kiln(data, "keys", "revoke", key_id).returncode == 0
    # Revoked in another process: this one trusted the key for at most VERIFIED_FOR_S more.
    deadline = time.monotonic() + api_keys.VERIFIED_FOR_S + 0.5
    while client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"}
                     ).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.1)
    assert "revoked" not in kiln(data, "keys", "revoke", "key_nope").stdout
    assert kiln(data, "keys", "revoke", "key_nope").returncode != 0
    bad = kiln(data, "keys", "create", "--owner", "x", "--role", "root")
    assert bad.returncode != 0 and "root" in bad.stderr
    with Services(make_settings(data)).db.session() as s:
        actions = [(e.action, e.object_id) for e in s.scalars(select(AuditEntry))]
    assert actions == [("key.create", key_id), ("key.revoke", key_id)]


def test_database_and_environment_keys_both_work_with_their_roles(keyed_app: Flask) -> None:
    services: Services = keyed_app.extensions["kiln"]
    with services.db.session() as s:
        user = api_keys.create(s, "bob", "user")
    client = keyed_app.test_client()
    as_user = {"Authorization": f"Bearer {user.secret}"}
    assert client.get("/api/v1/jobs", headers=as_user).status_code == 200
    assert client.post("/api/v1/engines/eng_x/pin", headers=as_user).status_code == 403
    assert client.get("/api/v1/jobs", headers={"X-API-Key": "env-admin-key"}).status_code == 200
    assert client.get("/api/v1/jobs", headers={"X-API-Key": user.secret + "x"}
                      ).status_code == 401
    with services.db.session() as s:
        assert s.get(ApiKey, user.row.id).last_used_at is not None


def test_first_serve_makes_one_admin_key_and_never_again(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "kiln")
    upgrade(settings.database_url)
    key = first_admin_key(settings)
    assert key and key.startswith("kiln_")
    assert first_admin_key(settings) is None  # printed once only
    with Services(settings).db.session() as s:
        row = s.scalars(select(ApiKey)).one()
        assert row.role == "admin" and row.key_hash == api_keys.hash_key(key)
    assert first_admin_key(make_settings(tmp_path / "other", api_keys={"k": ("a", "admin")})
                           ) is None  # KILN_API_KEYS configured: nothing made


def test_token_bucket_refuses_with_retry_after_then_refills(tmp_path: Path,
                                                            postgres_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'b.db'}", postgres_url):
        settings = make_settings(tmp_path / "kiln", database_url=url)
        upgrade(url)
        db = Services(settings).db
        t0 = utcnow()
        with db.session() as s:
            for _ in range(3):
                api_keys.take_token(s, "h", burst=3, per_minute=6, now=t0)
        with db.session() as s, pytest.raises(api_keys.KilnError) as err:
            api_keys.take_token(s, "h", burst=3, per_minute=6, now=t0)
        assert err.value.status == 429 and err.value.details["retry_after_s"] == 10
        with db.session() as s:  # 10 s later one token is back, and only one
            api_keys.take_token(s, "h", burst=3, per_minute=6, now=t0 + timedelta(seconds=10))
            with pytest.raises(api_keys.KilnError):
                api_keys.take_token(s, "h", burst=3, per_minute=6,
                                    now=t0 + timedelta(seconds=10))
        with db.session() as s:  # another key has its own bucket
            api_keys.take_token(s, "other", burst=3, per_minute=6, now=t0)
            assert s.execute(text("SELECT count(*) FROM rate_buckets")).scalar() == 2
        db.dispose()


def test_new_builds_are_rate_limited_per_key_with_429_and_hits_and_joins_are_not(
        keyed_app: Flask, programs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_keys, "SUBMIT_BURST", 3)
    services: Services = keyed_app.extensions["kiln"]
    with services.db.session() as s:
        a, b = api_keys.create(s, "a", "user"), api_keys.create(s, "b", "user")
        worker_registry.heartbeat(s, "w1", "host", [{**TARGET.as_dict(), "toolchain": {},
                                                    "queue": worker_registry.queue_name(TARGET)}],
                                  {})
    client = keyed_app.test_client()

    def submit(key: str, body: dict) -> Response:
        return client.post("/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})

    def upload(key: str) -> str:
        return client.post("/api/v1/models", data=programs["two_inputs"].read_bytes(),
                           headers={"Authorization": f"Bearer {key}"}).get_json()["id"]

    def build(model_id: str, batch: int) -> dict:
        return {"model_id": model_id, "backend": "aoti", "device": "cpu", "inputs": [
            {"name": "x", "min": [1, 2, 8], "opt": [batch, 16, 8], "max": [batch, 128, 8]},
            {"name": "mask", "min": [1, 2], "opt": [batch, 16], "max": [batch, 128]}]}

    mine = upload(a.secret)
    missing = {"model_id": "mdl_missing", "backend": "aoti", "device": "cpu"}
    assert [submit(a.secret, missing).status_code for _ in range(5)] == [404] * 5  # free
    first = submit(a.secret, build(mine, 2))
    assert [first.status_code] + [submit(a.secret, build(mine, n)).status_code
                                  for n in (3, 4)] == [202] * 3
    limited = submit(a.secret, build(mine, 5))
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    error = limited.get_json()["error"]
    assert error["code"] == "rate_limited" and error["details"]["retry_after_s"] >= 1
    with services.db.session() as s:  # the refused build left no job behind
        assert s.scalar(select(func.count()).select_from(Job)) == 3
    joined = submit(a.secret, build(mine, 2))  # an identical build is running: joining is free
    assert joined.status_code == 202 and joined.get_json()["submit"] == "joined"
    assert submit(b.secret, build(upload(b.secret), 5)).status_code == 202  # b's own bucket

    # A cache hit starts no build: served with a's bucket empty.
    job_id = first.get_json()["id"]
    with services.db.session() as s:
        model = queries.get_model(s, mine, None)
        job = s.get(Job, job_id)
        claimed = jobs.claim(s, job_id, "w1", 60)
        jobs.succeed(s, job_id, claimed.attempts, "w1", record_engine(model, job), {}, "")
    hit = submit(a.secret, build(mine, 2))
    assert hit.status_code == 200 and hit.get_json()["status"] == "cached"


def test_kiln_serve_prints_the_first_admin_key_once(tmp_path: Path) -> None:
    import requests

    def serve() -> tuple[str, str | None, subprocess.Popen[str]]:
        env = {**os.environ, "KILN_DATA_DIR": str(tmp_path / "data")}
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-worker",
                                 "--port", "0"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        key = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if found := re.search(r"created an admin API key, shown only now: (\S+)", line):
                key = found.group(1)
            if found := re.search(r"serving on (http://\S+)", line):
                return found.group(1), key, proc
        raise AssertionError("kiln serve printed no URL")

    url, key, proc = serve()
    try:
        assert key and key.startswith("kiln_")
        assert requests.get(f"{url}/api/v1/jobs", timeout=10).status_code == 401
        assert requests.get(f"{url}/api/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                            timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    url, again, proc = serve()  # the second start makes no key and prints none
    proc.terminate()
    proc.wait(timeout=30)
    assert again is None
