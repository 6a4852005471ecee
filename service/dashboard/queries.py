"""Read-only queries behind the admin dashboard. Nothing here writes.

Each function takes an open session and returns rows or small dataclasses for a template.
Admins see everything, so nothing is filtered by owner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, defer

from service.errors import NotFound
from service.models import JOB_STATES, Engine, Job, Model, Submission, utcnow

# Hit-rate windows: how far back, and the bucket size.
WINDOWS: dict[str, tuple[int, str]] = {"24h": (24, "hour"), "7d": (7, "day"),
                                       "30d": (30, "day")}
OUTCOMES = ("cached", "joined", "queued")


def job_counts(s: Session) -> dict[str, int]:
    """Jobs per status, every status present (zero when none)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update(s.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
    return counts


def recent_jobs(s: Session, status: str | None = None, limit: int = 25
                ) -> list[tuple[Job, str]]:
    """Newest jobs with their model's filename; the build log (up to 1 MB each) is not read."""
    q = (select(Job, Model.filename).join(Model, Model.id == Job.model_id).options(defer(Job.log))
         .order_by(Job.created_at.desc()).limit(limit))
    if status:
        q = q.where(Job.status == status)
    return list(s.execute(q).tuples())


def recent_builds(s: Session, limit: int = 40) -> list[tuple[Job, float]]:
    """The last successful jobs, oldest first, with their build seconds."""
    rows = s.execute(
        select(Job, Engine.build_seconds).outerjoin(Engine, Engine.id == Job.engine_id)
        .options(defer(Job.log)).where(Job.status == "succeeded")
        .order_by(Job.finished_at.desc()).limit(limit)).tuples()
    return [(job, float(job.timings.get("build_s") or seconds or 0.0))
            for job, seconds in reversed(list(rows))]


# ---- cache hit rate --------------------------------------------------------------------

@dataclass
class Outcomes:
    """How submissions were answered: from the cache, by joining a build, by a new build."""

    start: datetime | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def hit_rate(self) -> float | None:
        """Share answered from the cache; None with nothing submitted."""
        return self.counts["cached"] / self.total if self.total else None


def _bucket(s: Session, column: Any, unit: str) -> Any:
    if s.get_bind().dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:00:00" if unit == "hour" else "%Y-%m-%d 00:00:00",
                             column)
    return func.date_trunc(unit, column)


def _floor(t: datetime, unit: str) -> datetime:
    t = t.replace(minute=0, second=0, microsecond=0)
    return t.replace(hour=0) if unit == "day" else t


def hit_rate_series(s: Session, window: str, now: datetime | None = None) -> list[Outcomes]:
    """Outcomes per hour or day over ``window`` (a key of WINDOWS), oldest first, no gaps."""
    count, unit = WINDOWS[window]
    step = timedelta(hours=1) if unit == "hour" else timedelta(days=1)
    first = _floor(now or utcnow(), unit) - step * (count - 1)
    buckets = [Outcomes(first + step * i) for i in range(count)]
    by_start = {b.start: b for b in buckets}
    bucket = _bucket(s, Submission.created_at, unit)
    rows = s.execute(select(bucket, Submission.outcome, func.count())
                     .where(Submission.created_at >= first).group_by(bucket, Submission.outcome))
    for start, outcome, n in rows:
        # SQLite answers a string, PostgreSQL a datetime.
        b = by_start.get(datetime.fromisoformat(str(start)))
        if b is not None and outcome in b.counts:
            b.counts[outcome] += n
    return buckets


def outcomes_total(s: Session) -> Outcomes:
    total = Outcomes()
    for outcome, n in s.execute(select(Submission.outcome, func.count())
                                .group_by(Submission.outcome)):
        if outcome in total.counts:
            total.counts[outcome] = n
    return total


# ---- engines and the store ----------------------------------------------------------------

@dataclass
class StoreUsage:
    engines: int
    bytes: int
    pinned: int
    pinned_bytes: int
    budget_bytes: int  # 0: unlimited


def store_usage(s: Session, budget_bytes: int) -> StoreUsage:
    n, size, pinned, pinned_size = s.execute(select(
        func.count(), func.coalesce(func.sum(Engine.size), 0),
        func.coalesce(func.sum(case((Engine.pinned, 1), else_=0)), 0),
        func.coalesce(func.sum(case((Engine.pinned, Engine.size), else_=0)), 0))).one()
    return StoreUsage(n, int(size), int(pinned), int(pinned_size), budget_bytes)


def list_engines(s: Session, backend: str | None = None, limit: int = 100
                 ) -> tuple[list[Engine], int]:
    """The newest engines (optionally of one backend) and how many there are in all."""
    q = select(Engine).order_by(Engine.created_at.desc())
    n = select(func.count()).select_from(Engine)
    if backend:
        q, n = q.where(Engine.backend == backend), n.where(Engine.backend == backend)
    return list(s.scalars(q.limit(limit))), s.scalar(n) or 0


def backends_in_use(s: Session) -> list[str]:
    return list(s.scalars(select(Engine.backend).distinct().order_by(Engine.backend)))


def models_by_hash(s: Session, hashes: Iterable[str]) -> dict[str, Model]:
    """One model row per model_hash (several owners may have uploaded the same program)."""
    out: dict[str, Model] = {}
    for model in s.scalars(select(Model).where(Model.model_hash.in_(set(hashes)))
                           .order_by(Model.created_at)):
        out.setdefault(model.model_hash, model)
    return out


def get_job(s: Session, job_id: str) -> tuple[Job, Model | None]:
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound("job", job_id)
    return job, s.get(Model, job.model_id)


def get_engine(s: Session, engine_id: str) -> tuple[Engine, list[Model]]:
    """The engine and the models (one per owner) it was built from."""
    engine = s.get(Engine, engine_id)
    if engine is None:
        raise NotFound("engine", engine_id)
    return engine, list(s.scalars(select(Model).where(Model.model_hash == engine.model_hash)
                                  .order_by(Model.created_at)))
