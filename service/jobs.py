"""Compile jobs: submit (with cache lookup and single flight), cancel, and the state changes
workers make. Every change a worker makes is fenced by its attempt number, so a task
delivered twice, or a worker that lost its lease, can never overwrite a newer attempt.

States: queued -> building -> validating -> succeeded | failed | cancelled. Terminal states
never change again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    DateTime,
    String,
    Table,
    Update,
    bindparam,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service import api_keys, cache, queries, worker_registry
from service.cache import CacheRequest, digest
from service.celery_app import publish_build
from service.engine_record import EngineRecord
from service.errors import KilnError
from service.models import ACTIVE_STATES, TERMINAL_STATES, Engine, Job, Model, Submission, utcnow
from service.services import Services

log = logging.getLogger(__name__)
LOG_LIMIT = 1_000_000  # characters of build log kept on a job


@dataclass
class SubmitResult:
    status: str  # "cached", "queued" or "joined"
    job: Job | None = None
    engine: Engine | None = None
    reason: str = ""
    warnings: list[str] | None = None


# Per process, the answer to a request that a stored engine served is reused for RECENT_HIT_S
# seconds (the live-target set's own age, worker_registry.CACHE_S): a CI pipeline asking the
# same thing again costs one statement, the count. The count proves the engine still exists -
# an evicted engine fails it and the request is resolved afresh - and what an engine serves
# never changes once stored, so the one staleness is the live-target set's: an engine stored
# in the last seconds that would rank higher is chosen a moment later.
RECENT_HIT_S = worker_registry.CACHE_S
RECENT_HITS_MAX = 10_000
_recent_hits: dict[tuple[str, str | None, str], tuple[float, Model, Engine, str]] = {}


def _recent_key(services: Services, request: CacheRequest, scope: str | None
                ) -> tuple[str, str | None, str]:
    # The dataclass's repr names every field (a dict in another order is only a cache miss).
    return services.db.url, scope, repr(request)


def _remember_hit(key: tuple[str, str | None, str], model: Model, engine: Engine,
                  reason: str) -> None:
    if len(_recent_hits) >= RECENT_HITS_MAX:
        _recent_hits.clear()  # bounded: a burst of distinct requests cannot grow it
    _recent_hits[key] = (time.monotonic() + RECENT_HIT_S, model, engine, reason)


def submit(services: Services, owner: str, request: CacheRequest,
           scope: str | None = None, key_hash: str | None = None) -> SubmitResult:
    """Answer a compile request from the cache, join an identical build, or queue a new one.

    ``owner`` owns the job and the submission record; ``scope`` is whose models the request may
    name (the caller's ``Caller.scope``; None: any, for an admin); ``key_hash`` is the key whose
    build tokens a new build spends (``api_keys.limit_submissions``). Hits and joins start no
    build and spend none: a CI pipeline's cache hits are never rate limited.
    """
    ttl = services.settings.worker_ttl_s
    recent_key = _recent_key(services, request, scope)
    recent = _recent_hits.get(recent_key)
    if recent is not None and time.monotonic() < recent[0]:
        _, model, engine, reason = recent
        with services.db.autocommit() as fast:
            hit = _record_hit(services, fast, owner, request, model, engine, reason)
        if hit is not None:
            return hit
        _recent_hits.pop(recent_key, None)  # evicted: resolve afresh
    # The lookup and a hit's count run on autocommit connections: no BEGIN, no COMMIT.
    with services.db.autocommit() as fast:
        found = cache.resolve(fast, request, scope,
                              worker_registry.live_targets_cached(fast, ttl))
        if found.target is None and found.engine is None and request.toolchain is None:
            # "No worker" is never answered from the per-process cache: one may just have started.
            found = cache.resolve(fast, request, scope, worker_registry.live_targets(fast, ttl))
        if found.engine is not None:
            hit = _record_hit(services, fast, owner, request, found.model, found.engine,
                              found.reason)
            if hit is None:  # the engine was evicted between the lookup and the count
                return submit(services, owner, request, scope, key_hash)
            _remember_hit(recent_key, found.model, found.engine, found.reason)
            return hit
        if found.target is None:
            raise KilnError(
                "no_worker_for_target",
                f"no live worker builds backend={request.backend} device={request.device}"
                + (f" arch={request.arch}" if request.arch else "")
                + (f" toolchain={request.toolchain}" if request.toolchain else "")
                + "; start one (`kiln worker`) or pick a target from details.live_targets",
                status=503, details={"live_targets": worker_registry.live_targets(fast, ttl),
                                     "misses": found.misses})
    model, target, options, profile = found.model, found.target, found.options, found.profile
    with services.db.session() as session:
        key = cache.cache_key(model.model_hash, target, options, profile)
        base = cache.find_swap_base(session, model.graph_hash, model.weights_hash, target,
                                    options, profile,
                                    queries.visible_model_hashes(session, owner))
        job = Job(swap_from_engine_id=base.id if base else None, owner=owner,
                  model_id=model.id, backend=request.backend, device=request.device,
                  arch=target.arch, toolchain_id=target.toolchain_id,
                  queue=worker_registry.queue_name(target), options=options, profile=profile,
                  cache_key=key, status="queued", max_attempts=services.settings.max_attempts,
                  miss_reasons=found.misses, enqueued_at=utcnow(), timings={}, log="")
        session.add(job)
        try:
            session.flush()
        except IntegrityError:
            # Another request holds the active job for this key: join it instead.
            session.rollback()
            active = session.scalars(select(Job).where(
                Job.cache_key == key, Job.status.in_(ACTIVE_STATES))).first()
            if active is None:  # it finished between our insert and this read: look again
                return submit(services, owner, request, scope, key_hash)
            session.add(Submission(owner=owner, model_id=model.id, backend=request.backend,
                                   device=request.device, outcome="joined", job_id=active.id))
            return SubmitResult("joined", job=active, reason="an identical build is running")
        # A new build spends one of the key's tokens; refused, the job's insert rolls back.
        api_keys.limit_submissions(session, key_hash)
        session.add(Submission(owner=owner, model_id=model.id, backend=request.backend,
                               device=request.device, outcome="queued", job_id=job.id))
    publish_build(services.celery, job.id, job.queue)
    reason = found.reason
    if base is not None:
        reason += f"; reusing the compiled code of engine {base.id} with this model's weights"
    return SubmitResult("queued", job=job, reason=reason)


def _record_hit(services: Services, fast: Session, owner: str, request: CacheRequest,
                model: Model, engine: Engine, reason: str) -> SubmitResult | None:
    """Count a cache hit exactly - the engine's counter and a submission row, atomically -
    without an ORM refresh. None when the engine is gone (evicted since the lookup).

    PostgreSQL: one statement on the autocommit connection (a data-modifying CTE), so one
    round trip and no BEGIN/COMMIT; its commit does not wait for the log flush (see
    ``Database.autocommit``). The increment is SQL, so concurrent hits on one engine all count.
    SQLite runs in-process, where a transaction of two statements costs no round trip.
    """
    now = utcnow()
    values = {"hit_owner": owner, "hit_model_id": model.id, "hit_backend": request.backend,
              "hit_device": request.device, "hit_engine_id": engine.id, "hit_now": now}
    try:
        if fast.get_bind().dialect.name == "postgresql":
            # Core on the session's connection: the statement needs no ORM bookkeeping.
            hits = fast.connection().execute(_HIT_STATEMENTS["postgresql"], values).scalar_one()
        else:
            with services.db.session() as session:
                hits = session.execute(_HIT_STATEMENTS["count"], values).scalar_one()
                session.execute(_HIT_STATEMENTS["record"], values)
    except (IntegrityError, NoResultFound):
        fast.rollback()
        return None
    # What the row now holds, without marking the object changed (no second UPDATE at commit).
    set_committed_value(engine, "hits", hits)
    set_committed_value(engine, "last_used_at", now)
    return SubmitResult("cached", engine=engine, reason=reason)


def _hit_statements() -> dict[str, Any]:
    """The hit's statements, built once with bound values (building them cost more than
    compiling: SQLAlchemy caches the compiled form)."""
    table = cast(Table, Engine.__table__)
    engines = table.c
    # Core, not the ORM's bulk update: nothing in the session needs synchronising.
    count = update(table).where(engines.id == bindparam("hit_engine_id")).values(
        hits=engines.hits + 1, last_used_at=bindparam("hit_now")).returning(engines.hits)
    record = insert(Submission).values(
        owner=bindparam("hit_owner"), model_id=bindparam("hit_model_id"),
        backend=bindparam("hit_backend"), device=bindparam("hit_device"), outcome="cached",
        engine_id=bindparam("hit_engine_id"), created_at=bindparam("hit_now"))
    # PostgreSQL: the increment and the submission row in one statement (data-modifying CTEs),
    # the row written only when the engine was there to count.
    counted = count.cte("counted")
    recorded = insert(Submission).from_select(
        ["owner", "model_id", "backend", "device", "outcome", "engine_id", "created_at"],
        select(bindparam("hit_owner", type_=String), bindparam("hit_model_id", type_=String),
               bindparam("hit_backend", type_=String), bindparam("hit_device", type_=String),
               literal("cached", String), bindparam("hit_engine_id", type_=String),
               bindparam("hit_now", type_=DateTime)).select_from(counted))
    postgresql = select(counted.c.hits).add_cte(recorded.cte("recorded"))
    return {"record": record, "count": count, "postgresql": postgresql}


_HIT_STATEMENTS = _hit_statements()


def cancel(services: Services, job_id: str, owner: str | None) -> Job:
    with services.db.session() as session:
        job = queries.get_job(session, job_id, owner)
        if job.status in TERMINAL_STATES:
            raise KilnError("job_finished", f"job {job_id} is already {job.status}", 409,
                            {"status": job.status})
        session.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_STATES))
                        .values(status="cancelled", finished_at=utcnow(),
                                error_code="cancelled", error_message="cancelled by the user"))
        session.refresh(job)
        return job


# ---- state changes made by workers (all fenced by attempt number) -----------------------

def claim(session: Session, job_id: str, worker_id: str, lease_s: int) -> Job | None:
    """Take a queued job for one attempt. None when it is not queued (a duplicate delivery)."""
    job = session.get(Job, job_id)
    if job is None or job.status != "queued":
        return None
    now = utcnow()
    result = _execute(session,
        update(Job).where(Job.id == job_id, Job.status == "queued", Job.attempts == job.attempts)
        .values(status="building", attempts=Job.attempts + 1, lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s), started_at=now,
                error_code=None, error_message=None))
    if result.rowcount != 1:
        return None
    session.refresh(job)
    return job


def _execute(session: Session, statement: Any) -> CursorResult[Any]:
    """An UPDATE's result, typed so its rowcount (the fence's verdict) type-checks."""
    return cast(CursorResult[Any], session.execute(statement))


def _fenced(job_id: str, attempt: int, worker_id: str) -> Update:
    return update(Job).where(Job.id == job_id, Job.attempts == attempt,
                             Job.lease_owner == worker_id, Job.status.in_(ACTIVE_STATES))


def renew(session: Session, job_id: str, attempt: int, worker_id: str, lease_s: int,
          status: str | None = None, log_text: str | None = None) -> bool:
    """Extend the lease (and move the phase). False: the job was cancelled or taken over."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if status:
        values["status"] = status
    if log_text is not None:
        values["log"] = log_text[-LOG_LIMIT:]
    return _execute(session, _fenced(job_id, attempt, worker_id).values(**values)).rowcount == 1


