"""Run the build child inside an operating-system sandbox, under limits, and say how it ended.

The child loads an untrusted program (and, after a name-injection or a compiler bug, may run
the attacker's code), so it is contained by the kernel, not by an environment filter:
bubblewrap gives it its own user, pid, network, IPC and UTS namespaces, a read-only view of
the system and the toolchain, a private ``/tmp``, and only its work directory writable; the
data directory, the artifact store, the database and every other process (the worker's
``/proc`` included) are not in its world. ``RLIMIT_*`` caps (CPU time, file size, processes,
core dumps, and address space for CPU builds) come on top of the worker's own limits: wall
time, resident memory of the whole tree, process count, log size, and PDEATHSIG.

The child is a fresh interpreter (not a fork: the worker's state, CUDA included, never
crosses) in its own session, so a kill of its group, or of bubblewrap, which is pid 1 of the
child's pid namespace, takes every compiler subprocess with it.

An operator may run builds unsandboxed with ``KILN_SANDBOX=off`` (a host without user
namespaces); the worker then warns loudly at start and on every build, and announces it.
"""

from __future__ import annotations

import glob
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("kiln.sandbox")

# Variables the child may see. Everything else (database and broker URLs, cloud keys, API
# keys) stays with the worker: the child loads an untrusted program.
_ALLOWED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "CC", "CXX", "LD_LIBRARY_PATH",
            "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_PATH", "PYTHONPATH", "VIRTUAL_ENV",
            "KILN_AOTI_CXX", "KILN_FAULT_INJECT")
_ALLOWED_PREFIXES = ("TORCH", "TORCHINDUCTOR_", "TRITON_", "NVIDIA_", "OMP_", "MKL_",
                     "KILN_TRT_", "OPENBLAS_", "ATEN_")
SANDBOX_SWITCH = "KILN_SANDBOX"  # "off" runs builds without the OS sandbox (warned, announced)
SANDBOX_UID = 65534  # the child's uid and gid inside its user namespace: nobody, no privileges
# Set in the child's environment when it runs in the sandbox: its parent is then the
# namespace's init (pid 1), which the orphan check in workers.child must not mistake for
# a dead worker.
IN_SANDBOX_ENV = "KILN_IN_SANDBOX"


class SandboxUnavailable(RuntimeError):
    """Bubblewrap is missing or cannot create namespaces here, and the switch is not off."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in _ALLOWED or k.startswith(_ALLOWED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def sandbox_mode(env: Mapping[str, str] | None = None) -> str:
    """``"bubblewrap"`` or ``"off"``; raises :class:`SandboxUnavailable` when it cannot run.

    The check runs ``bwrap`` for real (a kernel may forbid unprivileged user namespaces even
    when the binary is there).
    """
    env = os.environ if env is None else env
    switch = env.get(SANDBOX_SWITCH, "on").strip().lower()
    if switch == "off":
        return "off"
    if switch not in ("on", ""):
        raise SandboxUnavailable(f"{SANDBOX_SWITCH} must be 'on' or 'off', got {switch!r}")
    binary = bwrap_path()
    if binary is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed: builds run untrusted programs and need it "
            "(apt-get install bubblewrap), or set KILN_SANDBOX=off to build unsandboxed")
    probe = subprocess.run(
        [binary, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
         "--proc", "/proc", "--dev", "/dev", "--uid", str(SANDBOX_UID), "--", "true"],
        capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap cannot create its namespaces on this host: {probe.stderr.strip()}; "
            "allow unprivileged user namespaces, or set KILN_SANDBOX=off to build unsandboxed")
    return "bubblewrap"


def warn_unsandboxed(context: str) -> None:
    log.warning("!!! KILN_SANDBOX=off: %s runs the build child WITHOUT the OS sandbox. An "
                "uploaded program can read this worker's files, credentials and network. "
                "Use only on a host that holds nothing else. !!!", context)


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_mb: int
    # RLIMIT_CPU per process: wall time times the cores it may use, so only a runaway trips it.
    cpu_s: int = 0
    # RLIMIT_FSIZE: no file the child writes (engine, log, scratch) may grow past this.
    file_bytes: int = 16 * 1024**3
    # Processes (threads count for RLIMIT_NPROC): torch starts a thread per core and a
    # compile-worker pool; a fork bomb needs far more.
    processes: int = 4096
    # The worker kills the child past this many bytes of output (never held whole).
    log_bytes: int = 64 * 1024**2
    # RLIMIT_AS, for CPU builds only: CUDA reserves far more address space than it uses, so
    # a GPU build is bounded by the resident-memory sampler alone. None: no cap.
    address_space_bytes: int | None = None

    def rlimits(self) -> list[tuple[int, int]]:
        cpu = self.cpu_s or int(self.timeout_s * (os.cpu_count() or 1)) + 60
        caps = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, self.file_bytes),
                (resource.RLIMIT_NPROC, self.processes), (resource.RLIMIT_CORE, 0)]
        if self.address_space_bytes:
            caps.append((resource.RLIMIT_AS, self.address_space_bytes))
        return caps


def cpu_address_space_cap(memory_mb: int) -> int:
    """RLIMIT_AS for a CPU build: the memory limit plus room for what torch maps but never
    touches (measured: the example conv net's AOTInductor build and validation peaked at
    1.1 GiB of address space in one process, 0.9 GiB resident for the tree, on 2 cores;
    thread stacks and the compile-worker pool grow with the core count). It stops a single
    huge allocation at once; the resident-memory sampler bounds the tree."""
    return (memory_mb + 8 * 1024 + 256 * (os.cpu_count() or 1)) * 2**20


def _toolchain_roots() -> list[Path]:
    """Directories the child reads its interpreter, packages and Kiln's own code from."""
    roots = {Path(sys.base_prefix), Path(sys.prefix), Path(__file__).resolve().parent.parent}
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).is_absolute() and Path(entry).exists():
            roots.add(Path(entry).resolve())
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name) and Path(os.environ[name]).is_dir():
            roots.add(Path(os.environ[name]).resolve())
    for name in ("CC", "CXX", "KILN_AOTI_CXX"):
        found = shutil.which(os.environ.get(name, "")) if os.environ.get(name) else None
        if found:
            roots.add(Path(found).resolve().parent)
    # Nested roots are covered by their parent; /usr is bound as the system anyway.
    ordered = sorted(r for r in roots if r != Path("/") and not _under(r, Path("/usr")))
    return [r for r in ordered if not any(p != r and _under(r, p) for p in ordered)]


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# Files of /etc the toolchain reads; the rest of /etc (host config, keys) stays out.
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "passwd", "group",
        "nsswitch.conf", "localtime", "os-release", "gcc", "fonts")


