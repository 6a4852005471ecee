"""``kiln serve``'s worker, kept alive: reaped when it dies, its jobs failed over, restarted.

A worker killed mid-build (the OOM killer sends SIGKILL) cannot say so itself. The process
that started it can: it reaps the exit status at once (no zombie), requeues the dead worker's
jobs with the reason on them (``housekeeping.fail_over_dead_worker``), and starts a new worker
after a back-off that doubles while restarts keep failing (1 s up to 60 s) and resets once a
worker has stayed up for a minute.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from service.housekeeping import fail_over_dead_worker
from service.services import Services

log = logging.getLogger("kiln.serve")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the out-of-memory killer sends this)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {returncode}"


class WorkerSupervisor:
    def __init__(self, services: Services, start: Callable[[], subprocess.Popen[bytes]],
                 min_backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 stable_s: float = 60.0) -> None:
        self.services = services
        self._start = start
        self.min_backoff_s, self.max_backoff_s, self.stable_s = (min_backoff_s, max_backoff_s,
                                                                 stable_s)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc = start()
        self.restarts = 0
        self._thread: threading.Thread | None = None

    def watch(self) -> None:
        """Start supervising in a daemon thread (after the first worker came up)."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="kiln-supervisor")
        self._thread.start()

    def _run(self) -> None:
        backoff = self.min_backoff_s
        started = time.monotonic()
        while not self._stopping.is_set():
            proc = self.proc
            returncode = proc.wait()  # reaps it: a dead worker never lingers as a zombie
            if self._stopping.is_set():
                return
            reason = describe_exit(returncode)
            if time.monotonic() - started > self.stable_s:
                backoff = self.min_backoff_s
            try:
                moved = fail_over_dead_worker(self.services, proc.pid, socket.gethostname(),
                                              reason)
            except Exception:  # the database is away: the sweeper catches up later
                log.exception("could not fail over the jobs of worker pid %d", proc.pid)
                moved = []
            log.warning("the worker (pid %d) %s; %s; restarting it in %.0f s", proc.pid, reason,
                        f"requeued job(s) {', '.join(moved)}" if moved else "it held no job",
                        backoff)
            if self._stopping.wait(backoff):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.proc = self._start()
                except OSError:
                    log.exception("could not start a worker")
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                self.restarts += 1
            log.warning("started worker pid %d (restart %d)", self.proc.pid, self.restarts)
            started = time.monotonic()
            backoff = min(backoff * 2, self.max_backoff_s)

    def stop(self, timeout_s: float = 20.0) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
