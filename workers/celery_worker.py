"""The Celery worker process: the app made from the Flask app, plus heartbeat and sweeper.

``kiln worker`` calls :func:`run_worker`. It probes the host in a child process (toolchains
and CUDA are never touched here), registers the targets it builds, consumes only their
queues, and runs builds one at a time (the solo pool: the build itself runs in a child
process, so this process only supervises). Two daemon threads keep the worker row fresh and
sweep lost jobs; several workers sweeping at once is safe, every sweep update is conditional.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from celery import Celery, Task
from flask import Flask

from service import jobs, store_budget, worker_registry
from service.celery_app import declare_queues, publish_build
from service.services import Services
from workers.sandbox import SandboxUnavailable, warn_unsandboxed
from workers.tasks import prepare_spare, worker_sandbox

log = logging.getLogger("kiln.worker")


def celery_init_app(app: Flask) -> Celery:
    """Flask's pattern: tasks run inside the app context and reach services through it."""
    services: Services = app.extensions["kiln"]
    celery = services.celery

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

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


def sweep_once(services: Services) -> int:
    with services.db.session() as s:
        to_publish = [(j.id, j.queue) for j in jobs.sweep(s, services.settings.requeue_after_s)]
    for job_id, queue in to_publish:
        publish_build(services.celery, job_id, queue)
    return len(to_publish)


def housekeeping(services: Services) -> None:
    """Sweep lost jobs, keep the store under budget, collect orphaned blobs."""
    sweep_once(services)
    settings = services.settings
    if settings.store_budget_bytes:
        report = store_budget.enforce_budget(services, settings.store_budget_bytes)
        if report.evicted:
            log.warning("evicted %d engines: %d -> %d bytes", len(report.evicted),
                        report.bytes_before, report.bytes_after)
    store_budget.collect_orphans(services, settings.gc_grace_s)


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
    found = probe_host(backends)
    if not found["targets"]:
        raise SystemExit(f"this host can build nothing: {found['unavailable']}")
    worker_id = f"kiln@{name or socket.gethostname()}-{os.getpid()}"
    queues = sorted({t["queue"] for t in found["targets"]})
    host = {**found["host"], "unavailable": found["unavailable"], "pid": os.getpid(),
            "sandbox": sandbox}

    def heartbeat() -> None:
        with services.db.session() as s:
            worker_registry.heartbeat(s, worker_id, socket.gethostname(), found["targets"],
                                      host)

    # Queues first, then the worker row: the API publishes only to targets of live workers,
    # so every queue it publishes to exists by then.
    declare_queues(celery, queues)
    heartbeat()
    prepare_spare(services, found["targets"][0]["device"])  # KILN_WARM_SPARE=on only
    for t in found["targets"]:
        log.warning("serving %s/%s/%s toolchain %s on queue %s", t["backend"], t["device"],
                    t["arch"], t["toolchain_id"], t["queue"])
    stop = threading.Event()
    interval = max(1.0, services.settings.worker_ttl_s / 3)
    threading.Thread(target=_every, args=(interval, stop, heartbeat), daemon=True).start()
    threading.Thread(target=_every, args=(services.settings.sweep_interval_s, stop,
                                          lambda: housekeeping(services)), daemon=True).start()
    try:
        celery.worker_main(["worker", "-P", "solo", "-c", "1", "-n", worker_id,
                            "-Q", ",".join(queues), "--without-gossip", "--without-mingle",
                            "--without-heartbeat", f"--loglevel={loglevel}"])
    finally:
        stop.set()
        with services.db.session() as s:
            worker_registry.forget(s, worker_id)
