"""Live workers and the targets they build: how a job finds a queue someone consumes.

Each worker writes its row at start and on every heartbeat; a row not seen for
``worker_ttl_s`` is not live. A target is (backend, device, arch, toolchain) and has one Celery
queue, so a job only ever reaches a worker that can build exactly what its cache key says.
"""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.cache import Target
from service.models import Worker, utcnow


def queue_name(target: Target) -> str:
    short = hashlib.sha256(target.toolchain_id.encode()).hexdigest()[:10]
    return f"kiln.{target.backend}.{target.device}.{target.arch}.{short}"


def heartbeat(session: Session, worker_id: str, hostname: str, targets: list[dict[str, Any]],
              host: dict[str, Any]) -> None:
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, hostname=hostname, started_at=utcnow())
        session.add(row)
    row.targets, row.host = targets, host
    row.last_seen_at = utcnow()
    forget_cached_targets()


def forget(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))
    forget_cached_targets()


def live_workers(session: Session, ttl_s: int) -> list[Worker]:
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    return list(session.scalars(select(Worker).where(Worker.last_seen_at >= cutoff)
                                .order_by(Worker.last_seen_at.desc())))


def live_targets(session: Session, ttl_s: int, backend: str | None = None,
                 device: str | None = None) -> list[dict[str, Any]]:
    """Targets served now, most recently seen worker first, without duplicates."""
    return [t for t in _targets_of(live_workers(session, ttl_s))
            if (not backend or t["backend"] == backend) and (not device or t["device"] == device)]


def _targets_of(workers: list[Worker]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for worker in workers:
        for t in worker.targets:
            key = (t["backend"], t["device"], t["arch"], t["toolchain_id"])
            if key not in seen:
                seen.add(key)
                out.append(t)
    return out


# Per process: the live-target set, read at most every CACHE_S seconds. Every compile request
# needs it, and reading it scans the workers table; worker rows change on heartbeats (every few
# seconds) and a worker is live for worker_ttl_s, so a set a second or two old is the same
# answer. An entry is also dropped once one of its workers' rows would have expired, and this
# process drops all entries when it writes a heartbeat itself.
CACHE_S = 2.0
_cached: dict[tuple[str, int], tuple[float, float, list[dict[str, Any]]]] = {}
_cached_lock = threading.Lock()


def forget_cached_targets() -> None:
    with _cached_lock:
        _cached.clear()


def live_targets_cached(session: Session, ttl_s: int) -> list[dict[str, Any]]:
    """``live_targets(session, ttl_s)`` (all backends), at most ``CACHE_S`` seconds old."""
    key = (str(session.get_bind().engine.url), ttl_s)
    now = time.monotonic()
    with _cached_lock:
        hit = _cached.get(key)
    if hit is not None and now < hit[0] + CACHE_S and now < hit[1]:
        return hit[2]
    workers = live_workers(session, ttl_s)
    targets = _targets_of(workers)
    # The first moment one of these workers stops being live unless it heartbeats again.
    oldest = min((w.last_seen_at for w in workers), default=None)
    expires = now + CACHE_S if oldest is None else now + max(
        0.0, (oldest + timedelta(seconds=ttl_s) - utcnow()).total_seconds())
    with _cached_lock:
        _cached[key] = (now, expires, targets)
    return targets
