"""Tables: uploaded models, compile jobs, stored engines and live workers.

Ids are random strings, not sequences, so an id says nothing about what else exists.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ACTIVE_STATES = ("queued", "building", "validating")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
JOB_STATES = ACTIVE_STATES + TERMINAL_STATES
_ACTIVE_SQL = "status IN ('queued', 'building', 'validating')"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("owner", "model_hash", name="uq_models_owner_hash"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    owner: Mapped[str] = mapped_column(String(100), index=True)
    model_hash: Mapped[str] = mapped_column(String(64), index=True)
    graph_hash: Mapped[str] = mapped_column(String(64), index=True)
    weights_hash: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # of the uploaded bytes
    size: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255), default="")
    torch_version: Mapped[str] = mapped_column(String(64), default="")
    signature: Mapped[dict[str, Any]] = mapped_column(JSON)
    blob_uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # Single flight: at most one active job per cache key, enforced by the database.
        Index(
            "uq_jobs_active_cache_key", "cache_key", unique=True,
            sqlite_where=text(_ACTIVE_SQL), postgresql_where=text(_ACTIVE_SQL),
        ),
        Index("ix_jobs_status_updated", "status", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    owner: Mapped[str] = mapped_column(String(100), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    backend: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(16))
    arch: Mapped[str] = mapped_column(String(64))
    toolchain_id: Mapped[str] = mapped_column(String(255))
    queue: Mapped[str] = mapped_column(String(255))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    profile: Mapped[list[Any]] = mapped_column(JSON)
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    miss_reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    log: Mapped[str] = mapped_column(Text, default="")
    engine_id: Mapped[str | None] = mapped_column(ForeignKey("engines.id"), nullable=True)
    # Weight-swap reuse: the stored engine whose compiled code this job reuses with new weights.
    swap_from_engine_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Engine(Base):
    __tablename__ = "engines"
    __table_args__ = (
        Index("ix_engines_lookup", "model_hash", "backend", "device", "arch", "options_hash"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("eng"))
    cache_key: Mapped[str] = mapped_column(String(64), unique=True)
    model_hash: Mapped[str] = mapped_column(String(64))
    graph_hash: Mapped[str] = mapped_column(String(64), index=True)
    weights_hash: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(16))
    arch: Mapped[str] = mapped_column(String(64))
    toolchain_id: Mapped[str] = mapped_column(String(255))
    toolchain: Mapped[dict[str, Any]] = mapped_column(JSON)
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    options_hash: Mapped[str] = mapped_column(String(64))
    profile: Mapped[list[Any]] = mapped_column(JSON)
    profile_hash: Mapped[str] = mapped_column(String(64))
    artifact_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    build_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    build_report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    validation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # "passed": Kiln ran the engine and it matched the program at min/opt/max; "not_run": built
    # by a worker that cannot run it (e.g. TensorRT-RTX on a CPU-only or sm_90 host), with the
    # reason. Lookups serve only "passed" engines unless the request accepts unvalidated ones.
    validation_status: Mapped[str] = mapped_column(String(16), default="passed")
    validation_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    benchmark: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    last_used_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    # [{backend, device, arch, toolchain_id, toolchain, queue}] this worker consumes.
    targets: Mapped[list[Any]] = mapped_column(JSON)
    host: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # GPU, memory, versions
    current_job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Set by an admin (dashboard "drain"): the worker finishes its job and takes no more.
    drain_requested_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Submission(Base):
    """One answered compile request: how the cache did, for hit rates over time."""

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(100))
    model_id: Mapped[str] = mapped_column(String(40))
    backend: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))  # cached, queued, joined
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    engine_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class HousekeepingTask(Base):
    """A periodic task run by one process of the deployment at a time (``service.housekeeping``).

    The row is a lease: whoever holds it unexpired runs the task. It also keeps the task's
    resume point (GC's listing cursor) and running totals, which ``/metrics`` reports.
    """

    __tablename__ = "housekeeping"

    task: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cursor: Mapped[str | None] = mapped_column(Text, nullable=True)
    runs: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Evicted engines or collected blobs, and their bytes, since the deployment began.
    items_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class ApiKey(Base):
    """An API key made with ``kiln keys create`` or the dashboard. Only its sha256 is stored:
    the key is 256 random bits, so a fast hash is enough (nothing to brute-force) and a lookup
    is one indexed equality, not a scan of slow hashes."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise a key
    owner: Mapped[str] = mapped_column(String(100), index=True)
    role: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(255), default="")
    created_by: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class RateBucket(Base):
    """A token bucket per API key (by key hash, so keys from KILN_API_KEYS have one too)."""

    __tablename__ = "rate_buckets"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class AuditEntry(Base):
    """One action taken from the dashboard or the CLI: who, what, on what, when, from where."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(40), index=True)
    object_type: Mapped[str] = mapped_column(String(20))
    object_id: Mapped[str] = mapped_column(String(255))
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
