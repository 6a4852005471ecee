"""The build sandbox, tried as an attacker would: hostile child scripts run through the real
runner (``workers.sandbox.run_child``, bubblewrap) and the real build task
(``workers.tasks.run_build``), with a canary planted outside the work dir that must never
appear, and a database that must never become a downloadable engine. One real AOTInductor
build runs through the sandbox too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from service import jobs, worker_registry
from service.cache import CacheRequest, Target
from service.db import upgrade
from service.models import Engine, Job
from service.services import Services
from service.uploads import save_upload
from tests.conftest import ROOT, make_settings
from workers import tasks
from workers.sandbox import Limits, LogTail, run_child, sandbox_mode

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
SECRET = "canary-secret-db-password-0123456789"

# Runs inside the sandbox; prints one REPORT line of what it could see and do.
PROBE = textwrap.dedent('''
    import json, os, socket, sys
    worker_pid, data_dir, store_dir, root, canary = sys.argv[1:6]
    seen = {"uid": os.getuid(), "pid1": open("/proc/1/comm").read().strip(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "env_secret": any("canary-secret" in v for v in os.environ.values()),
            "env_keys": sorted(os.environ)}
    def attempt(name, fn):
        try:
            seen[name] = ("ok", repr(fn())[:200])
        except Exception as exc:
            seen[name] = ("refused", type(exc).__name__)
    attempt("worker_environ", lambda: open(f"/proc/{worker_pid}/environ", "rb").read())
    attempt("worker_proc", lambda: os.listdir(f"/proc/{worker_pid}"))
    attempt("data_listing", lambda: [p for p in os.listdir(data_dir) if p != "scratch"])
    attempt("database", lambda: open(os.path.join(data_dir, "kiln.db"), "rb").read())
    attempt("store_listing", lambda: os.listdir(store_dir))
    for i, where in enumerate([data_dir, store_dir, root, "/usr", "/etc", os.path.dirname(
            os.path.dirname(data_dir))]):
        attempt(f"write{i}", lambda w=where: open(os.path.join(w, canary), "w").write("x"))
    attempt("write_tmp", lambda: open(os.path.join("/tmp", canary), "w").write("x"))
    for port in (5432, 6379):
        def connect(port=port):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.close()
        attempt(f"connect{port}", connect)
    attempt("hostname_resolve", lambda: socket.getaddrinfo("example.com", 80))
    attempt("workdir_write", lambda: open("mine.txt", "w").write("fine"))
    print("REPORT " + json.dumps(seen), flush=True)
''')


def _run(workdir: Path, source: str, *args: str, limits: Limits | None = None,
         hidden: tuple[Path, ...] = ()) -> tuple[Any, LogTail]:
    tail = LogTail()
    outcome = run_child(workdir, tail, limits or Limits(timeout_s=120, memory_mb=2048),
                        lambda: True, hidden=hidden,
                        argv=[sys.executable, "-c", source, *args])
    return outcome, tail


def _report(tail: LogTail) -> dict[str, Any]:
    line = next(x for x in tail.text().splitlines() if x.startswith("REPORT "))
    seen = json.loads(line.removeprefix("REPORT "))
    return {k: tuple(v) if isinstance(v, list) and len(v) == 2 and v[0] in ("ok", "refused")
            else v for k, v in seen.items()}


@pytest.fixture(params=["tmp", "inside_project"])
def data_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A data dir with a database and a store in it, in /tmp or (like the default ./.kiln)
    under the project directory the sandbox binds read-only."""
    base = tmp_path if request.param == "tmp" else ROOT / f".kiln-sandbox-{uuid.uuid4().hex}"
    path = base / "kiln"
    (path / "artifacts" / "models").mkdir(parents=True)
    (path / "kiln.db").write_text(SECRET)
    (path / "artifacts" / "models" / "other-tenant.pt2").write_text(SECRET)
    yield path
    if request.param != "tmp":
        shutil.rmtree(base)


