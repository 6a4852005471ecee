"""What every case needs: servers (gunicorn, nginx, a Kiln worker), throwaway databases, the
load generators (wrk, curl) driven as separate processes, memory sampling and profiles."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PY = sys.executable
BIN = Path(sys.executable).parent
MB = 1_000_000  # transfer rates are in MB/s with MB = 10^6 bytes

PG_SERVER = os.environ.get("KILN_BENCH_POSTGRES_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# A database number of its own, so the suite's build queue never meets a test run's worker.
REDIS_URL = os.environ.get("KILN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


class BenchError(RuntimeError):
    """A case could not measure what it set out to (a server did not start, a request failed)."""


# ---- the run: options, rows of the final table, raw numbers --------------------------------

@dataclass
class Row:
    case: str
    config: str
    metric: str
    kiln: float | None
    baseline: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None  # None: informational, no goal
    unit: str = ""
    note: str = ""

    def status(self) -> str:
        if self.met is None:
            return "info" if not self.note.startswith("ERROR") else "ERROR"
        return "met" if self.met else "MISS"


@dataclass
class Run:
    quick: bool
    workers: int
    duration_s: float
    profile: bool
    work: Path
    results_stem: Path  # bench/results/<timestamp>; profiles are written next to the JSON
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # programs exported once per run

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def artifact_path(self, suffix: str) -> Path:
        return self.results_stem.with_name(f"{self.results_stem.name}-{suffix}")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# A repeated sample further than this from the median of its repeats (relative, either way)
# is an outlier: flagged in the row's note, never the reported figure.
OUTLIER_RATIO = 1.5


def repeats(values: Sequence[float]) -> dict[str, Any]:
    """Median of repeated samples, their spread, and which of them are outliers."""
    mid = statistics.median(values)
    # A ratio to the median means nothing for a median at or below zero (an overhead that came
    # out negative: Kiln beat its baseline): nothing is set aside then.
    outliers = [v for v in values
                if mid > 0 and (v > mid * OUTLIER_RATIO or v < mid / OUTLIER_RATIO)]
    return {"median": mid, "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / abs(mid) if mid else 0.0,
            "values": list(values), "outliers": outliers}


def repeats_note(r: dict[str, Any], unit: str = "ms") -> str:
    """``median of 3 (spread 12%: 4.1-4.6 ms)``, plus the outliers it set aside."""
    note = (f"median of {r['n']} (spread {r['spread']:.0%}: {r['min']:.3g}-{r['max']:.3g} "
            f"{unit})")
    if r["outliers"]:
        note += (f"; outlier sample(s) set aside: "
                 f"{', '.join(f'{v:.3g}' for v in r['outliers'])} {unit}")
    return note


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen[bytes] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server for {url} exited with status {proc.returncode}")
        try:
            resp = requests.get(url, timeout=2)
            if resp.status_code < 500:
                return
            last = f"HTTP {resp.status_code}: {resp.text[:300]}"
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.2)
    raise BenchError(f"{url} did not answer within {timeout:.0f} s ({last})")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- PostgreSQL ------------------------------------------------------------------------------

@contextlib.contextmanager
def throwaway_database(prefix: str = "kiln_bench") -> Iterator[str]:
    """A new PostgreSQL database on PG_SERVER, dropped afterwards; yields its SQLAlchemy URL.

    The bench is shipped and run on its own; it does not import the test suite.
    """
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# ---- memory ----------------------------------------------------------------------------------

class RssSampler:
    """Samples the resident size of a set of processes (gunicorn's workers) in a thread."""

    def __init__(self, pids: Sequence[int], interval_s: float = 0.02) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.interval_s = interval_s
        self.base = {p.pid: self._rss(p) for p in self.procs}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _rss(p: psutil.Process) -> int:
        try:
            return p.memory_info().rss
        except psutil.Error:
            return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                self.peak[p.pid] = max(self.peak[p.pid], self._rss(p))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        """The largest growth of any one process over its own size before the transfer."""
        return max((self.peak[p] - self.base[p]) / 2**20 for p in self.base) if self.base else 0.0

    def report(self) -> dict[str, Any]:
        return {"base_mb": {p: round(v / 2**20, 1) for p, v in self.base.items()},
                "peak_mb": {p: round(v / 2**20, 1) for p, v in self.peak.items()},
                "growth_mb": round(self.growth_mb, 1)}


# ---- gunicorn --------------------------------------------------------------------------------

class Gunicorn:
    """``gunicorn -w N APP`` on a free loopback port, the way production runs Kiln's API."""

    def __init__(self, app: str, env: dict[str, str], workers: int, log_path: Path,
                 worker_class: str = "sync", extra: Sequence[str] = ()) -> None:
        self.app, self.env, self.workers = app, env, workers
        self.worker_class, self.extra = worker_class, list(extra)
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        # --no-control-socket: gunicorn 27 otherwise shares ~/.gunicorn/gunicorn.ctl with every
        # other gunicorn of this user (the tests', a dev server's); it changes no request path.
        return [str(BIN / "gunicorn"), "-w", str(self.workers), "-k", self.worker_class,
                "-b", f"127.0.0.1:{self.port}", "--no-control-socket", *self.extra, self.app]

    def start(self, health_path: str = "/healthz") -> Gunicorn:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env={**os.environ, **self.env},
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + health_path, timeout=90, proc=self.proc)
            deadline = time.monotonic() + 30
            while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
                time.sleep(0.1)
            # Every worker imports the app on boot: wait until each answers once.
            for _ in range(self.workers * 3):
                requests.get(self.url + health_path, timeout=10)
        except Exception as exc:
            self.stop()
            raise BenchError(f"gunicorn {self.app} did not start: {exc}\n"
                             f"{tail(self.log_path)}") from exc
        return self

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- nginx -----------------------------------------------------------------------------------