def bwrap_args(workdir: Path, hidden: Sequence[Path] = (), gpu: bool | None = None,
               readonly: Sequence[Path] = ()) -> list[str]:
    """The whole sandbox, as bubblewrap's argument list. Later mounts cover earlier ones.
    ``readonly``: directories the worker made that the child may read at their own paths, even
    inside a hidden one (the Inductor seed's precompiled headers, under the data dir)."""
    binary = bwrap_path()
    assert binary is not None
    args = [
        binary,
        # New user, pid, network, IPC, UTS and cgroup namespaces: no network (only a
        # loopback of its own), no other process visible, no privileges on the host.
        "--unshare-all",
        # A fixed unprivileged identity inside: nothing the child creates is root-owned.
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--hostname", "kiln-build",
        # bwrap (pid 1 of the namespace) dies with the worker, taking the whole tree.
        "--die-with-parent",
        # Its own session: no terminal to push keystrokes into (TIOCSTI).
        "--new-session",
        # The system's programs and libraries (the C++ compiler for AOTInductor, libc,
        # libcuda on GPU hosts), read-only.
        "--ro-bind", "/usr", "/usr",
    ]
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        # Merged-/usr hosts make these symlinks into /usr; others have real directories.
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in _ETC:
        # Only what the loader, the compiler and getpwuid need; not the host's config.
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    args += [
        # Private, empty, writable scratch: compiler temporaries and caches die with the
        # build (a cache shared between tenants' builds could be poisoned by one of them).
        # Mounted before the toolchain, so a toolchain that lives under /tmp stays visible.
        "--tmpfs", "/tmp",  # noqa: S108  (the sandbox's own tmpfs, not the host's /tmp)
    ]
    for root in _toolchain_roots():
        # The interpreter, the venv's site-packages (torch, the backends) and Kiln's own
        # package, read-only.
        args += ["--ro-bind", str(root), str(root)]
    args += [
        # A procfs of the new pid namespace: only the sandbox's own processes, never the
        # worker's /proc/<pid>/environ.
        "--proc", "/proc",
        # A minimal /dev (null, zero, random, urandom, shm, pts), no host devices.
        "--dev", "/dev",
    ]
    if gpu is None:
        gpu = bool(glob.glob("/dev/nvidia*"))
    if gpu:
        for node in sorted(glob.glob("/dev/nvidia*")):
            # The GPU's device nodes (nvidiactl, nvidia-uvm, nvidia<N>, caps): CUDA opens them.
            args += ["--dev-bind", node, node]
        # CUDA reads the PCI topology and NUMA nodes from sysfs; read-only.
        args += ["--ro-bind", "/sys", "/sys"]
    for path in sorted(set(hidden)):
        if any(p != path and _under(path, p) for p in hidden):
            continue  # inside another hidden path: already covered
        # The data directory (database, programs, engines) and a local artifact store may
        # lie under a bound root (the default data dir is ./.kiln in the project): cover
        # them with an empty tmpfs. Outside every bound root they do not exist in here.
        if not any(_under(path, r) for r in [*_toolchain_roots(), Path("/usr")]):
            continue
        if path.is_dir():
            args += ["--tmpfs", str(path)]
        elif path.exists():  # a file (an SQLite database elsewhere): an empty one over it
            args += ["--ro-bind", "/dev/null", str(path)]
    for path in readonly:
        args += ["--ro-bind", str(path), str(path)]
    args += [
        # The work dir, at its own path (so a process listing names the job): the one
        # writable place on disk, holding the program, request.json and what the child writes.
        "--bind", str(workdir), str(workdir),
        # bwrap's root is a tmpfs holding the mount points made above (/etc, /work, ...):
        # read-only, so nothing can be planted there either.
        "--remount-ro", "/",
        "--chdir", str(workdir),
        "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",  # noqa: S108  (as above)
        "--setenv", IN_SANDBOX_ENV, "1",
        "--",
    ]
    return args


