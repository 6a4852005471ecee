"""The build task: claim the job, run the build child, store the engine, finish the job.

The task takes a job id only; everything else is read from the job row, the database being
the source of truth. Each state change is fenced by the attempt number that ``claim`` handed
out, so a duplicate delivery or a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from flask import current_app

from service import jobs
from service.celery_app import BUILD_TASK, publish_build
from service.models import Engine, Job, Model, Worker, utcnow
from service.services import Services
from service.targets import BACKENDS
from workers.child import PHASE_PREFIX
from workers.sandbox import run_child

log = logging.getLogger(__name__)
# Failures worth another attempt: the same program may build on a retry (a transient OOM, a
# killed worker). Errors raised by the build itself are deterministic and fail at once.
RETRYABLE = {"signal", "memory", "timeout", "exit"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _set_current_job(services: Services, worker_id: str, job_id: str | None) -> None:
    with services.db.session() as s:
        row = s.get(Worker, worker_id)
        if row is not None:
            row.current_job_id = job_id


@shared_task(name=BUILD_TASK, bind=True)
def build(self: Any, job_id: str) -> str:
    services: Services = current_app.extensions["kiln"]
    worker_id = self.request.hostname or socket.gethostname()
    return run_build(services, job_id, worker_id)


def run_build(services: Services, job_id: str, worker_id: str) -> str:
    settings = services.settings
    with services.db.session() as s:
        job = jobs.claim(s, job_id, worker_id, settings.lease_s)
        if job is None:
            return "skipped: not queued (duplicate delivery, cancelled or finished)"
        model = s.get(Model, job.model_id)
        assert model is not None
        queued_s = (utcnow() - (job.enqueued_at or job.created_at)).total_seconds()
    attempt = job.attempts
    _set_current_job(services, worker_id, job_id)
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=settings.scratch_dir))
    log_path = workdir / "build.log"
    timings: dict[str, float] = {"queued_s": round(queued_s, 3)}
    try:
        t0 = time.perf_counter()
        program = workdir / "program.pt2"
        services.store.get_file(model.blob_uri, program)
        request: dict[str, Any] = {
            "program": str(program), "backend": job.backend, "device": job.device,
            "profile": job.profile, "options": job.options, "seed": 0}
        base = _swap_base(services, job)
        if base is not None:
            services.store.get_file(base.artifact_uri, workdir / "base.zip")
            request.update(swap_from=str(workdir / "base.zip"), swap_from_engine_id=base.id,
                           swap_from_build_seconds=base.build_seconds)
        (workdir / "request.json").write_text(json.dumps(request))
        timings["fetch_s"] = round(time.perf_counter() - t0, 3)
        log_path.write_text(f"kiln: job {job_id} attempt {attempt} on {worker_id}\n")
        phase = {"status": "building"}

        def tick() -> bool:
            text = log_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith(PHASE_PREFIX):
                    phase["status"] = line.removeprefix(PHASE_PREFIX).strip()
            with services.db.session() as s:
                return jobs.renew(s, job_id, attempt, worker_id, settings.lease_s,
                                  status=phase["status"], log_text=text)

        t0 = time.perf_counter()
        outcome = run_child(workdir, log_path, settings.build_timeout_s, settings.build_memory_mb,
                            tick, tick_s=min(2.0, settings.lease_s / 3))
        timings["child_s"] = round(time.perf_counter() - t0, 3)
        log_text = log_path.read_text(errors="replace")
        if outcome.reason == "cancelled":
            return "cancelled"
        result_path = workdir / "result.json"
        if outcome.reason is not None or not result_path.exists():
            code = {"signal": "build_crashed", "memory": "build_memory_limit",
                    "timeout": "build_timeout"}.get(outcome.reason or "", "build_crashed")
            message = outcome.message or "build process ended without a result"
            with services.db.session() as s:
                status = jobs.fail(s, job_id, attempt, worker_id, code, message, log_text,
                                   timings, retryable=outcome.reason in RETRYABLE)
            if status == "queued":
                publish_build(services.celery, job_id, job.queue)
            return f"{code}: {message}"
        result = json.loads(result_path.read_text())
        timings.update({k: round(v, 3) for k, v in result.get("timings", {}).items()})
        if not result["ok"]:
            err = result["error"]
            with services.db.session() as s:
                jobs.fail(s, job_id, attempt, worker_id, err["code"], err["message"], log_text,
                          timings, retryable=False)
            return f"{err['code']}: {err['message']}"
        return _store_engine(services, job, model, attempt, worker_id, workdir, result,
                             timings, log_text)
    finally:
        _set_current_job(services, worker_id, None)
        shutil.rmtree(workdir, ignore_errors=True)


def _swap_base(services: Services, job: Job) -> Engine | None:
    """The engine whose compiled code this job reuses; None (a full build) if it was evicted."""
    if not job.swap_from_engine_id:
        return None
    with services.db.session() as s:
        return s.get(Engine, job.swap_from_engine_id)


def _store_engine(services: Services, job: Job, model: Model, attempt: int, worker_id: str,
                  workdir: Path, result: dict[str, Any], timings: dict[str, float],
                  log_text: str) -> str:
    t0 = time.perf_counter()
    artifact = workdir / result["artifact"]
    sha256 = _sha256(artifact)
    suffix = artifact.suffix or BACKENDS[job.backend]["suffix"]
    # Blob first, row second: a row never points at a missing blob. A blob whose row never
    # comes (fenced off, crash here) is collected by the store's garbage collection.
    uri = services.store.put_file(artifact, f"engines/{sha256}{suffix}")
    timings["store_s"] = round(time.perf_counter() - t0, 3)
    target = next((t for t in _worker_targets(services, worker_id)
                   if t["queue"] == job.queue), {})
    fields = {
        "model_hash": model.model_hash, "graph_hash": model.graph_hash,
        "weights_hash": model.weights_hash, "backend": job.backend, "device": job.device,
        "arch": job.arch, "toolchain_id": job.toolchain_id,
        "toolchain": target.get("toolchain", {}), "options": job.options,
        "profile": job.profile, "artifact_uri": uri, "sha256": sha256,
        "size": artifact.stat().st_size, "build_seconds": timings.get("build_s", 0.0),
        "build_report": {**result["build_report"], "artifact_suffix": suffix,
                         **({"swap_from_engine_id": job.swap_from_engine_id}
                            if result["build_report"].get("weight_swap") else {})},
        "validation": result["validation"], "benchmark": result["benchmark"],
        # The child's word can only lower the status: anything but "not_run" is what the
        # child's validation (result["ok"]) already established.
        "validation_status": ("not_run" if result.get("validation_status") == "not_run"
                              else "passed"),
        "validation_reason": (str(result.get("validation_reason"))[:2000]
                              if result.get("validation_status") == "not_run" else None),
    }
    with services.db.session() as s:
        engine = jobs.succeed(s, job.id, attempt, worker_id, fields, timings, log_text)
    return f"succeeded: engine {engine.id}" if engine else "fenced: a newer attempt owns the job"


def _worker_targets(services: Services, worker_id: str) -> list[dict[str, Any]]:
    with services.db.session() as s:
        row = s.get(Worker, worker_id)
        return list(row.targets) if row else []
