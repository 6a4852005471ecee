"""Run the build child under a time limit and a memory limit, and say how it ended.

The child gets a fresh interpreter (not a fork: the worker's state, CUDA included, never
crosses) in its own process group, so a kill takes every compiler subprocess with it. Memory is
the resident size of the whole process tree, sampled; RLIMIT_AS would break CUDA, which
reserves far more address space than it uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

# Variables the child may see. Everything else (database and broker URLs, cloud keys, API
# keys) stays with the worker: the child loads an untrusted program.
_ALLOWED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "CC", "CXX", "LD_LIBRARY_PATH",
            "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_PATH", "PYTHONPATH", "VIRTUAL_ENV",
            "KILN_AOTI_CXX", "KILN_FAULT_INJECT")
_ALLOWED_PREFIXES = ("TORCH", "TORCHINDUCTOR_", "TRITON_", "NVIDIA_", "OMP_", "MKL_",
                     "KILN_TRT_", "OPENBLAS_", "ATEN_")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in _ALLOWED or k.startswith(_ALLOWED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Outcome:
    returncode: int | None
    reason: str | None  # None, "timeout", "memory", "cancelled", "signal", "exit"
    message: str
    peak_rss_mb: float


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _kill_group(popen: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.wait()


def run_child(workdir: Path, log_path: Path, timeout_s: float, memory_mb: int,
              on_tick: Callable[[], bool], tick_s: float = 2.0,
              env: Mapping[str, str] | None = None) -> Outcome:
    """Run ``python -m workers.child WORKDIR``; ``on_tick`` returning False cancels it."""
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "workers.child", str(workdir)], cwd=workdir,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=child_env(env), start_new_session=True)
    proc = psutil.Process(popen.pid)
    start = last_tick = time.monotonic()
    peak = 0
    limit = memory_mb * 2**20
    while popen.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        rss = _tree_rss(proc)
        peak = max(peak, rss)
        if rss > limit:
            _kill_group(popen)
            return Outcome(popen.returncode, "memory", f"build used {rss / 2**20:.0f} MB, over "
                           f"the limit of {memory_mb} MB; killed", peak / 2**20)
        if now - start > timeout_s:
            _kill_group(popen)
            return Outcome(popen.returncode, "timeout",
                           f"build ran past its time limit of {timeout_s:.0f} s; killed",
                           peak / 2**20)
        if now - last_tick >= tick_s:
            last_tick = now
            if not on_tick():
                _kill_group(popen)
                return Outcome(popen.returncode, "cancelled", "job cancelled; build killed",
                               peak / 2**20)
    code = popen.returncode
    # The child may have exited while its compiler subprocesses linger: reap the group.
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if code < 0:
        name = signal.Signals(-code).name
        return Outcome(code, "signal", f"build process crashed: killed by {name}"
                       f"{' (segmentation fault)' if name == 'SIGSEGV' else ''}", peak / 2**20)
    if code != 0:
        return Outcome(code, "exit", f"build process exited with status {code}", peak / 2**20)
    return Outcome(0, None, "", peak / 2**20)
