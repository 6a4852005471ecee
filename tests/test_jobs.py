"""Job state changes: single flight, fencing of stale attempts, the sweeper, cancellation.

These run against the real databases (SQLite and PostgreSQL) and a real broker; the worker
row is registered as a worker registers itself, without a build process behind it, because
what is tested is what the database allows.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from service import jobs, worker_registry
from service.cache import CacheRequest, Target
from service.db import upgrade
from service.engine_record import EngineRecord
from service.errors import KilnError
from service.models import TERMINAL_STATES, Job, Submission, utcnow
from service.services import Services
from service.uploads import save_upload
from tests.conftest import make_settings

TARGET = Target("aoti", "cpu", "x86_64-test", "torch=test")


def _services(tmp_path: Path, db_url: str | None = None, broker: str | None = None) -> Services:
    overrides = {}
    if db_url:
        overrides["database_url"] = db_url
    if broker:
        overrides["broker_url"] = broker
    services = Services(make_settings(tmp_path / "kiln", **overrides))
    upgrade(services.settings.database_url)
    with services.db.session() as s:
        worker_registry.heartbeat(s, "w1", "host", [{**TARGET.as_dict(), "toolchain": {},
                                                    "queue": worker_registry.queue_name(TARGET)}],
                                  {})
    return services


def _model(services: Services, program: Path, owner: str = "alice") -> str:
    with open(program, "rb") as f:
        model, _ = save_upload(services, owner, f, program.name)
    return model.id


@pytest.fixture(params=["sqlite", "postgres"])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Services:
    if request.param == "sqlite":
        return _services(tmp_path)
    return _services(tmp_path, request.getfixturevalue("postgres_url"),
                     request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/15")


def test_fifty_concurrent_identical_submits_make_one_job(postgres_url: str, redis_url: str,
                                                         tmp_path: Path,
                                                         programs: dict[str, Path]) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/15"
    services = _services(tmp_path, postgres_url, broker)
    redis.Redis.from_url(broker).flushdb()
    model_id = _model(services, programs["convnet"])
    barrier = threading.Barrier(50)
    results: list[str] = []

    def submit() -> None:
        barrier.wait()
        r = jobs.submit(services, "alice", CacheRequest(**{"model_id": model_id, "backend": "aoti",
                                            "device": "cpu"}))
        results.append(r.job.id if r.job else "")

    threads = [threading.Thread(target=submit) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50 and len(set(results)) == 1, Counter(results)
    with services.db.session() as s:
        assert len(list(s.scalars(select(Job)))) == 1
    queue = worker_registry.queue_name(TARGET)
    assert redis.Redis.from_url(broker).llen(queue) == 1, "exactly one build was published"
    redis.Redis.from_url(broker).flushdb()


def test_duplicate_delivery_and_stale_attempts_are_fenced(services: Services,
                                                          programs: dict[str, Path]) -> None:
    model_id = _model(services, programs["convnet"])
    job = jobs.submit(services, "alice", CacheRequest(**{"model_id": model_id, "backend": "aoti",
                                          "device": "cpu"})).job
    with services.db.session() as s:
        first = jobs.claim(s, job.id, "w1", lease_s=60)
    with services.db.session() as s:
        assert jobs.claim(s, job.id, "w2", lease_s=60) is None  # redelivered: not queued
    # The lease lapses (worker frozen); the sweeper requeues; a second worker takes over.
    with services.db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    with services.db.session() as s:
        assert [j.id for j in jobs.sweep(s, requeue_after_s=3600)] == [job.id]
    with services.db.session() as s:
        second = jobs.claim(s, job.id, "w2", lease_s=60)
        assert second is not None and second.attempts == first.attempts + 1
    # The frozen first worker wakes up: nothing it writes lands.
    with services.db.session() as s:
        assert not jobs.renew(s, job.id, first.attempts, "w1", 60)
        assert jobs.fail(s, job.id, first.attempts, "w1", "x", "y", "", {}, False) is None
    with services.db.session() as s:
        assert s.get(Job, job.id).status == "building"


def test_retryable_failures_give_up_after_max_attempts(services: Services,
                                                       programs: dict[str, Path]) -> None:
    model_id = _model(services, programs["convnet"])
    job = jobs.submit(services, "alice", CacheRequest(**{"model_id": model_id, "backend": "aoti",
                                          "device": "cpu"})).job
    status = None
    for _ in range(services.settings.max_attempts):
        with services.db.session() as s:
            claimed = jobs.claim(s, job.id, "w1", 60)
            status = jobs.fail(s, job.id, claimed.attempts, "w1", "build_crashed",
                               "killed by SIGSEGV", "log", {}, retryable=True)
    assert status == "failed"
    with services.db.session() as s:
        done = s.get(Job, job.id)
        assert done.error_message.startswith(f"gave up after {services.settings.max_attempts}")
        assert done.log == "log"


def test_cancel_is_final(services: Services, programs: dict[str, Path]) -> None:
    model_id = _model(services, programs["convnet"])
    job = jobs.submit(services, "alice", CacheRequest(**{"model_id": model_id, "backend": "aoti",
                                          "device": "cpu"})).job
    assert jobs.cancel(services, job.id, "alice").status == "cancelled"
    with pytest.raises(KilnError) as err:
        jobs.cancel(services, job.id, "alice")
    assert err.value.code == "job_finished"
    with services.db.session() as s:
        assert jobs.claim(s, job.id, "w1", 60) is None
    with pytest.raises(KilnError):
        jobs.cancel(services, job.id, "mallory")  # not hers: not found


ACTIONS = st.lists(st.sampled_from(["claim", "claim2", "fail_retry", "fail_final", "succeed",
                                    "cancel", "lapse", "sweep"]), max_size=25)


@settings(max_examples=40, deadline=None)
@given(actions=ACTIONS)
def test_state_machine_terminal_states_absorb(tmp_path_factory: pytest.TempPathFactory,
                                              programs: dict[str, Path], actions: list[str]
                                              ) -> None:
    services = _services(tmp_path_factory.mktemp("sm"))
    model_id = _model(services, programs["convnet"])
    job_id = jobs.submit(services, "alice", CacheRequest(**{"model_id": model_id, "backend": "aoti",
                                             "device": "cpu"})).job.id
    held: dict[str, int] = {}
    terminal_seen, successes = None, 0
    for action in actions:
        with services.db.session() as s:
            worker = "w2" if action == "claim2" else "w1"
            if action in ("claim", "claim2"):
                got = jobs.claim(s, job_id, worker, 60)
                if got:
                    held[worker] = got.attempts
            elif action.startswith("fail") and held:
                w, a = next(iter(held.items()))
                jobs.fail(s, job_id, a, w, "e", "m", "", {}, retryable=action == "fail_retry")
            elif action == "succeed" and held:
                w, a = list(held.items())[-1]
                fields = {"model_hash": "m", "graph_hash": "g", "weights_hash": "w",
                          "backend": "aoti", "device": "cpu", "arch": "a", "toolchain_id": "t",
                          "toolchain": {}, "options": {}, "profile": [], "artifact_uri": "u",
                          "sha256": "0" * 64, "size": 1}
                if jobs.succeed(s, job_id, a, w, EngineRecord(**fields), {}, ""):
                    successes += 1
            elif action == "cancel":
                s.execute(update(Job).where(Job.id == job_id, Job.status.notin_(TERMINAL_STATES))
                          .values(status="cancelled"))
            elif action == "lapse":
                s.execute(update(Job).where(Job.id == job_id).values(
                    lease_expires_at=utcnow() - timedelta(seconds=1)))
            elif action == "sweep":
                jobs.sweep(s, 3600)
        with services.db.session() as s:
            status = s.get(Job, job_id).status
        if terminal_seen:
            assert status == terminal_seen, f"{terminal_seen} changed to {status}"
        elif status in TERMINAL_STATES:
            terminal_seen = status
    assert successes <= 1


def test_concurrent_cache_hits_all_count(postgres_url: str, redis_url: str, tmp_path: Path,
                                         programs: dict[str, Path]) -> None:
    services = _services(tmp_path, postgres_url, redis_url.rsplit("/", 1)[0] + "/15")
    model_id = _model(services, programs["convnet"])
    request = {"model_id": model_id, "backend": "aoti", "device": "cpu"}
    job = jobs.submit(services, "alice", CacheRequest(**request)).job
    with services.db.session() as s:
        claimed = jobs.claim(s, job.id, "w1", 60)
        engine = jobs.succeed(s, job.id, claimed.attempts, "w1", EngineRecord(
            model_hash="x", graph_hash="g", weights_hash="w", backend="aoti",
            device="cpu", arch=TARGET.arch, toolchain_id=TARGET.toolchain_id,
            toolchain={}, options=job.options, profile=job.profile,
            artifact_uri="file:///x", sha256="0" * 64, size=1), {}, "")
        engine_id = engine.id
        s.execute(update(jobs.Engine).where(jobs.Engine.id == engine_id).values(
            model_hash=s.get(jobs.Model, model_id).model_hash))
    barrier = threading.Barrier(20)

    seen: list[int] = []

    def hit() -> None:
        barrier.wait()
        result = jobs.submit(services, "alice", CacheRequest(**request))
        assert result.status == "cached" and result.engine is not None
        seen.append(result.engine.hits)

    threads = [threading.Thread(target=hit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each answer saw its own increment: no two hits read the same count.
    assert sorted(seen) == list(range(1, 21))
    # A restart of the API (a fresh process's pool) reads every hit and its submission back.
    services.db.dispose()
    restarted = Services(services.settings)
    with restarted.db.session() as s:
        assert s.get(jobs.Engine, engine_id).hits == 20
        assert s.scalar(select(func.count()).select_from(Submission).where(
            Submission.engine_id == engine_id, Submission.outcome == "cached")) == 20
    restarted.db.dispose()


def test_a_dead_pooled_connection_is_replaced_after_idling(postgres_url: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The pool pings connections that idled (not every checkout); a database restart or an
    idle timeout that killed one costs no failed request."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from service import db as db_module
    from service.db import Database

    def kill_backends(database: Database) -> None:
        for engine in (database.engine, database._autocommit_engine):
            with engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            admin = Database(postgres_url)
            with admin.engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            admin.dispose()

    database = Database(postgres_url)
    kill_backends(database)
    monkeypatch.setattr(db_module, "IDLE_PING_S", 3600.0)  # control: no ping, the dead one fails
    with pytest.raises(OperationalError):
        with database.autocommit() as s:
            s.execute(text("SELECT 1"))
    database.dispose()

    database = Database(postgres_url)
    kill_backends(database)
    monkeypatch.setattr(db_module, "IDLE_PING_S", 0.0)
    with database.autocommit() as s:
        assert s.execute(text("SELECT 1")).scalar() == 1
    with database.session() as s:
        assert s.execute(text("SELECT 1")).scalar() == 1
    database.dispose()
