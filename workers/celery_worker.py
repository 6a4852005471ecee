"""The Celery worker process: the app made from the Flask app, plus heartbeat and sweeper.

``kiln worker`` calls :func:`run_worker`. It probes the host in a child process (toolchains
and CUDA are never touched here), registers the targets it builds, consumes only their
queues, and runs builds one at a time (the solo pool: the build itself runs in a child
process, so this process only supervises). Daemon threads keep the worker row fresh and run
housekeeping (``service.housekeeping``: each task once per deployment, under a lease).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from celery import Celery, Task
from flask import Flask

from service import housekeeping, worker_registry
from service.celery_app import BUILD_TASK, declare_queues
from service.logging_setup import job_context, outcome_level
from service.models import Worker
from service.services import Services
from workers import inductor_seed
from workers.cxx_compiler import compiler_env
from workers.sandbox import SandboxUnavailable, warn_unsandboxed
from workers.tasks import prepare_spare, wait_for_spare, warm_spare_mode, worker_sandbox

log = logging.getLogger("kiln.worker")


def celery_init_app(app: Flask) -> Celery:
    """Flask's pattern: tasks run inside the app context and reach services through it."""
    services: Services = app.extensions["kiln"]
    celery = services.celery

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            if self.name != BUILD_TASK or not args:
                with app.app_context():
                    return self.run(*args, **kwargs)
            job_id = str(args[0])
            with app.app_context(), job_context(job_id):
                outcome = self.run(*args, **kwargs)
                # Celery calls every returned build "succeeded"; this line says what it was.
                log.log(outcome_level(str(outcome)), "build of job %s: %s", job_id, outcome)
                return outcome

    celery.Task = FlaskTask
    import workers.tasks  # noqa: F401  registers kiln.build

    celery.set_default()
    return celery


def probe_host(backends: str = "") -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "workers.probe", backends], check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _every(interval: float, stop: threading.Event, fn: Any) -> None:
    while not stop.wait(interval):
        try:
            fn()
        except Exception:  # a database blip must not kill the thread; try again next round
            log.exception("periodic %s failed", getattr(fn, "__name__", fn))


def run_worker(app: Flask, name: str | None = None, backends: str = "",
               loglevel: str = "INFO") -> None:
    services: Services = app.extensions["kiln"]
    # Builds run untrusted programs: no sandbox, no worker (unless the operator said so).
    try:
        sandbox = worker_sandbox()
    except SandboxUnavailable as exc:
        raise SystemExit(f"refusing to start: {exc}") from None
    if sandbox == "off":
        warn_unsandboxed("this worker")
    celery = celery_init_app(app)
    t0 = time.monotonic()
    found = probe_host(backends)
    started = {"probe_host_s": time.monotonic() - t0}
    os.environ.update(compiler_env(found["host"].get("aoti_cxx")))  # for the build children
    if not found["targets"]:
        raise SystemExit(f"this host can build nothing: {found['unavailable']}")
    worker_id = f"kiln@{name or socket.gethostname()}-{os.getpid()}"
    queues = sorted({t["queue"] for t in found["targets"]})
    host = {**found["host"], "unavailable": found["unavailable"], "pid": os.getpid(),
            "sandbox": sandbox, "warm_spare": warm_spare_mode()}

    drained = threading.Event()

    def heartbeat() -> None:
        with services.db.session() as s:
            worker_registry.heartbeat(s, worker_id, socket.gethostname(), found["targets"],
                                      host)
            row = s.get(Worker, worker_id)
            draining = row is not None and row.drain_requested_at is not None
        if draining and not drained.is_set():
            # Drained from the dashboard: Celery's warm shutdown finishes the job, takes no more.
            drained.set()
            log.warning("drain requested: finishing the current job, then stopping")
            os.kill(os.getpid(), signal.SIGTERM)

    # The seed (and the spare) before the worker row: a worker the API routes builds to is
    # one that can start them (the seed took 60 s on the H200 host's first start).
    t0 = time.monotonic()
    if any(t["backend"] == "aoti" for t in found["targets"]):
        inductor_seed.prepare(services.settings.scratch_dir, start_from=(
            found["host"].get("aoti_cxx") or {}).get("inductor_cache"))
    started["seed_s"] = time.monotonic() - t0
    # If enabled (tasks.warm_spare_enabled). A GPU worker's first spare is a CUDA one: what it
    # is there for (after that, each build starts the next spare for its own device).
    devices = [t["device"] for t in found["targets"]]
    first = "cuda" if "cuda" in devices else devices[0]
    t0 = time.monotonic()
    prepare_spare(services, first)
    wait_for_spare(first)
    started["first_spare_s"] = time.monotonic() - t0
    # Where a slow start went (the compiler check and the seed are once per host).
    log.warning("worker start: %s", ", ".join(f"{k} {v:.1f}" for k, v in started.items()))
    # Queues first, then the worker row: the API publishes only to targets of live workers,
    # so every queue it publishes to exists by then.
    declare_queues(celery, queues)
    heartbeat()
    for t in found["targets"]:
        log.warning("serving %s/%s/%s toolchain %s on queue %s", t["backend"], t["device"],
                    t["arch"], t["toolchain_id"], t["queue"])
    stop = threading.Event()
    interval = max(1.0, services.settings.worker_ttl_s / 3)
    threading.Thread(target=_every, args=(interval, stop, heartbeat), daemon=True).start()
    stop_housekeeping = housekeeping.start_thread(services, worker_id)
    try:
        celery.worker_main(["worker", "-P", "solo", "-c", "1", "-n", worker_id,
                            "-Q", ",".join(queues), "--without-gossip", "--without-mingle",
                            "--without-heartbeat", f"--loglevel={loglevel}"])
    finally:
        stop.set()
        stop_housekeeping.set()
        if not drained.is_set():  # a drained worker's row stays: the workers page shows it
            with services.db.session() as s:
                worker_registry.forget(s, worker_id)
