"""The build task: claim the job, run the sandboxed build child, store the engine, finish.

The task takes a job id only; everything else is read from the job row, the database being
the source of truth. Each state change is fenced by the attempt number that ``claim`` handed
out, so a duplicate delivery or a worker that lost its lease changes nothing.

Everything the child leaves behind is hostile data: ``result.json`` is read with a size cap
and parsed into :class:`workers.contracts.ChildResult`; the artifact must be a bare name of a
regular file (never followed through a link) with the backend's suffix and a bounded size,
and the worker hashes it itself. The program the child builds is the blob whose sha256 the
``Model`` row recorded at upload, checked before the child starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

from celery import shared_task
from flask import current_app
from pydantic import ValidationError

from kiln.engine_format import EMBEDDED_ENTRY, engine_metadata
from service import jobs
from service.artifacts import LocalArtifactStore
from service.celery_app import BUILD_TASK, publish_build
from service.engine_record import EngineRecord
from service.errors import KilnError
from service.models import Engine, Job, Model, Worker, utcnow
from service.services import Services
from service.targets import BACKENDS
from workers import inductor_seed
from workers.child import PHASE_PREFIX, SPARE_READY
from workers.contracts import BuildRequest, ChildResult, NotRunReport, ValidationReport
from workers.sandbox import (
    Child,
    Limits,
    LogTail,
    SandboxUnavailable,
    cpu_address_space_cap,
    finish_child,
    sandbox_mode,
    spawn_child,
)

log = logging.getLogger(__name__)
# Failures worth another attempt: the same program may build on a retry (a transient OOM, a
# killed worker). Errors raised by the build itself are deterministic and fail at once, and
# so do the limits only a hostile or broken program hits (log flood, process count).
RETRYABLE = {"signal", "memory", "timeout", "exit"}
OUTCOME_CODES = {"signal": "build_crashed", "memory": "build_memory_limit",
                 "timeout": "build_timeout", "log_limit": "build_log_limit",
                 "processes": "build_process_limit"}
# Bounds on what the child hands back, and on any file it writes (RLIMIT_FSIZE: the compiler's
# intermediate files, packaging copies).
MAX_ENGINE_BYTES = 16 * 1024**3
MAX_RESULT_BYTES = 4 * 1024**2
MAX_CHILD_FILE_BYTES = 32 * 1024**3
# The command that runs the child; tests swap in hostile children.
CHILD_ARGV: list[str] | None = None
# The warm spare (warm_spare_enabled): the worker keeps one sandboxed child that has already
# imported torch and the toolchain, waiting for the next job (one per worker process; started
# when a build starts, so it is warm by the time the next job comes).
_spares: dict[str, Child] = {}


class ChildOutputRefused(KilnError):
    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("bad_child_result", message, 500, details)


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def open_child_file(workdir: Path, name: str, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open ``workdir/name`` as the child left it: a bare name, a regular file of one link,
    never through a symlink, at most ``max_bytes``. Returns the fd (caller closes) and stat."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ChildOutputRefused(f"the build child named {name!r} as its output, which is not "
                                 "a file name in its work directory", name=name[:200])
    try:
        fd = os.open(workdir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ChildOutputRefused(f"the build child's output {name!r} cannot be opened as a "
                                 f"plain file: {exc.strerror}", name=name) from exc
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = "has other hard links"
    elif st.st_size > max_bytes:
        problem = f"is {st.st_size} bytes, over the limit of {max_bytes}"
    if problem:
        os.close(fd)
        raise ChildOutputRefused(f"the build child's output {name!r} {problem}", name=name,
                                 size=st.st_size, limit=max_bytes)
    return fd, st


def read_child_result(workdir: Path) -> ChildResult:
    fd, st = open_child_file(workdir, "result.json", MAX_RESULT_BYTES)
    try:
        raw = os.read(fd, MAX_RESULT_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return ChildResult.model_validate_json(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10]]
        raise ChildOutputRefused("the build child's result.json is not a valid result: "
                                 + "; ".join(problems), problems=problems) from None


def engine_suffixes(backend: str) -> tuple[str, ...]:
    """File suffixes an engine of ``backend`` may have; the stored suffix is one of these,
    never a string the child made up. AOTInductor's swappable-weights engines are a zip of
    the compiled package and its weights."""
    return (str(BACKENDS[backend]["suffix"]), *((".zip",) if backend == "aoti" else ()))


def _set_current_job(services: Services, worker_id: str, job_id: str | None) -> None:
    with services.db.session() as s:
        row = s.get(Worker, worker_id)
        if row is not None:
            row.current_job_id = job_id


@cache
def worker_sandbox() -> str:
    """The sandbox this worker builds in, checked once per process (``KILN_SANDBOX``)."""
    return sandbox_mode()


def hidden_paths(services: Services) -> list[Path]:
    """Paths a build must never see, even where they lie under a root the sandbox binds."""
    settings = services.settings
    paths = [settings.data_dir]
    if isinstance(services.store, LocalArtifactStore):
        paths.append(services.store.root.resolve())
    if settings.database_url.startswith("sqlite:///"):
        db = Path(settings.database_url.removeprefix("sqlite:///")).resolve()
        paths += [db, *(db.with_name(db.name + end) for end in ("-wal", "-shm", "-journal"))]
    return paths


def build_limits(services: Services, device: str) -> Limits:
    settings = services.settings
    return Limits(timeout_s=settings.build_timeout_s, memory_mb=settings.build_memory_mb,
                  file_bytes=MAX_CHILD_FILE_BYTES,
                  address_space_bytes=(cpu_address_space_cap(settings.build_memory_mb)
                                       if device == "cpu" else None))


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
    spare = _take_spare(job.device)
    workdir = spare.workdir if spare else Path(
        tempfile.mkdtemp(prefix=f"{job_id}-", dir=settings.scratch_dir))
    tail = spare.tail if spare else LogTail(keep=jobs.LOG_LIMIT)
    timings: dict[str, float] = {"queued_s": round(queued_s, 3)}

    def fail(code: str, message: str, retryable: bool) -> str:
        with services.db.session() as s:
            status = jobs.fail(s, job_id, attempt, worker_id, code, message, tail.text(),
                               timings, retryable=retryable)
        if status == "queued":
            publish_build(services.celery, job_id, job.queue)
        return f"{code}: {message}"

    try:
        try:
            sandbox = worker_sandbox()
        except SandboxUnavailable as exc:  # another worker may have one: let it retry there
            return fail("sandbox_unavailable", str(exc), retryable=True)
        t0 = time.perf_counter()
        program = workdir / "program.pt2"
        services.store.get_file(model.blob_uri, program)
        found = _sha256(program)
        if found != model.sha256:
            return fail("program_blob_corrupt", f"the stored program {model.blob_uri} has "
                        f"sha256 {found}, not the {model.sha256} recorded at upload: the blob "
                        "is damaged or was replaced; upload the program again", False)
        request = BuildRequest.model_validate({
            "program": program.name, "backend": job.backend, "device": job.device,
            "profile": job.profile, "options": job.options, "seed": 0})
        base = _swap_base(services, job)
        if base is not None:
            services.store.get_file(base.artifact_uri, workdir / "base.zip")
            request = request.model_copy(update={
                "swap_from": "base.zip", "swap_from_engine_id": base.id,
                "swap_from_build_seconds": base.build_seconds})
        (workdir / "request.json").write_text(request.model_dump_json())
        timings["fetch_s"] = round(time.perf_counter() - t0, 3)
        tail.write(f"kiln: job {job_id} attempt {attempt} on {worker_id} "
                   f"(sandbox: {sandbox}{', warm spare' if spare else ''})\n")

        def tick() -> bool:
            with services.db.session() as s:
                return jobs.renew(s, job_id, attempt, worker_id, settings.lease_s,
                                  status=tail.phase or "building", log_text=tail.text())

        t0 = time.perf_counter()
        limits = build_limits(services, job.device)
        child = spare or spawn_child(workdir, limits, inductor_seed.child_cache_env(workdir),
                                     hidden=hidden_paths(services),
                                     readonly=inductor_seed.readonly_paths(),
                                     sandbox=sandbox, argv=CHILD_ARGV,
                                     phase_prefix=PHASE_PREFIX, tail=tail)
        spare = None  # from here on it is this job's child
        if spare_during_build(job.device):
            prepare_spare(services, job.device)
        outcome = finish_child(child, limits, tick, tick_s=min(2.0, settings.lease_s / 3))
        timings["child_s"] = round(time.perf_counter() - t0, 3)
        tail.write(f"kiln: child peak memory {outcome.peak_rss_mb:.0f} MB resident, "
                   f"{outcome.peak_vm_mb:.0f} MB address space\n")
        if outcome.reason == "cancelled":
            return "cancelled"
        if outcome.reason is not None or not (workdir / "result.json").exists():
            code = OUTCOME_CODES.get(outcome.reason or "", "build_crashed")
            return fail(code, outcome.message or "build process ended without a result",
                        retryable=outcome.reason in RETRYABLE)
        try:
            result = read_child_result(workdir)
        except ChildOutputRefused as exc:
            return fail(exc.code, exc.message, retryable=False)
        timings.update({k: round(v, 3) for k, v in result.timings.items()})
        if not result.ok or result.error is not None:
            err = result.error
            return fail(err.code if err else "build_failed",
                        err.message if err else "build failed without saying why", False)
        try:
            return _store_engine(services, job, model, attempt, worker_id, workdir, result,
                                 timings, tail.text())
        except ChildOutputRefused as exc:
            return fail(exc.code, exc.message, retryable=False)
    finally:
        if spare is not None:  # claimed for a job that failed before its build started
            spare.discard()
        _set_current_job(services, worker_id, None)
        shutil.rmtree(workdir, ignore_errors=True)
        prepare_spare(services, job.device)


def warm_spare_enabled(device: str) -> bool:
    """KILN_WARM_SPARE: ``on``, ``off``, or ``auto`` (the default): a spare for CUDA builds
    only. A GPU host has the memory for an idle interpreter and a CUDA context, and its
    builds paid 13 s of start-up each (the H200 run); a CPU worker's spare competes with its
    own build for a few cores, so there it is asked for explicitly."""
    mode = warm_spare_mode()
    return mode == "on" or (mode == "auto" and device == "cuda")


def warm_spare_mode() -> str:
    """KILN_WARM_SPARE as the worker reads it (``auto`` when unset)."""
    return os.environ.get("KILN_WARM_SPARE", "auto").strip().lower()


def spare_during_build(device: str) -> bool:
    """Start the next spare when a build starts (True) or when it ends. A GPU host's build
    leaves cores free and back-to-back jobs then meet a warm spare (started after each build,
    the H200 run's next job met it a second old: 13-14 s of warm-up in every build); on a CPU
    worker the spare's imports would take cores from the build's own compile."""
    return device == "cuda"


def prepare_spare(services: Services, device: str) -> None:
    """Start the next build's child now (fresh sandbox, fresh work dir), if enabled."""
    if not warm_spare_enabled(device) or CHILD_ARGV is not None or device in _spares:
        return
    try:
        sandbox = worker_sandbox()
    except SandboxUnavailable:
        return
    services.settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="spare-", dir=services.settings.scratch_dir))
    child = spawn_child(workdir, build_limits(services, device),
                        inductor_seed.child_cache_env(workdir), hidden=hidden_paths(services),
                        readonly=inductor_seed.readonly_paths(),
                        sandbox=sandbox, phase_prefix=PHASE_PREFIX, spare=True,
                        tail=LogTail(keep=jobs.LOG_LIMIT))
    child.device = device
    _spares[device] = child


