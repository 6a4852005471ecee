"""The audit log: every action an operator takes (dashboard or ``kiln keys``), who took it,
on what, when and from where. An entry is written once the action has succeeded (in its
transaction where the action is a row change made here), so a refused action leaves none.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import AuditEntry, utcnow

ACTIONS = ("job.cancel", "job.retry", "engine.pin", "engine.unpin", "engine.evict",
           "engine.download", "key.create", "key.revoke", "worker.drain", "session.sign_in",
           "session.sign_out")


def record(session: Session, actor: str, action: str, object_type: str, object_id: str,
           remote_addr: str = "", details: dict[str, Any] | None = None) -> AuditEntry:
    assert action in ACTIONS, action
    entry = AuditEntry(at=utcnow(), actor=actor, action=action, object_type=object_type,
                       object_id=object_id, remote_addr=remote_addr[:64], details=details or {})
    session.add(entry)
    return entry


def entries(session: Session, *, actor: str | None = None, action: str | None = None,
            object_id: str | None = None, offset: int = 0, limit: int = 50
            ) -> tuple[list[AuditEntry], int]:
    """Newest first, with the number that match in all."""
    q = select(AuditEntry)
    if actor:
        q = q.where(AuditEntry.actor == actor)
    if action:
        q = q.where(AuditEntry.action == action)
    if object_id:
        q = q.where(AuditEntry.object_id == object_id)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(AuditEntry.id.desc()).offset(offset).limit(limit))
    return list(rows), total
