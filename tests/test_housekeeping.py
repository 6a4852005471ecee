"""Housekeeping runs once per deployment, incrementally, with the configured grace period."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from service import housekeeping
from service.cache import digest
from service.cli import main as kiln_cli
from service.db import upgrade
from service.models import Engine, HousekeepingTask, Job, Model, utcnow
from service.services import Services
from service.settings import Settings
from service.store_budget import enforce_budget
from tests.conftest import make_settings


def _services(tmp_path: Path, **overrides: object) -> Services:
    services = Services(make_settings(tmp_path / "kiln", **overrides))
    upgrade(services.settings.database_url)
    return services


def _blob(services: Services, tmp_path: Path, key: str, size: int = 10) -> str:
    local = tmp_path / key.replace("/", "_")
    local.write_bytes(os.urandom(size))
    return services.store.put_file(local, key)


def _model(services: Services, tmp_path: Path) -> str:
    uri = _blob(services, tmp_path, "models/m.pt2")
    with services.db.session() as s:
        model = Model(owner="alice", model_hash="m", graph_hash="g", weights_hash="w",
                      sha256="s", size=10, signature={"inputs": []}, blob_uri=uri)
        s.add(model)
        s.flush()
        return model.id


def _lapsed_job(services: Services, model_id: str, attempts: int = 1) -> str:
    with services.db.session() as s:
        job = Job(owner="alice", model_id=model_id, backend="aoti", device="cpu", arch="x",
                  toolchain_id="t", queue="kiln.aoti.cpu.x.t", options={}, profile=[],
                  cache_key=digest(f"k{attempts}"), status="building", attempts=attempts,
                  max_attempts=3, lease_owner="kiln@gone-1",
                  lease_expires_at=utcnow() - timedelta(seconds=5), timings={}, log="")
        s.add(job)
        s.flush()
        return job.id


def test_lease_is_held_by_one_process_and_spaces_the_runs(tmp_path: Path) -> None:
    services = _services(tmp_path)
    assert housekeeping.take_lease(services, "sweep", "a", every_s=60, lease_s=30) == ""
    assert housekeeping.take_lease(services, "sweep", "b", every_s=60, lease_s=30) is None
    housekeeping.release_lease(services, "sweep", "a", housekeeping.TaskResult(items=2))
    # Just ran: due again only after every_s, for anyone.
    assert housekeeping.take_lease(services, "sweep", "b", every_s=60, lease_s=30) is None
    assert housekeeping.take_lease(services, "sweep", "b", every_s=0, lease_s=30) == ""
    # A holder that died: its lease lapses and another process takes the task over.
    with services.db.session() as s:
        row = s.get(HousekeepingTask, "sweep")
        assert row is not None and row.runs == 1 and row.items_total == 2
        row.lease_expires_at = utcnow() - timedelta(seconds=1)
    assert housekeeping.take_lease(services, "sweep", "c", every_s=0, lease_s=30) == ""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_many_processes_sweep_once(backend: str, tmp_path: Path,
                                   request: pytest.FixtureRequest) -> None:
    overrides: dict[str, object] = {"sweep_interval_s": 3600, "gc_interval_s": 3600}
    if backend == "postgres":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    services = _services(tmp_path, **overrides)
    ran: list[str] = []
    barrier = threading.Barrier(6)

    def one_process(n: int) -> None:
        mine = Services(services.settings)  # its own engine and connections, like a worker
        barrier.wait()
        ran.extend(housekeeping.run_due(mine, f"worker-{n}"))
        mine.db.dispose()

    threads = [threading.Thread(target=one_process, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == ["evict", "gc", "sweep"], "each task ran exactly once"


def test_lapsed_lease_is_swept_with_no_worker_alive(tmp_path: Path) -> None:
    services = _services(tmp_path, sweep_interval_s=0)
    job_id = _lapsed_job(services, _model(services, tmp_path))
    ran = housekeeping.run_due(services, "serve@test")
    assert ran["sweep"].items == 1
    with services.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "queued" and job.error_code == "worker_lost"
        assert "stopped renewing its lease" in (job.error_message or "")


def test_orphan_collection_walks_the_store_a_page_per_run(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(housekeeping, "GC_PAGE", 3)
    services = _services(tmp_path, gc_grace_s=0, gc_interval_s=0)
    _model(services, tmp_path)  # referenced: never collected
    orphans = {_blob(services, tmp_path, f"engines/orphan{i}.bin") for i in range(7)}
    time.sleep(0.05)
    seen = []
    for _ in range(3):
        result = housekeeping.run_due(services, "gc-test")["gc"]
        seen.append(result.items)
        with services.db.session() as s:
            row = s.get(HousekeepingTask, "gc")
            assert row is not None
            cursor = row.cursor
    assert sum(seen) == 7 and max(seen) <= 3, seen  # never more than a page per run
    assert cursor == ""  # reached the end: the next run starts over
    left = {b.uri for b in services.store.list()}
    assert not (left & orphans) and len(left) == 1


def _engine(services: Services, tmp_path: Path, name: str, used_ago_s: int) -> str:
    uri = _blob(services, tmp_path, f"engines/{name}.bin", 1000)
    with services.db.session() as s:
        e = Engine(cache_key=digest(name), model_hash="m", graph_hash="g", weights_hash="w",
                   backend="aoti", device="cpu", arch="a", toolchain_id="t", toolchain={},
                   options={}, options_hash=digest({}), profile=[], profile_hash="p",
                   artifact_uri=uri, sha256=digest(name), size=1000, build_seconds=1,
                   last_used_at=utcnow() - timedelta(seconds=used_ago_s))
        s.add(e)
        s.flush()
        return e.id


def test_eviction_uses_the_configured_grace_period(tmp_path: Path) -> None:
    services = _services(tmp_path, store_budget_bytes=1, gc_grace_s=7200, sweep_interval_s=0)
    used_an_hour_ago = _engine(services, tmp_path, "hour", 3600)
    assert "evict" in housekeeping.run_due(services, "a")
    assert enforce_budget(services, 1).evicted == []  # inside KILN_GC_GRACE_S: kept
    shorter = Services(Settings.from_env(env=services.settings.to_env(), gc_grace_s=600))
    assert enforce_budget(shorter, 1).evicted == [used_an_hour_ago]
    with services.db.session() as s:
        assert s.scalars(select(Engine)).all() == []


def test_kiln_gc_collects_the_whole_store(tmp_path: Path) -> None:
    services = _services(tmp_path)
    _model(services, tmp_path)
    for i in range(5):
        _blob(services, tmp_path, f"engines/old{i}.bin")
    env = {**services.settings.to_env(), "KILN_GC_GRACE_S": "0"}
    time.sleep(0.05)
    dry = CliRunner().invoke(kiln_cli, ["gc", "--dry-run"], env=env)
    assert dry.exit_code == 0 and "5 orphaned blob(s)" in dry.output
    assert len(list(services.store.list())) == 6
    done = CliRunner().invoke(kiln_cli, ["gc"], env=env)
    assert done.exit_code == 0, done.output
    assert "collected 5 orphaned blob(s)" in done.output
    assert [b.uri.rsplit("/", 1)[-1] for b in services.store.list()] == ["m.pt2"]


def test_to_env_reproduces_every_setting_but_the_api_keys(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, store_budget_bytes=123, gc_grace_s=45,
                             max_upload_bytes=99, gc_interval_s=7, download_presign_s=30,
                             log_format="json", lease_s=11,
                             api_keys={"secret-key-1": ("a", "admin")})
    again = Settings.from_env(env=settings.to_env())
    assert again == Settings.from_env(env={}, **{**settings.__dict__, "api_keys": {}})
    assert "secret-key-1" not in str(settings.to_env())
