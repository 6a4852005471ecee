"""Keep the artifact store under its budget, and collect blobs no row points to.

Eviction is by expected rebuild cost, not recency: an engine that took long to build and is
used often is worth its bytes; a large engine built quickly and seldom used is not. Pinned
engines are never evicted, nor an engine used in the last ``grace_s`` (a download may be
reading it). Blobs no row points to are collected only when older than the grace period, so an
upload or a build whose row is not committed yet is never collected. Collection goes a page of
the store's listing at a time, so periodic housekeeping never lists the whole store at once.
"""

from __future__ import annotations

import itertools
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


def enforce_budget(services: Services, budget_bytes: int, grace_s: int | None = None
                   ) -> EvictionReport:
    """Evict the engines of least rebuild value until the store fits ``budget_bytes``.

    An engine used within ``grace_s`` (default: the deployment's ``gc_grace_s``) is kept.
    """
    if grace_s is None:
        grace_s = services.settings.gc_grace_s
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


@dataclass
class CollectedPage:
    removed: list[str]
    removed_bytes: int
    next_cursor: str  # "" once the listing reached the end of the store


def collect_orphans_page(services: Services, grace_s: int, start_after: str = "",
                         limit: int = 1000, dry_run: bool = False) -> CollectedPage:
    """Look at up to ``limit`` blobs after ``start_after``; delete old ones no row points to."""
    page = list(itertools.islice(services.store.list(start_after=start_after), limit))
    uris = [b.uri for b in page]
    with services.db.session() as s:
        referenced = set(s.scalars(select(Engine.artifact_uri).where(
            Engine.artifact_uri.in_(uris)))) | set(s.scalars(select(Model.blob_uri).where(
                Model.blob_uri.in_(uris))))
    now = time.time()
    removed, removed_bytes = [], 0
    for blob in page:
        if blob.uri not in referenced and now - blob.modified > grace_s:
            if not dry_run:
                services.store.delete(blob.uri)
            removed.append(blob.uri)
            removed_bytes += blob.size
    next_cursor = uris[-1] if len(page) == limit else ""
    return CollectedPage(removed, removed_bytes, next_cursor)


def collect_orphans(services: Services, grace_s: int, page_size: int = 1000,
                    dry_run: bool = False) -> list[str]:
    """Delete blobs older than ``grace_s`` that no model or engine row points to (whole store)."""
    removed: list[str] = []
    cursor = ""
    while True:
        page = collect_orphans_page(services, grace_s, cursor, page_size, dry_run)
        removed += page.removed
        if not page.next_cursor:
            return removed
        cursor = page.next_cursor


def find_orphans(services: Services, grace_s: int) -> list[str]:
    """What :func:`collect_orphans` would delete, deleting nothing."""
    return collect_orphans(services, grace_s, dry_run=True)
