"""Keep the artifact store under its budget, and collect blobs no row points to.

Eviction is by expected rebuild cost, not recency: an engine that took long to build and is
used often is worth its bytes; a large engine built quickly and seldom used is not. Pinned
engines are never evicted, nor an engine used in the last ``grace_s`` (a download may be
reading it). Blobs no row points to are collected only when older than the grace period, so an
upload or a build whose row is not committed yet is never collected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update

from service.models import Engine, Job, Model, utcnow
from service.services import Services


def rebuild_value(engine: Engine) -> float:
    """Seconds of build saved per byte kept: build time x (hits + 1) / size."""
    return max(engine.build_seconds, 0.001) * (engine.hits + 1) / max(engine.size, 1)


@dataclass
class EvictionReport:
    evicted: list[str]
    bytes_before: int
    bytes_after: int


def enforce_budget(services: Services, budget_bytes: int, grace_s: int = 600) -> EvictionReport:
    with services.db.session() as s:
        total = int(s.scalar(select(func.coalesce(func.sum(Engine.size), 0))) or 0)
        if budget_bytes <= 0 or total <= budget_bytes:
            return EvictionReport([], total, total)
        recent = utcnow() - timedelta(seconds=grace_s)
        candidates = sorted(s.scalars(select(Engine).where(
            Engine.pinned.is_(False), Engine.last_used_at < recent)), key=rebuild_value)
        evicted, after, uris = [], total, []
        for engine in candidates:
            if after <= budget_bytes:
                break
            # Jobs keep their record; their engine link goes, with the reason in the error.
            s.execute(update(Job).where(Job.engine_id == engine.id).values(engine_id=None))
            uris.append(engine.artifact_uri)
            s.delete(engine)
            evicted.append(engine.id)
            after -= engine.size
        s.flush()
        still_used = set(s.scalars(select(Engine.artifact_uri).where(
            Engine.artifact_uri.in_(uris))))
    # Rows first, blobs after the commit: a reader never finds a row without its blob.
    for uri in set(uris) - still_used:
        services.store.delete(uri)
    return EvictionReport(evicted, total, after)


def evict(services: Services, engine_id: str) -> EvictionReport:
    """Evict one engine now (an operator's choice), the way ``enforce_budget`` evicts: jobs
    keep their record, the blob goes after the commit unless another row still uses it.
    Pinned engines are refused: unpin first."""
    from service.errors import KilnError, NotFound

    with services.db.session() as s:
        engine = s.get(Engine, engine_id)
        if engine is None:
            raise NotFound("engine", engine_id)
        if engine.pinned:
            raise KilnError("engine_pinned", f"engine {engine_id} is pinned: unpin it first", 409)
        total = int(s.scalar(select(func.coalesce(func.sum(Engine.size), 0))) or 0)
        s.execute(update(Job).where(Job.engine_id == engine.id).values(engine_id=None))
        uri, size = engine.artifact_uri, engine.size
        s.delete(engine)
        s.flush()
        still_used = s.scalar(select(func.count()).where(Engine.artifact_uri == uri))
    if not still_used:
        services.store.delete(uri)
    return EvictionReport([engine_id], total, total - size)


def collect_orphans(services: Services, grace_s: int) -> list[str]:
    """Delete blobs older than ``grace_s`` that no model or engine row points to."""
    with services.db.session() as s:
        referenced = set(s.scalars(select(Engine.artifact_uri))) | set(
            s.scalars(select(Model.blob_uri)))
    now = time.time()
    removed = []
    for blob in services.store.list():
        if blob.uri not in referenced and now - blob.modified > grace_s:
            services.store.delete(blob.uri)
            removed.append(blob.uri)
    return removed
