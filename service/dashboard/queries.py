"""Read-only queries behind the admin dashboard. Nothing here writes.

Each function takes an open session and returns rows or small dataclasses for a template.
Admins see everything, so nothing is filtered by owner. Lists take a ``Filters`` and a page
and return one page of rows with the number that match in all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session, defer

from service.errors import NotFound
from service.models import (
    ACTIVE_STATES,
    JOB_STATES,
    AuditEntry,
    Engine,
    Job,
    Model,
    Submission,
    Worker,
    utcnow,
)

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


# ---- lists: filters, search, paging --------------------------------------------------------

PAGE_SIZE = 25


@dataclass(frozen=True)
class Filters:
    state: str | None = None
    owner: str | None = None
    target: str | None = None  # a backend ("aoti") or backend/device ("aoti/cpu")
    model: str | None = None  # a model id, its canonical hash or its file's sha256
    q: str | None = None  # search: an id, a file name fragment, a hash prefix
    page: int = 1

    @property
    def offset(self) -> int:
        return (self.page - 1) * PAGE_SIZE

    def args(self, **changes: Any) -> dict[str, Any]:
        """Query-string arguments for a link to this list with ``changes``."""
        out = {k: v for k, v in self.__dict__.items() if v not in (None, "", 1) or
               (k == "page" and v != 1)}
        out.update(changes)
        return {k: v for k, v in out.items() if v not in (None, "")}


def _target(q: Any, entity: Any, target: str | None) -> Any:
    if target:
        backend, _, device = target.partition("/")
        q = q.where(entity.backend == backend)
        if device:
            q = q.where(entity.device == device)
    return q


def _model_hashes(s: Session, ref: str) -> Any:
    return select(Model.model_hash).where(
        (Model.id == ref) | (Model.model_hash == ref) | (Model.sha256 == ref))


def _page(s: Session, q: Any, order: Any, f: Filters) -> tuple[list[Any], int]:
    total = s.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0
    return list(s.execute(q.order_by(order).offset(f.offset).limit(PAGE_SIZE)).all()), total


def find_jobs(s: Session, f: Filters) -> tuple[list[tuple[Job, str]], int]:
    q = select(Job, Model.filename).join(Model, Model.id == Job.model_id).options(defer(Job.log))
    if f.state:
        q = q.where(Job.status == f.state)
    if f.owner:
        q = q.where(Job.owner == f.owner)
    q = _target(q, Job, f.target)
    if f.model:
        q = q.where((Job.model_id == f.model) | Model.model_hash.in_(_model_hashes(s, f.model)))
    if f.q:
        like = f"%{_escape_like(f.q)}%"
        q = q.where(or_(Job.id == f.q, Job.cache_key.startswith(f.q, autoescape=True),
                        Model.filename.ilike(like, escape="\\"), Job.engine_id == f.q))
    rows, total = _page(s, q, Job.created_at.desc(), f)
    return [(job, filename) for job, filename in rows], total


def find_engines(s: Session, f: Filters) -> tuple[list[Engine], int]:
    q = select(Engine)
    q = _target(q, Engine, f.target)
    if f.owner:
        q = q.where(Engine.model_hash.in_(select(Model.model_hash).where(Model.owner == f.owner)))
    if f.model:
        q = q.where(Engine.model_hash.in_(_model_hashes(s, f.model)))
    if f.state == "pinned":
        q = q.where(Engine.pinned.is_(True))
    if f.q:
        q = q.where(or_(Engine.id == f.q, Engine.sha256.startswith(f.q, autoescape=True),
                        Engine.model_hash.startswith(f.q, autoescape=True),
                        Engine.model_hash.in_(select(Model.model_hash).where(
                            Model.filename.ilike(f"%{_escape_like(f.q)}%", escape="\\")))))
    rows, total = _page(s, q, Engine.created_at.desc(), f)
    return [row[0] for row in rows], total


@dataclass
class ModelRow:
    model: Model
    jobs: int
    engines: int
    hits: int


def find_models(s: Session, f: Filters) -> tuple[list[ModelRow], int]:
    q = select(Model)
    if f.owner:
        q = q.where(Model.owner == f.owner)
    if f.model:
        q = q.where((Model.id == f.model) | (Model.model_hash == f.model)
                    | (Model.sha256 == f.model))
    if f.q:
        q = q.where(or_(Model.id == f.q, Model.model_hash.startswith(f.q, autoescape=True),
                        Model.sha256.startswith(f.q, autoescape=True),
                        Model.filename.ilike(f"%{_escape_like(f.q)}%", escape="\\")))
    rows, total = _page(s, q, Model.created_at.desc(), f)
    models = [row[0] for row in rows]
    hashes = {m.model_hash for m in models}
    engines = dict(s.execute(select(Engine.model_hash, func.count()).where(
        Engine.model_hash.in_(hashes)).group_by(Engine.model_hash)).tuples().all())
    hits = dict(s.execute(select(Submission.model_id, func.count()).where(
        Submission.model_id.in_([m.id for m in models]), Submission.outcome == "cached")
        .group_by(Submission.model_id)).tuples().all())
    job_counts = dict(s.execute(select(Job.model_id, func.count()).where(
        Job.model_id.in_([m.id for m in models])).group_by(Job.model_id)).tuples().all())
    return [ModelRow(m, job_counts.get(m.id, 0), engines.get(m.model_hash, 0),
                     hits.get(m.id, 0)) for m in models], total


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def owners(s: Session) -> list[str]:
    return list(s.scalars(select(Model.owner).distinct().order_by(Model.owner)))


def targets_in_use(s: Session) -> list[str]:
    rows = s.execute(select(Job.backend, Job.device).distinct()
                     .order_by(Job.backend, Job.device)).all()
    return [f"{b}/{d}" for b, d in rows]


# ---- workers ----------------------------------------------------------------------------------

@dataclass
class WorkerRow:
    worker: Worker
    state: str  # online, draining, drained, lost
    builds: int
    failures: int


def workers_history(s: Session, ttl_s: int) -> list[WorkerRow]:
    """Every worker row: live ones, draining ones, and those that stopped heartbeating (lost).

    Build counts come from the first line of each job's log, ``kiln: job J attempt N on W``,
    which names the worker of the job's last attempt (jobs keep no worker column).
    """
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    out = []
    for w in s.scalars(select(Worker).order_by(Worker.last_seen_at.desc())):
        live = w.last_seen_at >= cutoff
        if w.drain_requested_at is not None:
            state = "draining" if live else "drained"
        else:
            state = "online" if live else "lost"
        head = func.substr(Job.log, 1, 300)
        mine = head.like(f"kiln: job % on {_escape_like(w.id)}%", escape="\\")
        builds, failures = s.execute(select(
            func.count(), func.coalesce(func.sum(case((Job.status == "failed", 1), else_=0)), 0))
            .where(mine, Job.status.in_(("succeeded", "failed")))).one()
        out.append(WorkerRow(w, state, int(builds), int(failures)))
    return out


def queue_depth(s: Session) -> list[tuple[str, str, int, int]]:
    """Per target (backend/device, arch): jobs queued, jobs building or validating."""
    rows = s.execute(select(Job.backend, Job.device, Job.arch,
                            func.sum(case((Job.status == "queued", 1), else_=0)),
                            func.sum(case((Job.status != "queued", 1), else_=0)))
                     .where(Job.status.in_(ACTIVE_STATES))
                     .group_by(Job.backend, Job.device, Job.arch)).all()
    return [(f"{b}/{d}", a, int(q or 0), int(r or 0)) for b, d, a, q, r in rows]


# ---- trends ------------------------------------------------------------------------------------

@dataclass
class DayOutcome:
    start: datetime
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled


def finished_per_day(s: Session, days: int = 14, now: datetime | None = None
                     ) -> list[DayOutcome]:
    first = _floor(now or utcnow(), "day") - timedelta(days=days - 1)
    out = [DayOutcome(first + timedelta(days=i)) for i in range(days)]
    by_start = {d.start: d for d in out}
    bucket = _bucket(s, Job.finished_at, "day")
    for start, status, n in s.execute(
            select(bucket, Job.status, func.count()).where(Job.finished_at >= first)
            .where(Job.status.in_(("succeeded", "failed", "cancelled")))
            .group_by(bucket, Job.status)):
        d = by_start.get(datetime.fromisoformat(str(start)))
        if d is not None:
            setattr(d, status, getattr(d, status) + n)
    return out


def build_seconds_by_target(s: Session, days: int = 30) -> dict[str, list[float]]:
    """Build seconds of successful jobs in the last ``days``, per backend/device."""
    since = utcnow() - timedelta(days=days)
    out: dict[str, list[float]] = {}
    for job in s.scalars(select(Job).options(defer(Job.log)).where(
            Job.status == "succeeded", Job.finished_at >= since)):
        seconds = job.timings.get("build_s")
        if seconds is not None:
            out.setdefault(f"{job.backend}/{job.device}", []).append(float(seconds))
    return out


def usage_by_owner(s: Session, days: int = 30) -> list[tuple[str, int, int]]:
    """Per owner over ``days``: submissions, and how many the cache answered."""
    since = utcnow() - timedelta(days=days)
    rows = s.execute(select(Submission.owner, func.count(),
                            func.sum(case((Submission.outcome == "cached", 1), else_=0)))
                     .where(Submission.created_at >= since).group_by(Submission.owner)
                     .order_by(func.count().desc()).limit(20)).all()
    return [(o, int(n), int(c or 0)) for o, n, c in rows]


def store_growth(s: Session, days: int = 14, now: datetime | None = None
                 ) -> list[tuple[datetime, int, int]]:
    """Per day: bytes of the engines stored now that existed by the end of that day, and the
    engines added that day (evicted engines leave no row; evictions are in the audit log)."""
    first = _floor(now or utcnow(), "day") - timedelta(days=days - 1)
    before = int(s.scalar(select(func.coalesce(func.sum(Engine.size), 0))
                          .where(Engine.created_at < first)) or 0)
    bucket = _bucket(s, Engine.created_at, "day")
    added = {datetime.fromisoformat(str(d)): (int(b or 0), int(n))
             for d, b, n in s.execute(select(bucket, func.sum(Engine.size), func.count())
                                      .where(Engine.created_at >= first).group_by(bucket))}
    out, running = [], before
    for i in range(days):
        day = first + timedelta(days=i)
        b, n = added.get(day, (0, 0))
        running += b
        out.append((day, running, n))
    return out


def evictions_per_day(s: Session, days: int = 14, now: datetime | None = None
                      ) -> list[tuple[datetime, int]]:
    """Engines evicted from the dashboard per day (from the audit log)."""
    first = _floor(now or utcnow(), "day") - timedelta(days=days - 1)
    bucket = _bucket(s, AuditEntry.at, "day")
    counts = {datetime.fromisoformat(str(d)): int(n) for d, n in s.execute(
        select(bucket, func.count()).where(AuditEntry.at >= first,
                                           AuditEntry.action == "engine.evict").group_by(bucket))}
    return [(first + timedelta(days=i), counts.get(first + timedelta(days=i), 0))
            for i in range(days)]