def wait_for_spare(device: str, timeout_s: float = 180) -> bool:
    """Wait until the spare for ``device`` has warmed up (a starting worker: its first build
    then starts warm). False if there is none, it died, or it is not ready in time."""
    spare = _spares.get(device)
    deadline = time.monotonic() + timeout_s
    while spare is not None and spare.alive() and time.monotonic() < deadline:
        if SPARE_READY in spare.tail.text():
            return True
        time.sleep(0.2)
    return False


def _take_spare(device: str) -> Child | None:
    """The spare for this device, if one is alive; spares for other devices are dropped (its
    rlimits were chosen for its device)."""
    found = _spares.pop(device, None)
    for other in list(_spares):
        dropped = _spares.pop(other)
        dropped.discard()
        shutil.rmtree(dropped.workdir, ignore_errors=True)
    if found is not None and not found.alive():
        found.discard()
        shutil.rmtree(found.workdir, ignore_errors=True)
        return None
    return found


def _swap_base(services: Services, job: Job) -> Engine | None:
    """The engine whose compiled code this job reuses; None (a full build) if it was evicted."""
    if not job.swap_from_engine_id:
        return None
    with services.db.session() as s:
        return s.get(Engine, job.swap_from_engine_id)


MAX_EMBEDDED_PROFILE_BYTES = 1024 * 1024