def succeed(session: Session, job_id: str, attempt: int, worker_id: str,
            record: EngineRecord, timings: dict[str, float], log_text: str) -> Engine | None:
    """Record the engine and finish the job in one transaction; None if fenced off."""
    job = session.get(Job, job_id)
    if job is None or job.attempts != attempt or job.status not in ACTIVE_STATES:
        return None
    engine = session.scalars(select(Engine).where(Engine.cache_key == job.cache_key)).first()
    if engine is None:
        engine = Engine(cache_key=job.cache_key)
        session.add(engine)
    # reuse=never rebuilds an existing key: the new build replaces the stored one in place.
    columns = record.columns()
    engine.model_hash = columns["model_hash"]
    engine.graph_hash = columns["graph_hash"]
    engine.weights_hash = columns["weights_hash"]
    engine.backend = columns["backend"]
    engine.device = columns["device"]
    engine.arch = columns["arch"]
    engine.toolchain_id = columns["toolchain_id"]
    engine.toolchain = columns["toolchain"]
    engine.options = columns["options"]
    engine.profile = columns["profile"]
    engine.artifact_uri = columns["artifact_uri"]
    engine.sha256 = columns["sha256"]
    engine.size = columns["size"]
    engine.build_seconds = columns["build_seconds"]
    engine.build_report = columns["build_report"]
    engine.validation = columns["validation"]
    engine.benchmark = columns["benchmark"]
    engine.validation_status = columns["validation_status"]
    engine.validation_reason = columns["validation_reason"]
    # The key columns are derived here and nowhere else.
    engine.options_hash = digest(engine.options)
    engine.profile_hash = digest(cache.profile_shapes(engine.profile))
    engine.last_used_at = utcnow()
    engine.job_id = job_id
    session.flush()
    done = cast(CursorResult[Any], session.execute(_fenced(job_id, attempt, worker_id).values(
        status="succeeded", engine_id=engine.id, finished_at=utcnow(), timings=timings,
        log=log_text[-LOG_LIMIT:], lease_owner=None, lease_expires_at=None)))
    if done.rowcount != 1:
        session.rollback()
        return None
    return engine