def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        raise BenchError("nginx is not installed (bench/setup.sh installs it)")
    return found


class Nginx:
    """nginx on loopback: ``/files/`` serves ``files_root``; ``/upload/NAME`` takes a PUT body
    into ``upload_root`` (the DAV module writes it to a temp file, then renames it)."""

    def __init__(self, workdir: Path, files_root: Path, upload_root: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files_root, self.upload_root = files_root, upload_root
        self.upload_root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        tmp = self.upload_root / ".tmp"
        tmp.mkdir(exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""
{user}
worker_processes auto;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    # Debian's packaged defaults for serving files.
    sendfile on;
    tcp_nopush on;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {tmp};
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        location /files/ {{ alias {self.files_root}/; }}
        location /upload/ {{
            alias {self.upload_root}/;
            dav_methods PUT;
            client_max_body_size 0;
        }}
        location = /ping {{ return 200 "ok"; }}
    }}
}}
"""

    def start(self) -> Nginx:
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen([nginx_binary(), "-p", str(self.dir), "-c", str(conf),
                                          "-e", str(self.dir / "error.log")],
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/ping", timeout=20, proc=self.proc)
        except BenchError as exc:
            self.stop()
            raise BenchError(f"{exc}\n{tail(self.dir / 'error.log')}") from exc
        return self

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)
        self.proc = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- load generators -------------------------------------------------------------------------

def wrk(url: str, connections: int, duration_s: float, *, method: str = "GET",
        body: bytes | None = None, content_type: str = "application/json",
        threads: int = 1, timeout_s: int = 10, api_key: str | None = None) -> dict[str, Any]:
    """Run wrk once (closed loop: each connection sends its next request when the last one is
    answered); returns requests/s, latency percentiles in ms and error counts."""
    with tempfile.TemporaryDirectory(prefix="kiln-wrk-") as d:
        out = Path(d) / "result.json"
        env = {**os.environ, "WRK_METHOD": method, "WRK_OUT": str(out),
               "WRK_CONTENT_TYPE": content_type, "WRK_AUTH": f"Bearer {api_key}" if api_key else ""}
        if body is not None:
            (Path(d) / "body").write_bytes(body)
            env["WRK_BODY_FILE"] = str(Path(d) / "body")
        cmd = ["wrk", "-t", str(max(1, min(threads, connections))), "-c", str(connections),
               "-d", f"{max(1, round(duration_s))}s", "--timeout", f"{timeout_s}s",
               "-s", str(BENCH / "wrk_report.lua"), url]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=duration_s + timeout_s + 30)
        if proc.returncode != 0 or not out.exists():
            raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}"
                             f"{proc.stdout[-2000:]}")
        raw = json.loads(out.read_text())
    lat = raw["latency_us"]
    seconds = raw["duration_us"] / 1e6
    errors = raw["errors"]
    return {
        "connections": connections, "duration_s": round(seconds, 3),
        "requests": raw["requests"], "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000, "p99_ms": lat["p99"] / 1000,
        "max_ms": lat["max"] / 1000, "mean_ms": lat["mean"] / 1000,
        "errors": errors, "error_count": sum(errors.values()),
    }


def curl(args: Sequence[str], timeout_s: float = 600) -> dict[str, Any]:
    """Run curl once with ``-w %{json}``: its own transfer timings and status."""
    cmd = ["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{json}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise BenchError(f"curl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


# ---- profiles --------------------------------------------------------------------------------

def py_spy_available() -> bool:
    return (BIN / "py-spy").exists()


def profile_gunicorn(master_pid: int, seconds: float, out: Path
                     ) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on gunicorn's master and its workers; call ``.wait()`` on the
    returned process (collapsed stacks, loadable in speedscope or flamegraph.pl)."""
    cmd = [str(BIN / "py-spy"), "record", "--pid", str(master_pid), "--subprocesses",
           "--duration", str(max(1, int(seconds))), "--rate", "200", "--format", "raw",
           "--output", str(out), "--nonblocking"]
    with open(out.with_suffix(".log"), "ab") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