def check_embedded_profile(engine: Path, job: Job) -> None:
    """A zip engine's embedded profile (``kiln/engine.json``, which kiln.load trusts over any
    sidecar) was written by the build child: refuse the engine unless there is exactly one and
    it says exactly what the job asked for - a hostile child must not widen the range a
    loader enforces."""
    if not zipfile.is_zipfile(engine):
        return
    expected = engine_metadata(job.backend, job.device, dict(job.options), job.profile)
    try:
        with zipfile.ZipFile(engine) as zf:
            found = [i for i in zf.infolist() if i.filename == EMBEDDED_ENTRY
                     or i.filename.endswith("/" + EMBEDDED_ENTRY)]
            if len(found) != 1 or found[0].file_size > MAX_EMBEDDED_PROFILE_BYTES:
                raise ChildOutputRefused(f"the build child's engine holds {len(found)} "
                                         f"embedded profiles ({EMBEDDED_ENTRY}), not one")
            embedded = json.loads(zf.read(found[0]))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ChildOutputRefused(f"the build child's engine is not a readable zip ({exc})"
                                 ) from None
    if embedded != expected:
        raise ChildOutputRefused("the build child's embedded profile differs from the job's",
                                 embedded=str(embedded)[:500])


def _store_engine(services: Services, job: Job, model: Model, attempt: int, worker_id: str,
                  workdir: Path, result: ChildResult, timings: dict[str, float],
                  log_text: str) -> str:
    t0 = time.perf_counter()
    allowed = engine_suffixes(job.backend)
    suffix = next((x for x in allowed if (result.artifact or "").endswith(x)), None)
    if result.artifact is None or suffix is None:
        raise ChildOutputRefused(f"the build child's artifact {result.artifact!r} does not "
                                 f"end in {' or '.join(allowed)}, the {job.backend} engine "
                                 "suffixes")
    fd, st = open_child_file(workdir, result.artifact, MAX_ENGINE_BYTES)
    try:
        sha256 = _sha256_fd(fd)  # the worker's own hash, never one the child reports
        # The child is gone (its namespace, or its process group, was killed), so nothing can
        # swap the file between this check and the copy; copy from the opened file anyway.
        verified = workdir.parent / f".{workdir.name}.engine"
        with open(verified, "wb") as out:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, 1 << 20):
                out.write(chunk)
    finally:
        os.close(fd)
    try:
        check_embedded_profile(verified, job)
        # Blob first, row second: a row never points at a missing blob. A blob whose row
        # never comes (fenced off, crash here) is collected by the store's garbage collection.
        uri = services.store.put_file(verified, f"engines/{sha256}{suffix}")
    finally:
        verified.unlink(missing_ok=True)
    timings["store_s"] = round(time.perf_counter() - t0, 3)
    target = next((t for t in _worker_targets(services, worker_id)
                   if t["queue"] == job.queue), {})
    build_report = {**result.build_report, "artifact_suffix": suffix}
    if result.build_report.get("weight_swap"):
        build_report["swap_from_engine_id"] = job.swap_from_engine_id
    validation: dict[str, Any] = {}
    if result.validation is not None:
        validation = {**result.validation.model_dump(mode="json"),
                      "reported_by": "build child"}
    benchmark: dict[str, Any] = {}
    if result.benchmark is not None:
        benchmark = {**result.benchmark.model_dump(mode="json"), "reported_by": "build child"}
    record = EngineRecord(
        model_hash=model.model_hash, graph_hash=model.graph_hash,
        weights_hash=model.weights_hash, backend=job.backend, device=job.device,
        arch=job.arch, toolchain_id=job.toolchain_id, toolchain=target.get("toolchain", {}),
        options=job.options, profile=job.profile, artifact_uri=uri, sha256=sha256,
        size=st.st_size, build_seconds=timings.get("build_s", 0.0), build_report=build_report,
        validation=validation, benchmark=benchmark,
        # Only an engine the child ran and compared counts as validated; a not_run report
        # (or none at all) is stored as such, with the child's reason.
        validation_status="passed" if isinstance(result.validation, ValidationReport)
        else "not_run",
        validation_reason=None if isinstance(result.validation, ValidationReport) else (
            result.validation.reason if isinstance(result.validation, NotRunReport)
            else "the build child did not validate"))
    with services.db.session() as s:
        engine = jobs.succeed(s, job.id, attempt, worker_id, record, timings, log_text)
    return f"succeeded: engine {engine.id}" if engine else "fenced: a newer attempt owns the job"


def _worker_targets(services: Services, worker_id: str) -> list[dict[str, Any]]:
    with services.db.session() as s:
        row = s.get(Worker, worker_id)
        return list(row.targets) if row else []
