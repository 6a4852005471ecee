"""Configuration: embedded defaults for one machine, environment variables for production.

Every setting has a ``KILN_`` environment variable. With none set, Kiln runs on SQLite, a local
artifact directory and a Celery broker on SQLite (kombu's SQLAlchemy transport), all under
``KILN_DATA_DIR`` (default ``./.kiln``), so there is no server to install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _int(env: dict[str, str], name: str, default: int) -> int:
    return int(env.get(name, default))


def _float(env: dict[str, str], name: str, default: float) -> float:
    return float(env.get(name, default))


def parse_api_keys(text: str) -> dict[str, tuple[str, str]]:
    """``"key1:alice:user,key2:root:admin"`` -> ``{key: (owner, role)}``."""
    keys: dict[str, tuple[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, owner, role = item.split(":")
        if role not in ("user", "admin"):
            raise ValueError(f"KILN_API_KEYS: role must be user or admin, got {role!r}")
        keys[key] = (owner, role)
    return keys


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str
    artifact_uri: str
    # Uploads larger than this are refused with 413 while streaming, before they fill a disk.
    max_upload_bytes: int = 4 * 1024**3
    # Empty: no authentication, every request acts as the local admin (single-user mode).
    api_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    # /metrics answers an admin key, or this token (for a scraper that should hold no API key).
    metrics_token: str = ""
    # Workers: a job's lease is renewed every lease_s / 3; a lapsed lease is swept.
    lease_s: int = 60
    sweep_interval_s: int = 30
    # A job queued this long without a worker claiming it is published again.
    requeue_after_s: int = 120
    max_attempts: int = 3
    build_timeout_s: int = 3600
    build_memory_mb: int = 16 * 1024
    worker_ttl_s: int = 90
    # Store budget (0 = unlimited) and the grace period before an unreferenced blob is collected.
    store_budget_bytes: int = 0
    gc_grace_s: int = 3600
    # Orphan collection walks the store a page at a time, one page per this many seconds.
    gc_interval_s: int = 300
    # S3 only: > 0 redirects engine downloads to a URL presigned for this long, so the bytes
    # go from the store to the client without passing through the API.
    download_presign_s: int = 0
    # "text" or "json" (one object a line, with the job id on every line about a job).
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(overrides.pop("data_dir", None) or env.get("KILN_DATA_DIR", ".kiln"))
        data_dir = data_dir.expanduser().resolve()
        settings = cls(
            data_dir=data_dir,
            database_url=env.get("KILN_DATABASE_URL", f"sqlite:///{data_dir / 'kiln.db'}"),
            broker_url=env.get("KILN_BROKER_URL", f"sqla+sqlite:///{data_dir / 'broker.db'}"),
            artifact_uri=env.get("KILN_ARTIFACT_URI", (data_dir / "artifacts").as_uri()),
            max_upload_bytes=_int(env, "KILN_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            api_keys=parse_api_keys(env.get("KILN_API_KEYS", "")),
            metrics_token=env.get("KILN_METRICS_TOKEN", ""),
            lease_s=_int(env, "KILN_LEASE_S", cls.lease_s),
            sweep_interval_s=_int(env, "KILN_SWEEP_INTERVAL_S", cls.sweep_interval_s),
            requeue_after_s=_int(env, "KILN_REQUEUE_AFTER_S", cls.requeue_after_s),
            max_attempts=_int(env, "KILN_MAX_ATTEMPTS", cls.max_attempts),
            build_timeout_s=_int(env, "KILN_BUILD_TIMEOUT_S", cls.build_timeout_s),
            build_memory_mb=_int(env, "KILN_BUILD_MEMORY_MB", cls.build_memory_mb),
            worker_ttl_s=_int(env, "KILN_WORKER_TTL_S", cls.worker_ttl_s),
            store_budget_bytes=_int(env, "KILN_STORE_BUDGET_BYTES", cls.store_budget_bytes),
            gc_grace_s=_int(env, "KILN_GC_GRACE_S", cls.gc_grace_s),
            gc_interval_s=_int(env, "KILN_GC_INTERVAL_S", cls.gc_interval_s),
            download_presign_s=_int(env, "KILN_DOWNLOAD_PRESIGN_S", cls.download_presign_s),
            log_format=env.get("KILN_LOG_FORMAT", cls.log_format),
        )
        if settings.log_format not in ("text", "json"):
            raise ValueError(f"KILN_LOG_FORMAT must be text or json, got {settings.log_format!r}")
        return replace(settings, **overrides)

    @property
    def scratch_dir(self) -> Path:
        """Local disk for uploads in flight and build work directories."""
        return self.data_dir / "scratch"

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process (a worker)."""
        # Every field, so an override made in code (tests, bench) reaches the worker too, except
        # the API keys: a worker authenticates no one, and a secret it lacks cannot leak from it.
        return {f"KILN_{f.name.upper()}": str(getattr(self, f.name))
                for f in fields(self) if f.name != "api_keys"}