@dataclass
class Outcome:
    returncode: int | None
    # None, "timeout", "memory", "cancelled", "signal", "exit", "log_limit", "processes"
    reason: str | None
    message: str
    peak_rss_mb: float
    # The largest address space of one process in the tree: what RLIMIT_AS must allow.
    peak_vm_mb: float = 0.0


@dataclass
class LogTail:
    """The child's output as it streams: the last ``keep`` bytes, the byte count, the phase.

    Read from a pipe in a thread, so the worker never holds or re-reads more than ``keep``
    bytes however much the child prints.
    """

    keep: int = 1_000_000
    total: int = 0
    phase: str | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _partial: bytes = b""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, chunk: bytes, phase_prefix: bytes) -> None:
        with self._lock:
            self.total += len(chunk)
            self._buf += chunk
            if len(self._buf) > self.keep:
                del self._buf[:len(self._buf) - self.keep]
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()[-4096:]
            for line in lines:
                if line.startswith(phase_prefix):
                    self.phase = line[len(phase_prefix):].strip().decode(errors="replace")[:32]

    def write(self, text: str) -> None:
        self.feed(text.encode(), b"\0")

    def text(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _tree_memory(tree: list[psutil.Process]) -> tuple[int, int]:
    """(resident bytes of the whole tree, largest address space of one process)."""
    total = vm = 0
    for p in tree:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        total += info.rss
        vm = max(vm, info.vms)
    return total, vm


def _kill_group(popen: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.wait()


def _pump(stream: object, tail: LogTail, phase_prefix: bytes) -> None:
    read = stream.read1  # type: ignore[attr-defined]
    while chunk := read(1 << 16):
        tail.feed(chunk, phase_prefix)


@dataclass
class Child:
    """A started build child: its process (bubblewrap, or the interpreter when the sandbox is
    off), its work dir, and the output it has printed so far."""

    popen: subprocess.Popen[bytes]
    workdir: Path
    tail: LogTail
    reader: threading.Thread
    device: str = ""  # for a spare: the device its rlimits were chosen for

    def alive(self) -> bool:
        return self.popen.poll() is None

    def close(self) -> None:
        self.reader.join(timeout=10)
        for stream in (self.popen.stdout, self.popen.stdin):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def discard(self) -> None:
        _kill_group(self.popen)
        self.close()


def spawn_child(workdir: Path, limits: Limits, env: Mapping[str, str] | None = None,
                hidden: Sequence[Path] = (), sandbox: str = "bubblewrap",
                argv: Sequence[str] | None = None, phase_prefix: str = "KILN-PHASE ",
                spare: bool = False, tail: LogTail | None = None,
                readonly: Sequence[Path] = ()) -> Child:
    """Start ``python -m workers.child WORKDIR`` (or ``argv``) in the sandbox.

    ``hidden`` are paths the child must not see even where they lie under a bound root;
    ``readonly`` ones it may read (see :func:`bwrap_args`). A
    ``spare`` child warms up and then waits on its stdin for :func:`finish_child`'s go.
    """
    command = list(argv or [sys.executable, "-m", "workers.child", str(workdir),
                            *(["--spare"] if spare else [])])
    caps = limits.rlimits()
    if sandbox == "off":
        warn_unsandboxed(f"build in {workdir.name}")
    else:
        command = [*bwrap_args(workdir, hidden, readonly=readonly), *command]

    def apply_rlimits() -> None:  # in the forked process, before exec: bwrap inherits them
        for which, value in caps:
            resource.setrlimit(which, (value, value))

    popen = subprocess.Popen(command, cwd=workdir,
                             stdin=subprocess.PIPE if spare else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=child_env({**(env or {}),
                                            **({IN_SANDBOX_ENV: "1"} if sandbox != "off"
                                               else {})}),
                             start_new_session=True, preexec_fn=apply_rlimits)
    tail = tail if tail is not None else LogTail()
    reader = threading.Thread(target=_pump, args=(popen.stdout, tail, phase_prefix.encode()),
                              daemon=True)
    reader.start()
    return Child(popen, workdir, tail, reader)


def finish_child(child: Child, limits: Limits, on_tick: Callable[[], bool],
                 tick_s: float = 2.0) -> Outcome:
    """Supervise ``child`` to its end under ``limits``; a spare is told to start first, so
    its time limit starts now, not when it was spawned."""
    try:
        if child.popen.stdin is not None:
            try:
                child.popen.stdin.write(b"go\n")
                child.popen.stdin.close()
            except BrokenPipeError:
                pass  # it died while idle: supervision reports how
        return _supervise(child.popen, child.tail, limits, on_tick, tick_s)
    finally:
        child.close()


def run_child(workdir: Path, tail: LogTail, limits: Limits, on_tick: Callable[[], bool],
              tick_s: float = 2.0, env: Mapping[str, str] | None = None,
              hidden: Sequence[Path] = (), sandbox: str = "bubblewrap",
              argv: Sequence[str] | None = None, phase_prefix: str = "KILN-PHASE ",
              readonly: Sequence[Path] = ()) -> Outcome:
    """Start a build child and supervise it to its end; ``on_tick`` False cancels it."""
    child = spawn_child(workdir, limits, env, hidden, sandbox, argv, phase_prefix, tail=tail,
                        readonly=readonly)
    return finish_child(child, limits, on_tick, tick_s)


def _supervise(popen: subprocess.Popen[bytes], tail: LogTail, limits: Limits,
               on_tick: Callable[[], bool], tick_s: float) -> Outcome:
    proc = psutil.Process(popen.pid)
    start = last_tick = time.monotonic()
    peak = peak_vm = 0
    limit = limits.memory_mb * 2**20

    def ended(code: int | None, reason: str | None, message: str) -> Outcome:
        return Outcome(code, reason, message, peak / 2**20, peak_vm / 2**20)

    def killed(reason: str, message: str) -> Outcome:
        _kill_group(popen)
        return ended(popen.returncode, reason, message)

    while popen.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        if tail.total > limits.log_bytes:
            return killed("log_limit", f"build printed over {limits.log_bytes // 2**20} MiB "
                          "of output, the log limit; killed")
        tree = _tree(proc)
        if len(tree) > limits.processes:
            return killed("processes", f"build started {len(tree)} processes, over the "
                          f"limit of {limits.processes}; killed")
        rss, vm = _tree_memory(tree)
        peak, peak_vm = max(peak, rss), max(peak_vm, vm)
        if rss > limit:
            return killed("memory", f"build used {rss / 2**20:.0f} MB, over the limit of "
                          f"{limits.memory_mb} MB; killed")
        if now - start > limits.timeout_s:
            return killed("timeout", f"build ran past its time limit of "
                          f"{limits.timeout_s:.0f} s; killed")
        if now - last_tick >= tick_s:
            last_tick = now
            if not on_tick():
                return killed("cancelled", "job cancelled; build killed")
    code = popen.returncode
    # The child may have exited while its compiler subprocesses linger: reap the group.
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if tail.total > limits.log_bytes:
        return ended(code, "log_limit", f"build printed over {limits.log_bytes // 2**20} "
                     "MiB of output, the log limit; killed")
    if code < 0 or code > 128 and code - 128 in _SIGNALS:
        # Without the sandbox the child's death is a negative code; bwrap reports a killed
        # child as 128 + the signal number.
        name = signal.Signals(-code if code < 0 else code - 128).name
        detail = {"SIGSEGV": " (segmentation fault)", "SIGXCPU": " (CPU time limit)",
                  "SIGXFSZ": " (file size limit)"}.get(name, "")
        return ended(code, "signal", f"build process crashed: killed by {name}{detail}")
    if code != 0:
        return ended(code, "exit", f"build process exited with status {code}")
    return ended(0, None, "")


_SIGNALS = {int(s) for s in signal.Signals}
