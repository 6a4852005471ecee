"""Periodic upkeep, once per deployment: sweep lost jobs, keep the store under budget, collect
orphaned blobs.

Every worker and ``kiln serve`` run :func:`run_forever`, but each task runs in one process at a
time: a row of the ``housekeeping`` table is a lease that one process takes with a conditional
UPDATE (the same on SQLite and PostgreSQL, no advisory locks needed), and the row's
``last_run_at`` spaces the runs, so N processes do the work of one. Sweeping must go on while
no worker is alive (``kiln serve`` runs it too); orphan collection looks at one page of the
store per ``gc_interval_s``, resuming from the row's cursor, instead of listing all of it every
30 s. ``kiln gc`` runs a full pass on demand.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, or_, update
from sqlalchemy.exc import IntegrityError

from service import jobs, store_budget
from service.celery_app import publish_build
from service.models import HousekeepingTask, Job, Worker, utcnow
from service.services import Services

log = logging.getLogger("kiln.housekeeping")
SWEEP, EVICT, GC = "sweep", "evict", "gc"
GC_PAGE = 1000  # one S3 LIST request


@dataclass
class TaskResult:
    items: int = 0
    bytes: int = 0
    cursor: str | None = None  # None: leave the stored cursor as it is


def _ensure_row(services: Services, task: str) -> None:
    try:
        with services.db.session() as s:
            if s.get(HousekeepingTask, task) is None:
                s.add(HousekeepingTask(task=task, runs=0, items_total=0, bytes_total=0))
    except IntegrityError:
        pass  # another process inserted it first


def take_lease(services: Services, task: str, holder: str, every_s: float,
               lease_s: float) -> str | None:
    """Take ``task`` if it is due and nobody else holds it; return its cursor ('' if none).

    None: not due, or another live process holds it.
    """
    _ensure_row(services, task)
    now = utcnow()
    with services.db.session() as s:
        taken = cast(CursorResult[Any], s.execute(update(HousekeepingTask).where(
            HousekeepingTask.task == task,
            or_(HousekeepingTask.holder.is_(None), HousekeepingTask.holder == holder,
                HousekeepingTask.lease_expires_at < now),
            or_(HousekeepingTask.last_run_at.is_(None),
                HousekeepingTask.last_run_at <= now - timedelta(seconds=every_s)),
        ).values(holder=holder, lease_expires_at=now + timedelta(seconds=lease_s)))).rowcount
        if taken != 1:
            return None
        row = s.get(HousekeepingTask, task)
        return (row.cursor or "") if row else ""


def release_lease(services: Services, task: str, holder: str, result: TaskResult | None
                  ) -> None:
    values: dict[str, object] = {"holder": None, "lease_expires_at": None,
                                 "last_run_at": utcnow()}
    if result is not None:
        values.update(runs=HousekeepingTask.runs + 1,
                      items_total=HousekeepingTask.items_total + result.items,
                      bytes_total=HousekeepingTask.bytes_total + result.bytes)
        if result.cursor is not None:
            values["cursor"] = result.cursor
    with services.db.session() as s:
        s.execute(update(HousekeepingTask).where(
            HousekeepingTask.task == task, HousekeepingTask.holder == holder).values(**values))


def sweep(services: Services, _cursor: str = "") -> TaskResult:
    """Requeue (or fail) jobs whose lease lapsed and republish jobs whose message was lost."""
    with services.db.session() as s:
        to_publish = [(j.id, j.queue) for j in jobs.sweep(s, services.settings.requeue_after_s)]
    for job_id, queue in to_publish:
        publish_build(services.celery, job_id, queue)
    return TaskResult(items=len(to_publish))


def evict(services: Services, _cursor: str = "") -> TaskResult:
    budget = services.settings.store_budget_bytes
    if not budget:
        return TaskResult()
    report = store_budget.enforce_budget(services, budget, services.settings.gc_grace_s)
    if report.evicted:
        log.warning("evicted %d engines to keep the store under its budget: %d -> %d bytes",
                    len(report.evicted), report.bytes_before, report.bytes_after)
    return TaskResult(items=len(report.evicted), bytes=report.bytes_before - report.bytes_after)


def collect(services: Services, cursor: str = "") -> TaskResult:
    """One page of orphan collection, resuming after ``cursor``."""
    page = store_budget.collect_orphans_page(services, services.settings.gc_grace_s, cursor,
                                             GC_PAGE)
    if page.removed:
        log.warning("collected %d orphaned blobs (%d bytes)", len(page.removed),
                    page.removed_bytes)
    return TaskResult(items=len(page.removed), bytes=page.removed_bytes,
                      cursor=page.next_cursor)


def schedule(services: Services) -> list[tuple[str, float, Callable[[Services, str], TaskResult]]]:
    s = services.settings
    return [(SWEEP, s.sweep_interval_s, sweep), (EVICT, s.sweep_interval_s, evict),
            (GC, s.gc_interval_s, collect)]


def run_due(services: Services, holder: str) -> dict[str, TaskResult]:
    """Run each task that is due and that no other process holds; return what ran."""
    ran: dict[str, TaskResult] = {}
    for task, every_s, fn in schedule(services):
        # A holder killed mid-run blocks the task until its lease lapses, so the lease is
        # short; a run that outlasts it may overlap the next, which every task tolerates
        # (sweep updates are conditional, deletes idempotent).
        cursor = take_lease(services, task, holder, every_s,
                            lease_s=max(10.0, 3.0 * services.settings.sweep_interval_s))
        if cursor is None:
            continue
        result = None
        try:
            result = fn(services, cursor)
            ran[task] = result
        except Exception:  # a database or store blip: log it, retry on the next round
            log.exception("housekeeping task %s failed", task)
        finally:
            release_lease(services, task, holder, result)
    return ran


def run_forever(services: Services, holder: str, stop: threading.Event) -> None:
    # Wake four times a period: a task is due ``every_s`` after its last run ended, and
    # waking once a period would find it just short of due and run it every other period.
    period = min(services.settings.sweep_interval_s, services.settings.gc_interval_s)
    interval = max(0.5, period / 4)
    while not stop.is_set():
        try:
            run_due(services, holder)
        except Exception:
            log.exception("housekeeping round failed")
        stop.wait(interval)


def start_thread(services: Services, holder: str) -> threading.Event:
    """Run housekeeping in a daemon thread of this process; set the event to stop it."""
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(services, holder, stop), daemon=True,
                     name="kiln-housekeeping").start()
    return stop


def fail_over_dead_worker(services: Services, worker_pid: int, hostname: str,
                          reason: str) -> list[str]:
    """A worker process on this host died: requeue its jobs now, saying why, and forget it.

    Without this the job would read ``building`` until its lease lapsed. The requeue is the
    sweeper's own (the attempt counts; out of attempts, the job fails), with the reason added.
    """
    now = utcnow()
    with services.db.session() as s:
        dead = [w.id for w in s.query(Worker).filter(Worker.hostname == hostname)
                if (w.host or {}).get("pid") == worker_pid]
        if not dead:
            return []
        s.execute(update(Job).where(Job.lease_owner.in_(dead),
                                    Job.status.in_(("building", "validating")))
                  .values(lease_expires_at=now - timedelta(seconds=1)))
        requeued = jobs.sweep(s, services.settings.requeue_after_s)
        touched = [j.id for j in requeued]
        message = f"the worker running it (pid {worker_pid}) died: {reason}"
        s.execute(update(Job).where(Job.id.in_(touched), Job.error_code == "worker_lost")
                  .values(error_message=message + "; retrying"))
        s.query(Worker).filter(Worker.id.in_(dead)).delete(synchronize_session=False)
        to_publish = [(j.id, j.queue) for j in requeued]
    for job_id, queue in to_publish:
        publish_build(services.celery, job_id, queue)
    return [job_id for job_id, _ in to_publish]
