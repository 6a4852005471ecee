"""Compile jobs: submit (with cache lookup and single flight), cancel, and the state changes
workers make. Every change a worker makes is fenced by its attempt number, so a task
delivered twice, or a worker that lost its lease, can never overwrite a newer attempt.

States: queued -> building -> validating -> succeeded | failed | cancelled. Terminal states
never change again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import engine_cache, worker_registry
from service.celery_app import publish_build
from service.engine_cache import Target, digest
from service.engine_record import EngineRecord
from service.errors import KilnError, NotFound
from service.models import ACTIVE_STATES, TERMINAL_STATES, Engine, Job, Model, Submission, utcnow
from service.profiles import resolve_profile
from service.services import Services
from service.targets import check_dtypes, normalize_options

log = logging.getLogger(__name__)
LOG_LIMIT = 1_000_000  # characters of build log kept on a job


@dataclass
class SubmitResult:
    status: str  # "cached", "queued" or "joined"
    job: Job | None = None
    engine: Engine | None = None
    reason: str = ""
    warnings: list[str] | None = None


def get_model(session: Session, model_id: str, owner: str | None) -> Model:
    model = session.get(Model, model_id)
    if model is None or (owner is not None and model.owner != owner):
        raise NotFound("model", model_id)
    return model


def get_job(session: Session, job_id: str, owner: str | None) -> Job:
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise NotFound("job", job_id)
    return job


def _pick_target(session: Session, services: Services, backend: str, device: str,
                 arch: str | None, toolchain: str | None) -> tuple[Target | None, list[str] | None]:
    """The target a build would run on, and the toolchains whose engines may serve the request.

    A request that names a toolchain gets engines of that toolchain only. Otherwise the
    toolchains of live workers for this backend and device are preferred (the newest worker
    first); with no live worker, engines of any toolchain may serve a cache hit.
    """
    targets = [t for t in worker_registry.live_targets(session, services.settings.worker_ttl_s,
                                                       backend, device)
               if (arch is None or t["arch"] == arch)
               and (toolchain is None or t["toolchain_id"] == toolchain)]
    if targets:
        t = targets[0]
        return Target(backend, device, t["arch"], t["toolchain_id"]), sorted(
            {x["toolchain_id"] for x in targets})
    return None, ([toolchain] if toolchain else None)


def submit(services: Services, owner: str, request: dict[str, Any]) -> SubmitResult:
    """Answer a compile request from the cache, join an identical build, or queue a new one."""
    backend, device = request["backend"], request["device"]
    reuse = request.get("reuse", "covering")
    with services.db.session() as session:
        model = get_model(session, request["model_id"], owner)
        options = normalize_options(backend, device, request.get("options") or {})
        profile = resolve_profile(model.signature["inputs"], request.get("inputs"))
        check_dtypes(backend, profile)
        target, toolchains = _pick_target(session, services, backend, device,
                                          request.get("arch"), request.get("toolchain"))
        found = engine_cache.lookup(session, model.model_hash, backend, device,
                                    request.get("arch"), toolchains, options, profile, reuse)
        if found.engine is not None:
            # In SQL, not in Python: concurrent hits on one engine must all count.
            session.execute(update(Engine).where(Engine.id == found.engine.id).values(
                hits=Engine.hits + 1, last_used_at=utcnow()))
            session.refresh(found.engine)
            session.add(Submission(owner=owner, model_id=model.id, backend=backend,
                                   device=device, outcome="cached", engine_id=found.engine.id))
            return SubmitResult("cached", engine=found.engine, reason=found.reason)
        visible = owned_model_hashes(session, owner)
        misses = engine_cache.explain_miss(
            session, model.model_hash, model.graph_hash, model.weights_hash, backend, device,
            request.get("arch"), toolchains, options, profile, visible_model_hashes=visible)
        if target is None:
            live = worker_registry.live_targets(session, services.settings.worker_ttl_s)
            raise KilnError(
                "no_worker_for_target",
                f"no live worker builds backend={backend} device={device}"
                + (f" arch={request['arch']}" if request.get("arch") else "")
                + (f" toolchain={request['toolchain']}" if request.get("toolchain") else "")
                + "; start one (`kiln worker`) or pick a target from details.live_targets",
                status=503, details={"live_targets": live, "misses": misses})
        key = engine_cache.cache_key(model.model_hash, target, options, profile)
        base = engine_cache.find_swap_base(session, model.graph_hash, model.weights_hash, target,
                                           options, profile, visible)
        job = Job(swap_from_engine_id=base.id if base else None, owner=owner,
                  model_id=model.id, backend=backend, device=device,
                  arch=target.arch, toolchain_id=target.toolchain_id,
                  queue=worker_registry.queue_name(target), options=options, profile=profile,
                  cache_key=key, status="queued", max_attempts=services.settings.max_attempts,
                  miss_reasons=misses, enqueued_at=utcnow(), timings={}, log="")
        session.add(job)
        try:
            session.flush()
        except IntegrityError:
            # Another request holds the active job for this key: join it instead.
            session.rollback()
            active = session.scalars(select(Job).where(
                Job.cache_key == key, Job.status.in_(ACTIVE_STATES))).first()
            if active is None:  # it finished between our insert and this read: look again
                return submit(services, owner, request)
            session.add(Submission(owner=owner, model_id=model.id, backend=backend,
                                   device=device, outcome="joined", job_id=active.id))
            return SubmitResult("joined", job=active, reason="an identical build is running")
        session.add(Submission(owner=owner, model_id=model.id, backend=backend, device=device,
                               outcome="queued", job_id=job.id))
    publish_build(services.celery, job.id, job.queue)
    reason = "no stored engine serves this request"
    if base is not None:
        reason += f"; reusing the compiled code of engine {base.id} with this model's weights"
    return SubmitResult("queued", job=job, reason=reason)


def owned_model_hashes(session: Session, owner: str | None) -> set[str] | None:
    if owner is None:
        return None
    return set(session.scalars(select(Model.model_hash).where(Model.owner == owner)))


def cancel(services: Services, job_id: str, owner: str | None) -> Job:
    with services.db.session() as session:
        job = get_job(session, job_id, owner)
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
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued", Job.attempts == job.attempts)
        .values(status="building", attempts=Job.attempts + 1, lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s), started_at=now,
                error_code=None, error_message=None))
    if result.rowcount != 1:
        return None
    session.refresh(job)
    return job


def _fenced(job_id: str, attempt: int, worker_id: str):  # type: ignore[no-untyped-def]
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
    return session.execute(_fenced(job_id, attempt, worker_id).values(**values)).rowcount == 1


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
    engine.profile_hash = digest(engine_cache.profile_shapes(engine.profile))
    engine.last_used_at = utcnow()
    engine.job_id = job_id
    session.flush()
    done = session.execute(_fenced(job_id, attempt, worker_id).values(
        status="succeeded", engine_id=engine.id, finished_at=utcnow(), timings=timings,
        log=log_text[-LOG_LIMIT:], lease_owner=None, lease_expires_at=None))
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
    if session.execute(_fenced(job_id, attempt, worker_id).values(**values)).rowcount != 1:
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
        changed = session.execute(update(Job).where(
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