def test_hostile_child_sees_nothing_of_the_worker_and_writes_nowhere(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sandbox_mode() == "bubblewrap"
    monkeypatch.setenv("KILN_DATABASE_URL", f"postgresql://kiln:{SECRET}@127.0.0.1/kiln")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    workdir = data_dir / "scratch" / "job-1"
    workdir.mkdir(parents=True)
    store = data_dir / "artifacts"
    canary = f"canary-{uuid.uuid4().hex}"
    outcome, tail = _run(workdir, PROBE, str(os.getpid()), str(data_dir), str(store),
                         str(ROOT), canary, hidden=(data_dir, store))
    assert outcome.reason is None, (outcome, tail.text())
    seen = _report(tail)
    # Its own user and pid namespace: an unprivileged uid, bwrap as pid 1, nothing else.
    assert seen["uid"] == 65534
    assert seen["pid1"] == "bwrap" and max(seen["pids"]) < 10
    # The worker's environment and /proc are out of reach.
    assert not seen["env_secret"]
    assert not {"KILN_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"} & set(seen["env_keys"])
    assert seen["worker_environ"][0] == "refused" and seen["worker_proc"][0] == "refused"
    # The data dir, the database and the store are not there.
    assert seen["data_listing"] in (("ok", "[]"), ("refused", "FileNotFoundError"))
    assert seen["database"][0] == "refused"
    assert seen["store_listing"] in (("ok", "[]"), ("refused", "FileNotFoundError"))
    # Writes to the system, the toolchain and the project fail. Paths on the way to the work
    # dir (the data dir, its parent) exist only as empty directories on the sandbox's own
    # tmpfs: a write there may land in that tmpfs, and the canary check below shows it never
    # reaches the host.
    for i in (2, 3, 4):
        assert seen[f"write{i}"][0] == "refused", (i, seen)
    assert seen["write_tmp"][0] == "ok"  # its private tmpfs
    assert seen["workdir_write"][0] == "ok" and (workdir / "mine.txt").read_text() == "fine"
    # No network: the PostgreSQL and Redis ports on the host's loopback are unreachable.
    assert seen["connect5432"][0] == "refused" and seen["connect6379"][0] == "refused"
    assert seen["hostname_resolve"][0] == "refused"
    # And the canary appears nowhere on the host.
    for where in (data_dir, store, ROOT, Path("/usr"), Path("/etc"), data_dir.parent.parent,
                  Path("/tmp")):  # noqa: S108  (the host /tmp, checked for the canary)
        assert not (where / canary).exists(), where
    assert (data_dir / "kiln.db").read_text() == SECRET


def test_a_database_file_under_a_bound_root_reads_empty(tmp_path: Path) -> None:
    """An SQLite database kept in the project directory (bound read-only for Kiln's code)."""
    db = ROOT / f".kiln-sandbox-{uuid.uuid4().hex}.db"
    db.write_text(SECRET)
    try:
        source = textwrap.dedent('''
            import json, sys
            try:
                seen = open(sys.argv[1]).read()
            except OSError as exc:
                seen = type(exc).__name__
            print("REPORT " + json.dumps({"db": seen}))
        ''')
        outcome, tail = _run(tmp_path, source, str(db), hidden=(db,))
        # Covered by a device node on a nodev mount: opening it is refused.
        assert _report(tail)["db"] in ("", "PermissionError")
    finally:
        db.unlink()


def test_the_host_services_the_probe_could_not_reach_are_really_there() -> None:
    """Control for the network check above: from the worker, the ports answer."""
    for port in (5432, 6379):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


FORK_BOMB = textwrap.dedent('''
    import os, time
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
''')


def test_fork_bomb_is_killed_and_leaves_no_process(tmp_path: Path) -> None:
    marker = f"fork-bomb-{uuid.uuid4().hex}"
    outcome, tail = _run(tmp_path, FORK_BOMB, marker,
                         limits=Limits(timeout_s=60, memory_mb=4096, processes=64))
    assert outcome.reason in ("processes", "signal", "exit"), outcome
    if os.getuid() != 0:  # RLIMIT_NPROC binds non-root workers; root relies on the sampler
        assert outcome.reason in ("exit", "processes")
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
    assert not left


def test_file_size_limit_holds(tmp_path: Path) -> None:
    source = textwrap.dedent('''
        import errno
        try:
            with open("big.bin", "wb") as f:
                for _ in range(64):
                    f.write(b"\\1" * 2**20)
            print("REPORT " + '{"wrote": "all"}')
        except OSError as exc:
            print("REPORT " + '{"error": %d}' % exc.errno)
    ''')
    outcome, tail = _run(tmp_path, source, limits=Limits(timeout_s=60, memory_mb=2048,
                                                         file_bytes=8 * 2**20))
    assert _report(tail) == {"error": 27}  # EFBIG
    assert (tmp_path / "big.bin").stat().st_size <= 8 * 2**20


def test_address_space_limit_holds(tmp_path: Path) -> None:
    source = textwrap.dedent('''
        try:
            block = bytearray(8 * 2**30)
            print("REPORT " + '{"allocated": true}')
        except MemoryError:
            print("REPORT " + '{"allocated": false}')
    ''')
    outcome, tail = _run(tmp_path, source, limits=Limits(
        timeout_s=60, memory_mb=2048, address_space_bytes=2 * 2**30))
    assert _report(tail) == {"allocated": False}


def test_a_flood_of_output_is_capped_and_the_child_killed(tmp_path: Path) -> None:
    source = "import sys\nchunk = b'x' * 2**20 + b'\\n'\nwhile True: sys.stdout.buffer.write(chunk)"
    before = psutil.Process().memory_info().rss
    outcome, tail = _run(tmp_path, source, limits=Limits(timeout_s=120, memory_mb=2048,
                                                         log_bytes=300 * 2**20))
    assert outcome.reason == "log_limit" and "log limit" in outcome.message
    assert len(tail.text()) <= tail.keep
    assert psutil.Process().memory_info().rss - before < 100 * 2**20


# ---- the build task, with hostile children -------------------------------------------------

TARGET = Target("aoti", "cpu", "x86_64-test", "torch=test")
ONNX_TARGET = Target("onnx", "cpu", "x86_64-test", "onnx=test")
PROFILE = [{"name": "x", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}]


@pytest.fixture
def kiln(tmp_path: Path) -> Iterator[Services]:
    settings = make_settings(tmp_path / "kiln")
    upgrade(settings.database_url)
    services = Services(settings)
    with services.db.session() as s:
        worker_registry.heartbeat(s, "w1", "host", [
            {**t.as_dict(), "toolchain": {}, "queue": worker_registry.queue_name(t)}
            for t in (TARGET, ONNX_TARGET)], {})
    yield services
    for spare in list(tasks._spares.values()):
        spare.discard()
    tasks._spares.clear()
    services.db.dispose()


def _submit(services: Services, program: Path, reuse: str = "exact", backend: str = "aoti",
            options: dict[str, Any] | None = None) -> str:
    with open(program, "rb") as f:
        model, _ = save_upload(services, "alice", f, program.name)
    request = CacheRequest(model_id=model.id, backend=backend, device="cpu", inputs=PROFILE,
                           reuse=reuse, options=options or {})
    job = jobs.submit(services, "alice", request).job
    assert job is not None
    return job.id


def _child_writing(result: dict[str, Any], setup: str = "") -> list[str]:
    """A child that runs ``setup`` in its work dir and then writes ``result`` as result.json."""
    source = textwrap.dedent(setup) + (
        "\nimport json\nopen('result.json', 'w').write(" + repr(json.dumps(result)) + ")\n")
    return [sys.executable, "-c", source]


GOOD = {"ok": True, "artifact": "engine.pt2", "timings": {"build_s": 1.5},
        "build_report": {"torch": "test"},
        "validation": {"passed": True, "shapes": {"opt": {"shapes": [[4, 3, 32, 32]],
                       "outputs": [{"output": 0, "passed": True, "max_abs": 0.0}],
                       "passed": True}}},
        "benchmark": {"shapes": {"opt": {"shapes": [[4, 3, 32, 32]], "engine_ms": 1.0,
                                         "eager_ms": 2.0, "speedup": 2.0,
                                         "slower_than_eager": False}}}}


def _outcome(services: Services, job_id: str) -> tuple[Job, list[Engine]]:
    with services.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        engines = list(s.query(Engine).all())
        for e in engines:
            s.expunge(e)
    return job, engines


def _stored_engines(services: Services) -> list[Path]:
    root = services.settings.data_dir / "artifacts" / "engines"
    return list(root.iterdir()) if root.exists() else []


def test_well_formed_result_is_stored_as_the_childs_report(
        kiln: Services, programs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the refusals below: the harness can succeed."""
    monkeypatch.setattr(tasks, "CHILD_ARGV", _child_writing(
        GOOD, "open('engine.pt2', 'wb').write(b'compiled engine bytes')"))
    job_id = _submit(kiln, programs["convnet"])
    assert tasks.run_build(kiln, job_id, "w1").startswith("succeeded")
    job, engines = _outcome(kiln, job_id)
    assert job.status == "succeeded" and len(engines) == 1
    import hashlib
    assert engines[0].sha256 == hashlib.sha256(b"compiled engine bytes").hexdigest()
    assert engines[0].validation["reported_by"] == "build child"
    assert engines[0].validation_status == "passed"
    assert "sandbox: bubblewrap" in job.log


SYMLINK_TO_DB = '''
import os
os.symlink({db!r}, "engine.pt2")
'''


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink_to_db", "directory",
                                  "sparse_10gb", "header_injection", "wrong_suffix",
                                  "nan_timing", "huge_timing", "negative_timing",
                                  "result_symlink", "result_huge"])
def test_hostile_results_are_refused_and_nothing_is_downloadable(
        case: str, kiln: Services, programs: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = kiln.settings.database_url.removeprefix("sqlite:///")
    result: dict[str, Any] = dict(GOOD)
    setup = "open('engine.pt2', 'wb').write(b'engine')"
    if case == "absolute":
        result["artifact"] = db
    elif case == "dotdot":
        result["artifact"] = "../../kiln.db"
    elif case == "symlink_to_db":
        setup = SYMLINK_TO_DB.format(db=db)
    elif case == "directory":
        setup = "import os\nos.mkdir('engine.pt2')"
    elif case == "sparse_10gb":
        monkeypatch.setattr(tasks, "MAX_ENGINE_BYTES", 2**30)
        setup = "import os\nf = open('engine.pt2', 'wb')\nos.ftruncate(f.fileno(), 10 * 10**9)"
    elif case == "header_injection":
        result["artifact"] = 'engine.pt2"\r\nX-Evil: 1'
    elif case == "wrong_suffix":
        setup = "open('engine.sh', 'wb').write(b'engine')"
        result["artifact"] = "engine.sh"
    elif case.endswith("_timing"):
        value = {"nan": float("nan"), "huge": 1e308, "negative": -1.0}[case.split("_")[0]]
        text = json.dumps({**result, "timings": {"build_s": value}})
        setup += f"\nopen('result.json', 'w').write({text!r})\nraise SystemExit(0)"
    elif case == "result_symlink":
        setup += f"\nimport os\nos.symlink({db!r}, 'result.json')\nraise SystemExit(0)"
    elif case == "result_huge":
        setup += ("\nimport json\nr = " + repr(result) + "\nr['build_report'] = "
                  "{'pad': 'x' * 8 * 2**20}\nopen('result.json', 'w').write(json.dumps(r))"
                  "\nraise SystemExit(0)")
    monkeypatch.setattr(tasks, "CHILD_ARGV", _child_writing(result, setup))
    job_id = _submit(kiln, programs["convnet"])
    said = tasks.run_build(kiln, job_id, "w1")
    job, engines = _outcome(kiln, job_id)
    assert job.status == "failed" and job.error_code == "bad_child_result", (said, job.log)
    assert job.error_message and "build child" in job.error_message
    assert engines == [] and _stored_engines(kiln) == []
    assert Path(db).exists()


def test_output_flood_fails_the_job_with_a_capped_log(
        kiln: Services, programs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "CHILD_ARGV", [sys.executable, "-c", (
        "import sys\nchunk = b'y' * 2**20 + b'\\n'\n"
        "for _ in range(300): sys.stdout.buffer.write(chunk)")])
    job_id = _submit(kiln, programs["convnet"])
    tasks.run_build(kiln, job_id, "w1")
    job, engines = _outcome(kiln, job_id)
    assert job.status == "failed" and job.error_code == "build_log_limit"
    assert job.error_message and "MiB of output" in job.error_message
    assert len(job.log) <= jobs.LOG_LIMIT and engines == []


def test_a_damaged_program_blob_is_refused_before_any_build(
        kiln: Services, programs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    started = tmp_path / "child-started"
    monkeypatch.setattr(tasks, "CHILD_ARGV", [sys.executable, "-c", "raise SystemExit(3)",
                                              str(started)])
    job_id = _submit(kiln, programs["convnet"])
    with kiln.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        from service.models import Model
        model = s.get(Model, job.model_id)
        assert model is not None
        blob = kiln.store.local_path(model.blob_uri)  # type: ignore[attr-defined]
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    tasks.run_build(kiln, job_id, "w1")
    job, engines = _outcome(kiln, job_id)
    assert job.status == "failed" and job.error_code == "program_blob_corrupt"
    assert job.error_message and "upload the program again" in job.error_message
    assert engines == []


def test_real_aoti_build_through_the_sandbox(kiln: Services, programs: dict[str, Path]
                                              ) -> None:
    job_id = _submit(kiln, programs["convnet"])
    said = tasks.run_build(kiln, job_id, "w1")
    job, engines = _outcome(kiln, job_id)
    assert job.status == "succeeded", (said, job.error_message, job.log[-3000:])
    assert "sandbox: bubblewrap" in job.log
    print(next(line for line in job.log.splitlines() if "child peak memory" in line),
          job.timings)
    engine = engines[0]
    assert engine.validation["passed"] is True and engine.validation_status == "passed"
    assert set(engine.validation["shapes"]) == {"min", "opt", "max", "random1", "random2"}
    path = kiln.store.local_path(engine.artifact_uri)  # type: ignore[attr-defined]
    import hashlib
    assert hashlib.sha256(path.read_bytes()).hexdigest() == engine.sha256
    # The engine loads and runs outside the sandbox.
    import torch
    runner = torch._inductor.aoti_load_package(str(path))
    out = runner(torch.randn(2, 3, 32, 32))
    assert out.shape[0] == 2


# ---- the worker refuses to build unsandboxed unless told ------------------------------------

def _worker_env(settings_dir: Path, **extra: str) -> dict[str, str]:
    settings = make_settings(settings_dir)
    upgrade(settings.database_url)
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", **extra}


def test_worker_without_bubblewrap_refuses_to_start(tmp_path: Path) -> None:
    import subprocess

    env = _worker_env(tmp_path / "kiln", PATH=str(tmp_path / "empty-bin"))
    out = subprocess.run([sys.executable, "-m", "workers", "--backends", "onnx"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "refusing to start" in out.stderr and "KILN_SANDBOX=off" in out.stderr


def test_worker_with_the_sandbox_off_warns_and_announces_it(tmp_path: Path) -> None:
    import subprocess

    from service.db import Database
    from service.models import Worker
    from tests.conftest import stop_process

    env = _worker_env(tmp_path / "kiln", PATH=str(tmp_path / "empty-bin"), KILN_SANDBOX="off")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--backends", "onnx"],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    db = Database(env["KILN_DATABASE_URL"])
    try:
        import time

        deadline = time.monotonic() + 240
        hosts: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not hosts:
            assert proc.poll() is None, log.read_text()
            with db.session() as s:
                hosts = [dict(w.host) for w in s.query(Worker).all()]
            time.sleep(0.5)
        assert hosts and hosts[0]["sandbox"] == "off"
        assert "WITHOUT the OS sandbox" in log.read_text()
    finally:
        stop_process(proc)
        db.dispose()


# ---- the warm spare ------------------------------------------------------------------------

def _overhead(timings: dict[str, float]) -> float:
    """Seconds of the child's life that were not loading, building or validating: starting
    the sandbox and the interpreter and importing torch and the toolchain."""
    return timings["child_s"] - sum(timings.get(k, 0.0)
                                    for k in ("load_s", "build_s", "validate_s"))


def _child_pid_ns(bwrap_pid: int) -> str:
    """The pid namespace of the interpreter bubblewrap started (bwrap itself is outside)."""
    inner = psutil.Process(bwrap_pid).children(recursive=True)[-1]
    return os.readlink(f"/proc/{inner.pid}/ns/pid")


@pytest.mark.parametrize("mode, cpu, cuda", [(None, False, True), ("auto", False, True),
                                             ("on", True, True), ("off", False, False)])
def test_warm_spare_by_default_for_cuda_builds_only(mode: str | None, cpu: bool, cuda: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if mode is None:
        monkeypatch.delenv("KILN_WARM_SPARE", raising=False)
    else:
        monkeypatch.setenv("KILN_WARM_SPARE", mode)
    assert (tasks.warm_spare_enabled("cpu"), tasks.warm_spare_enabled("cuda")) == (cpu, cuda)
    # During a CUDA build (cores to spare), after a CPU build (its compile needs them).
    assert (tasks.spare_during_build("cpu"), tasks.spare_during_build("cuda")) == (False, True)


def test_warm_spare_takes_the_start_up_off_the_build_and_is_replaced_fresh(
        kiln: Services, programs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    options = {"optimize": False}
    cold = _submit(kiln, programs["convnet"], backend="onnx", options=options)
    assert tasks.run_build(kiln, cold, "w1").startswith("succeeded")
    cold_job, _ = _outcome(kiln, cold)
    monkeypatch.setenv("KILN_WARM_SPARE", "on")
    tasks.prepare_spare(kiln, "cpu")
    spare = tasks._spares["cpu"]
    deadline = time.monotonic() + 120
    while "KILN-SPARE-READY" not in spare.tail.text() and time.monotonic() < deadline:
        assert spare.alive(), spare.tail.text()
        time.sleep(0.2)
    first_ns = _child_pid_ns(spare.popen.pid)
    first_dir = spare.workdir
    during_build: list[Any] = []  # the spare there is while the build's child runs
    supervise = tasks.finish_child

    def finish_and_look(child: Any, *args: Any, **kwargs: Any) -> Any:
        during_build.append(tasks._spares.get("cpu"))
        return supervise(child, *args, **kwargs)

    monkeypatch.setattr(tasks, "finish_child", finish_and_look)
    # As for a CUDA build (none here): the next spare starts when this build starts.
    monkeypatch.setattr(tasks, "spare_during_build", lambda device: True)
    warm = _submit(kiln, programs["convnet"], reuse="never", backend="onnx", options=options)
    assert tasks.run_build(kiln, warm, "w1").startswith("succeeded")
    warm_job, _ = _outcome(kiln, warm)
    assert "warm spare" in warm_job.log and "sandbox: bubblewrap" in warm_job.log
    print(f"child start-up overhead: cold {_overhead(cold_job.timings):.2f} s, "
          f"warm spare {_overhead(warm_job.timings):.2f} s")
    assert _overhead(warm_job.timings) < _overhead(cold_job.timings)
    # Discarded after its build and replaced by a fresh one: new work dir, new namespaces.
    assert not first_dir.exists()
    again = tasks._spares["cpu"]
    assert again.workdir != first_dir and again.alive()
    assert _child_pid_ns(again.popen.pid) != first_ns
    # Started while the build ran, not after it: back-to-back builds meet a warm spare too.
    assert during_build == [again]