# Where a sample's innermost frame is, by file: the buckets a profile summary reports.
PROFILE_BUCKETS = (
    # On a saturated machine a process waiting for its turn on a CPU is sampled where it
    # stands: mostly inside libpq calls (send, wait for the answer, fetch).
    ("PostgreSQL round trips (psycopg)", ("psycopg/", "psycopg_binary")),
    ("SQLAlchemy", ("sqlalchemy/",)),
    ("socket write to client", ("gunicorn/util.py:write", "gunicorn/util.py:close")),
    ("gunicorn request body reader", ("gunicorn/http/unreader.py", "gunicorn/http/body.py")),
    ("gunicorn (other)", ("gunicorn/",)),
    ("werkzeug", ("werkzeug/",)),
    ("flask", ("flask/",)),
    ("spectree + pydantic", ("spectree/", "pydantic")),
    ("zip reading (zipfile)", ("zipfile",)),
    ("file copy (shutil)", ("shutil.py",)),
    ("json", ("json/",)),
    ("Kiln (service/)", ("service/",)),
)


def _frame(raw: str) -> tuple[str, str]:
    """``func (path/file.py:123)`` -> (``func``, ``path/file.py``)."""
    if " (" not in raw:
        return raw, ""
    func, _, where = raw.partition(" (")
    return func, where.rstrip(")").rsplit(":", 1)[0]


