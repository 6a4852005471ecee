"""A live Kiln for one case: a throwaway PostgreSQL database (or the embedded SQLite), Redis as
the broker, the API under gunicorn, and, when a case builds, a real worker process."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    REDIS_URL,
    ROOT,
    BenchError,
    Gunicorn,
    Run,
    log,
    stop_process,
    tail,
    throwaway_database,
)
from kiln.client import KilnClient
from service import api_keys
from service.cache import Target, cache_key, digest, profile_shapes, toolchain_id
from service.db import Database, upgrade
from service.models import Engine, Model, Worker, utcnow
from service.profiles import resolve_profile
from service.settings import Settings
from service.targets import normalize_options
from service.worker_registry import live_workers, queue_name


def synthetic_target() -> dict[str, Any]:
    """A target for cases that never build (cache hits, lookups): a fake worker row serves it,
    so requests take the production path (a live worker's toolchain filters the lookup)."""
    versions = {"torch": version("torch")}
    target = Target("aoti", "cpu", f"{platform.machine()}-bench", toolchain_id(versions))
    return {**target.as_dict(), "toolchain": versions, "queue": queue_name(target)}


@dataclass
class KilnStack:
    settings: Settings
    env: dict[str, str]
    api: Gunicorn
    db: Database
    workdir: Path
    worker: subprocess.Popen[bytes] | None = None
    worker_log: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None  # a database key, as `kiln serve` makes (None: single-user)

    @property
    def url(self) -> str:
        return self.api.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> KilnClient:
        return KilnClient(self.api.url, api_key=self.api_key, timeout=120)

    def create_key(self, owner: str = "bench", role: str = "user") -> str:
        """A database API key (the production setting): requests then authenticate with it."""
        with self.db.session() as s:
            self.api_key = api_keys.create(s, owner, role).secret
        return self.api_key

    def upload(self, path: Path) -> dict[str, Any]:
        return self.client().upload(path)

    # ---- rows written the way the service writes them ------------------------------------

    def add_fake_worker(self, target: dict[str, Any]) -> None:
        """A worker row that stays live for the run (seen an hour ahead), serving ``target``.
        Nothing consumes its queue: only cases where every request hits use it."""
        with self.db.session() as s:
            s.add(Worker(id="kiln@bench-fake", hostname="bench", targets=[target],
                         host={"bench": True}, started_at=utcnow(),
                         last_seen_at=utcnow() + timedelta(hours=1)))

    def model_row(self, model_id: str) -> Model:
        with self.db.session() as s:
            model = s.get(Model, model_id)
            assert model is not None
            s.expunge(model)
            return model

    def insert_engine(self, model: Model | None, target: dict[str, Any],
                      profile: list[dict[str, Any]], artifact: Path | None = None,
                      options: dict[str, Any] | None = None, **fields: Any) -> Engine:
        """An engine row as ``service.jobs.succeed`` records it (same key and hashes)."""
        options = normalize_options(target["backend"], target["device"], options or {})
        model_hash = model.model_hash if model else fields.pop("model_hash")
        t = Target(target["backend"], target["device"], target["arch"], target["toolchain_id"])
        size = artifact.stat().st_size if artifact else 0
        engine = Engine(
            cache_key=cache_key(model_hash, t, options, profile), model_hash=model_hash,
            graph_hash=model.graph_hash if model else fields.pop("graph_hash", model_hash),
            weights_hash=model.weights_hash if model else fields.pop("weights_hash", model_hash),
            backend=t.backend, device=t.device, arch=t.arch, toolchain_id=t.toolchain_id,
            toolchain=target.get("toolchain", {}), options=options, options_hash=digest(options),
            profile=profile, profile_hash=digest(profile_shapes(profile)),
            artifact_uri=artifact.as_uri() if artifact else "file:///nonexistent",
            sha256=fields.pop("sha256", "0" * 64), size=size, build_seconds=30.0,
            build_report={"artifact_suffix": ".pt2"}, validation={"passed": True},
            benchmark={}, last_used_at=utcnow(), **fields)
        with self.db.session() as s:
            s.add(engine)
        return engine

    def default_profile(self, model_id: str) -> list[dict[str, Any]]:
        return resolve_profile(self.model_row(model_id).signature["inputs"], None)

    # ---- a real worker --------------------------------------------------------------------

    def start_worker(self, inductor_cache: Path, timeout: float = 240,
                     warm_spare: bool = False) -> None:
        """A real worker; ``warm_spare``: it keeps the next build's child started while idle
        (KILN_WARM_SPARE=on)."""
        self.worker_log = self.workdir / "worker.log"
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache),
               "KILN_WARM_SPARE": "on" if warm_spare else "off"}
        with open(self.worker_log, "ab") as out:
            self.worker = subprocess.Popen([PY, "-m", "workers", "--name", "bench",
                                            "--backends", "aoti"], cwd=ROOT, env=env,
                                           stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise BenchError(f"worker exited ({self.worker.returncode}):\n"
                                 f"{tail(self.worker_log)}")
            with self.db.session() as s:
                if live_workers(s, self.settings.worker_ttl_s):
                    return
            time.sleep(0.3)
        raise BenchError(f"worker did not register:\n{tail(self.worker_log)}")


@contextlib.contextmanager
def kiln_stack(run: Run, name: str, database: str = "postgres",
               workers: int | None = None) -> Iterator[KilnStack]:
    """Kiln on a throwaway PostgreSQL database (``database="sqlite"``: the embedded default),
    Redis broker, gunicorn with ``run.workers`` sync workers; removed afterwards."""
    workdir = run.work / name
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if database == "postgres":
            db_url = stack.enter_context(throwaway_database())
        elif database == "sqlite":
            db_url = f"sqlite:///{workdir / 'kiln' / 'kiln.db'}"
        else:
            raise ValueError(database)
        settings = Settings.from_env(env={}, data_dir=workdir / "kiln", database_url=db_url,
                                     broker_url=REDIS_URL, sweep_interval_s=5)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database_url)
        env = settings.to_env()
        api = Gunicorn("service.app:create_app()", env, workers or run.workers,
                       workdir / "gunicorn.log")
        db = Database(settings.database_url)
        kiln = KilnStack(settings, env, api, db, workdir)
        log(f"{name}: starting Kiln (gunicorn -w {api.workers}, {database})")
        api.start()
        try:
            yield kiln
        finally:
            api.stop()
            stop_process(kiln.worker)
            db.dispose()
            shutil.rmtree(settings.data_dir, ignore_errors=True)


def ensure_programs(run: Run, names: list[str]) -> dict[str, Path]:
    """Export the named programs once per run (in a child process: torch stays out of here)."""
    have: dict[str, Path] = run.shared.setdefault("programs", {})
    missing = [n for n in names if n not in have]
    if missing:
        out = run.work / "programs"
        log(f"exporting programs: {', '.join(missing)}")
        proc = subprocess.run([PY, "-m", "bench.programs", str(out), *missing], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise BenchError(f"exporting {missing} failed:\n{proc.stderr[-3000:]}")
        for name in missing:
            have[name] = out / f"{name}.pt2"
    return {n: have[n] for n in names}


def python_env_summary() -> dict[str, str]:
    return {"python": sys.version.split()[0], "executable": PY}
