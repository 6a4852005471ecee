"""Live workers and the targets they build: how a job finds a queue someone consumes.

Each worker writes its row at start and on every heartbeat; a row not seen for
``worker_ttl_s`` is not live. A target is (backend, device, arch, toolchain) and has one Celery
queue, so a job only ever reaches a worker that can build exactly what its cache key says.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.engine_cache import Target
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


def forget(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def live_workers(session: Session, ttl_s: int) -> list[Worker]:
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    return list(session.scalars(select(Worker).where(Worker.last_seen_at >= cutoff)
                                .order_by(Worker.last_seen_at.desc())))


def live_targets(session: Session, ttl_s: int, backend: str | None = None,
                 device: str | None = None) -> list[dict[str, Any]]:
    """Targets served now, most recently seen worker first, without duplicates."""
    seen, out = set(), []
    for worker in live_workers(session, ttl_s):
        for t in worker.targets:
            key = (t["backend"], t["device"], t["arch"], t["toolchain_id"])
            if key in seen or (backend and t["backend"] != backend) or (
                    device and t["device"] != device):
                continue
            seen.add(key)
            out.append(t)
    return out