def summarize_profile(path: Path, top: int = 10) -> dict[str, Any]:
    """Shares of py-spy's samples (collapsed stacks, idle samples already left out by py-spy):
    by bucket of the innermost frame, by innermost function, and inclusive per Kiln function."""
    own: dict[str, int] = {}
    buckets: dict[str, int] = {}
    project: dict[str, int] = {}
    total = 0
    err = path.with_suffix(".log")  # py-spy's stderr: kept only when it says something
    if err.exists() and err.stat().st_size == 0:
        err.unlink()
    if not path.exists():
        return {"samples": 0, "buckets": [], "self": [], "kiln_inclusive": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        key = f"{func} ({file})"
        own[key] = own.get(key, 0) + count
        where = f"{file}:{func}"
        bucket = next((name for name, marks in PROFILE_BUCKETS
                       if any(where.startswith(m) or f"/{m}" in where or m in file
                              for m in marks)), "other")
        buckets[bucket] = buckets.get(bucket, 0) + count
        for name in {f"{fn} ({fl})" for fn, fl in frames if fl.startswith(("service/",
                                                                             "workers/"))}:
            project[name] = project.get(name, 0) + count

    def share(d: dict[str, int], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in
                sorted(d.items(), key=lambda kv: -kv[1])[:n]] if total else []

    return {"samples": total, "buckets": share(buckets, 12), "self": share(own, top),
            "kiln_inclusive": share(project, top)}


def profile_note(summary: dict[str, Any], n: int = 4) -> str:
    parts = [f"{k} {v:.0f}%" for k, v in summary.get("buckets", [])[:n]]
    return ("py-spy: " + ", ".join(parts)) if parts else ""


# ---- machine ---------------------------------------------------------------------------------

def _version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def machine() -> dict[str, Any]:
    import platform

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    pg = "unknown"
    with contextlib.suppress(Exception):
        from sqlalchemy import create_engine, text

        eng = create_engine(PG_SERVER)
        with eng.connect() as conn:
            pg = conn.execute(text("SHOW server_version")).scalar() or "unknown"
        eng.dispose()
    from importlib.metadata import version

    return {
        "cpus_logical": os.cpu_count(), "cpus_physical": psutil.cpu_count(logical=False),
        "cpu_model": cpu_model, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "os": _os_name(), "python": platform.python_version(),
        "torch": version("torch"), "postgres": pg,
        "redis": _redis_version(),
        "gunicorn": _version([str(BIN / "gunicorn"), "--version"]),
        "nginx": _version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
        "wrk": _version(["wrk", "--version"]), "curl": _version(["curl", "--version"]),
    }


def _redis_version() -> str:
    try:
        import redis

        return str(redis.Redis.from_url(REDIS_URL).info("server").get("redis_version"))
    except Exception:
        return "unknown"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return "unknown"


class Neighbours:
    """What else ran: every few seconds, the CPU use of processes that are not this suite's
    (PostgreSQL and Redis are listed apart: they are part of the measured stack)."""

    STACK = ("postgres", "redis-server")

    def __init__(self, interval_s: float = 3.0) -> None:
        self.interval_s = interval_s
        self.max_cpu: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._seen: dict[int, tuple[str, float]] = {}
        self.load: list[tuple[float, float]] = []
        self.series: list[tuple[float, float]] = []  # (time, CPU-seconds others used since)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.time()

    def _ours(self) -> set[int]:
        me = psutil.Process()
        try:
            return {me.pid, *(c.pid for c in me.children(recursive=True))}
        except psutil.Error:
            return {me.pid}

    def _sample(self) -> None:
        ours = self._ours()
        self.load.append((round(time.time() - self.started, 1), os.getloadavg()[0]))
        others = 0.0
        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
            try:
                if p.pid in ours:
                    continue
                cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:80]
                name = next((s for s in self.STACK if s in cmd or s == p.info["name"]), None)
                label = f"[stack] {name}" if name else cmd
                cpu_t = p.info["cpu_times"]
                used = (cpu_t.user + cpu_t.system) if cpu_t else 0.0
                prev = self._seen.get(p.pid)
                self._seen[p.pid] = (label, used)
                if prev is None and (p.info["create_time"] or 0) < self.started:
                    continue  # running before the suite: count from the next sample on
                delta = max(0.0, used - (prev[1] if prev else 0.0))
                if not name:
                    others += delta
                self.cpu_seconds[label] = self.cpu_seconds.get(label, 0.0) + delta
                pct = 100 * delta / self.interval_s
                self.max_cpu[label] = max(self.max_cpu.get(label, 0.0), pct)
            except psutil.Error:
                continue
        self.series.append((time.time(), others))

    def share(self, start: float, end: float) -> float:
        """The share of the machine's CPUs that other processes used between two times."""
        used = sum(d for t, d in self.series if start < t <= end + self.interval_s)
        return used / max(end - start, 1e-9) / (os.cpu_count() or 1)

    def _loop(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> Neighbours:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        busy = sorted(((k, round(v, 1)) for k, v in self.cpu_seconds.items() if v >= 1.0),
                      key=lambda kv: -kv[1])
        return {"cpu_seconds_by_other_process": busy[:15],
                "max_cpu_percent": {k: round(self.max_cpu[k]) for k, _ in busy[:15]},
                "load_avg_1m": self.load}