def fail(session: Session, job_id: str, attempt: int, worker_id: str, code: str, message: str,
         log_text: str, timings: dict[str, float], retryable: bool) -> str | None:
    """Fail this attempt. A retryable failure requeues the job until its attempts run out.

    Returns the job's new status, or None when this attempt was fenced off.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    if retryable and attempt < job.max_attempts:
        values: dict[str, Any] = {"status": "queued", "enqueued_at": utcnow(),
                                  "error_code": code, "error_message": message}
    else:
        if retryable:
            message = f"gave up after {attempt} attempts: {message}"
        values = {"status": "failed", "finished_at": utcnow(), "error_code": code,
                  "error_message": message}
    values.update(log=log_text[-LOG_LIMIT:], timings=timings, lease_owner=None,
                  lease_expires_at=None)
    failed = cast(CursorResult[Any],
                  session.execute(_fenced(job_id, attempt, worker_id).values(**values)))
    if failed.rowcount != 1:
        return None
    return values["status"]


def sweep(session: Session, requeue_after_s: int) -> list[Job]:
    """Recover jobs whose worker vanished or whose message was lost; return jobs to publish.

    A lapsed lease means the worker died mid-build: the attempt counts, and the job is queued
    again or failed once its attempts are spent. A job queued for ``requeue_after_s`` without
    being claimed lost its message (broker restart, crash between commit and publish).
    """
    now = utcnow()
    republish: list[Job] = []
    lapsed = session.scalars(select(Job).where(
        Job.status.in_(("building", "validating")), Job.lease_expires_at < now))
    for job in lapsed:
        if job.attempts >= job.max_attempts:
            values: dict[str, Any] = {
                "status": "failed", "finished_at": now, "error_code": "worker_lost",
                "error_message": f"gave up after {job.attempts} attempts: the worker stopped "
                                 "renewing its lease (killed or lost)"}
        else:
            values = {"status": "queued", "enqueued_at": now, "error_code": "worker_lost",
                      "error_message": "the worker stopped renewing its lease; retrying"}
        changed = _execute(session, update(Job).where(
            Job.id == job.id, Job.attempts == job.attempts, Job.status == job.status,
        ).values(lease_owner=None, lease_expires_at=None, **values)).rowcount
        if changed and values["status"] == "queued":
            republish.append(job)
    stale = session.scalars(select(Job).where(
        Job.status == "queued", Job.enqueued_at < now - timedelta(seconds=requeue_after_s)))
    for job in stale:
        job.enqueued_at = now
        republish.append(job)
    session.flush()
    return republish
