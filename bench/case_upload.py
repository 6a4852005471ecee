"""Program upload: a valid 1 GB ``.pt2`` (a torch.export program with one large weight) sent
with curl as a raw body to ``POST /api/v1/models``, so the whole intake is measured (stream to
scratch + sha256, inspect + weights hash, copy into the store, index); the baseline is nginx
taking the same body with a DAV PUT (written to a temp file, then renamed into place).

After the measured runs the intake's phases are timed one by one in this process, on the same
file, with the service's own functions, to say where the time goes."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from bench.common import (
    MB,
    BenchError,
    Nginx,
    Row,
    RssSampler,
    Run,
    curl,
    log,
    median,
    profile_gunicorn,
    profile_note,
    py_spy_available,
    summarize_profile,
)
from bench.kiln import KilnStack, ensure_programs, kiln_stack
from service.models import Model

CASE = "program upload"
RATIO_GOAL = 0.8
MEMORY_GOAL_MB = 50.0


def run_case(run: Run) -> None:
    size_mb = 100 if run.quick else 1000
    reps = 2 if run.quick else 3
    program = ensure_programs(run, [f"big-{size_mb}"])[f"big-{size_mb}"]
    size = program.stat().st_size
    raw: dict[str, Any] = {"size_bytes": size, "repeats": reps, "kiln": [], "nginx": []}
    run.raw[CASE] = raw
    with kiln_stack(run, "upload") as kiln, Nginx(
            run.work / "upload" / "nginx", run.work / "upload" / "files",
            run.work / "upload" / "put") as nginx:
        for i in range(reps):  # alternate, so drift hits both sides alike
            raw["kiln"].append(_kiln_upload(kiln, program, size))
            _forget_models(kiln)  # the next upload must be a full intake again, not a repeat
            raw["nginx"].append(_nginx_put(nginx, program, size, i))
        k_rate = median([r["mb_s"] for r in raw["kiln"]])
        n_rate = median([r["mb_s"] for r in raw["nginx"]])
        growth = max(r["rss"]["growth_mb"] for r in raw["kiln"])
        log(f"{CASE}: {size / MB:.0f} MB kiln {k_rate:.0f} MB/s nginx {n_rate:.0f} MB/s, "
            f"worker memory +{growth:.1f} MB")
        cfg = f"{size / MB:.0f} MB .pt2, 1 client"
        rate = run.add(Row(CASE, cfg, "MB/s", k_rate, n_rate, k_rate / n_rate,
                           goal=f">= {RATIO_GOAL:.0%} of nginx",
                           met=k_rate >= RATIO_GOAL * n_rate, unit="MB/s"))
        run.add(Row(CASE, cfg, "server memory growth MB", growth, goal=f"< {MEMORY_GOAL_MB:g} MB",
                    met=growth < MEMORY_GOAL_MB, unit="MB"))
        raw["phases"] = phases = _phases(kiln, program)
        rate.note = ("intake steps alone, in-process: " + ", ".join(
            f"{k.removesuffix('_s')} {v:.2f} s" for k, v in phases.items()))
        if rate.met is False and run.profile and py_spy_available():
            raw["profile"] = _profile(run, kiln, program, size)
            rate.note += "; " + profile_note(raw["profile"])


def _kiln_upload(kiln: KilnStack, program: Path, size: int) -> dict[str, Any]:
    url = f"{kiln.url}/api/v1/models?filename={program.name}"
    with RssSampler(kiln.api.worker_pids()) as sampler:
        result = curl(["-X", "POST", "-T", str(program), "-H",
                       "Content-Type: application/octet-stream", "-H", "Expect:", url])
    if result.get("http_code") != 201:
        raise BenchError(f"upload answered HTTP {result.get('http_code')} (201 expected)")
    return _rates(result, size) | {"rss": sampler.report()}


def _nginx_put(nginx: Nginx, program: Path, size: int, i: int) -> dict[str, Any]:
    dest = nginx.upload_root / f"upload-{i}.pt2"
    result = curl(["-T", str(program), "-H", "Expect:", f"{nginx.url}/upload/{dest.name}"])
    if result.get("http_code") not in (201, 204) or dest.stat().st_size != size:
        raise BenchError(f"nginx PUT answered HTTP {result.get('http_code')}")
    dest.unlink()
    return _rates(result, size)


def _rates(result: dict[str, Any], size: int) -> dict[str, Any]:
    return {"mb_s": size / result["time_total"] / MB, "time_total_s": result["time_total"],
            "http_code": result["http_code"]}


def _forget_models(kiln: KilnStack) -> None:
    with kiln.db.session() as s:
        s.execute(delete(Model))
    for blob in (kiln.settings.data_dir / "artifacts" / "models").glob("*"):
        blob.unlink()


def _phases(kiln: KilnStack, program: Path) -> dict[str, float]:
    """The intake's steps, timed one at a time with the service's own functions."""
    from service.archive import inspect_archive
    from service.artifacts import open_store
    from service.uploads import stream_to_file

    scratch = kiln.settings.scratch_dir / "bench-phases"
    scratch.mkdir(parents=True, exist_ok=True)
    store = open_store(kiln.settings.artifact_uri)
    tmp = scratch / "upload.partial"
    out: dict[str, float] = {}
    try:
        with open(program, "rb") as f:
            t0 = time.perf_counter()
            stream_to_file(io.BufferedReader(f), tmp, 1 << 40)  # type: ignore[arg-type]
            out["stream_to_file_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inspect_archive(tmp)
        out["inspect_archive_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        uri = store.put_file(tmp, "models/bench-phases.pt2", handover=True)  # as intake does
        out["store_put_file_s"] = time.perf_counter() - t0
        store.delete(uri)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"{CASE}: phases in-process " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return {k: round(v, 3) for k, v in out.items()}


def _profile(run: Run, kiln: KilnStack, program: Path, size: int) -> dict[str, Any]:
    out = run.artifact_path("upload-profile.txt")
    log(f"{CASE}: profiling one upload with py-spy -> {out}")
    t0 = time.monotonic()
    spy = profile_gunicorn(kiln.api.proc.pid, 30, out)  # type: ignore[union-attr]
    time.sleep(0.5)
    result = _kiln_upload(kiln, program, size)
    took = time.monotonic() - t0
    spy.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
    spy.wait(timeout=60)
    _forget_models(kiln)
    summary = summarize_profile(out)
    summary.update({"file": str(out), "under_profiler_mb_s": result["mb_s"],
                    "seconds": round(took, 1)})
    return summary
