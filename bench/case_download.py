"""Engine download: ``GET /api/v1/engines/<id>/artifact`` with curl, against nginx serving the
same file on loopback; the gunicorn workers' resident memory is sampled during each transfer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

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
from bench.kiln import KilnStack, kiln_stack, synthetic_target

CASE = "engine download"
RATIO_GOAL = 0.9
MEMORY_GOAL_MB = 50.0


def make_artifact(root: Path, megabytes: int, size_bytes: int | None = None
                  ) -> tuple[Path, str]:
    """A file of random bytes (a 16 MB random block repeated) and its sha256."""
    size = megabytes * MB if size_bytes is None else size_bytes
    path = root / "engines" / f"bench-{size}b.pt2"
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(16 * MB, size))
    left, sha = size, hashlib.sha256()
    with open(path, "wb") as f:
        while left > 0:
            chunk = block[: min(len(block), left)]
            f.write(chunk)
            sha.update(chunk)
            left -= len(chunk)
    return path, sha.hexdigest()


def run_case(run: Run) -> None:
    sizes = [100] if run.quick else [100, 1000]
    reps = 5 if run.quick else 3
    raw: dict[str, Any] = {"sizes_mb": sizes, "repeats": reps, "kiln": {}, "nginx": {},
                           "page_cache": "files are read from the page cache (just written)"}
    run.raw[CASE] = raw
    with kiln_stack(run, "download") as kiln:
        # Authenticated, as production runs it (without keys every request asks the database
        # whether any exist: a round trip a deployment does not pay). An admin's key: the
        # engines here belong to no uploaded model.
        kiln.create_key(role="admin")
        store_root = kiln.settings.data_dir / "artifacts"
        target = synthetic_target()
        engines = {}
        for size in sizes:
            path, sha = make_artifact(store_root, size)
            engine = kiln.insert_engine(None, target, [], artifact=path, sha256=sha,
                                        model_hash=hashlib.sha256(path.name.encode()).hexdigest())
            engines[size] = (engine.id, path)
        # Warm every gunicorn worker on this endpoint (its first request compiles the query
        # and opens the worker's database connection: ~25 ms once, not per download).
        warm_path, warm_sha = make_artifact(store_root, 0, size_bytes=4096)
        warm = kiln.insert_engine(None, target, [], artifact=warm_path, sha256=warm_sha,
                                  model_hash=hashlib.sha256(b"warm-up").hexdigest())
        for _ in range(run.workers * 4):
            curl([*_auth(kiln), f"{kiln.url}/api/v1/engines/{warm.id}/artifact"])
        with Nginx(run.work / "download" / "nginx", store_root, run.work / "download" / "put"
                   ) as nginx:
            curl([f"{nginx.url}/files/engines/{warm_path.name}"])
            for size in sizes:
                engine_id, path = engines[size]
                k_url = f"{kiln.url}/api/v1/engines/{engine_id}/artifact"
                n_url = f"{nginx.url}/files/engines/{path.name}"
                ks, ns = [], []
                for _ in range(reps):  # alternate, so drift hits both sides alike
                    ks.append(_get(k_url, size, kiln))
                    ns.append(_get(n_url, size))
                raw["kiln"][size], raw["nginx"][size] = ks, ns
                k_rate = median([r["mb_s"] for r in ks])
                n_rate = median([r["mb_s"] for r in ns])
                growth = max(r["rss"]["growth_mb"] for r in ks)
                log(f"{CASE}: {size} MB kiln {k_rate:.0f} MB/s nginx {n_rate:.0f} MB/s, "
                    f"worker memory +{growth:.1f} MB")
                cfg = f"{size} MB, 1 client"
                ttfb = (median([r["time_starttransfer_s"] for r in ks]) * 1000,
                        median([r["time_starttransfer_s"] for r in ns]) * 1000)
                run.add(Row(CASE, cfg, "MB/s", k_rate, n_rate, k_rate / n_rate,
                            goal=f">= {RATIO_GOAL:.0%} of nginx", met=k_rate >= RATIO_GOAL * n_rate,
                            unit="MB/s", note=f"first byte after {ttfb[0]:.1f} ms (nginx "
                            f"{ttfb[1]:.1f} ms)"))
                run.add(Row(CASE, cfg, "server memory growth MB", growth,
                            goal=f"< {MEMORY_GOAL_MB:g} MB", met=growth < MEMORY_GOAL_MB,
                            unit="MB"))
                # A resumed download: the second half, with Range (206), both sides alike.
                half = size * MB // 2
                kr, nr = [], []
                for _ in range(reps):
                    kr.append(_get(k_url, size, kiln, start=half))
                    nr.append(_get(n_url, size, start=half))
                raw["kiln"][f"{size}-range"], raw["nginx"][f"{size}-range"] = kr, nr
                k_rate = median([r["mb_s"] for r in kr])
                n_rate = median([r["mb_s"] for r in nr])
                run.add(Row(CASE, f"{size} MB, Range: second half, 1 client", "MB/s", k_rate,
                            n_rate, k_rate / n_rate, goal=f">= {RATIO_GOAL:.0%} of nginx",
                            met=k_rate >= RATIO_GOAL * n_rate, unit="MB/s"))
            missed = [r for r in run.rows if r.case == CASE and r.met is False]
            if missed and run.profile and py_spy_available():
                size = sizes[-1]
                raw["profile"] = _profile(run, kiln, engines[size][0], size)
                for row in missed:
                    row.note = "; ".join(x for x in (row.note, profile_note(raw["profile"])) if x)


def _auth(kiln: KilnStack | None) -> list[str]:
    return ["-H", f"Authorization: Bearer {kiln.api_key}"] if kiln and kiln.api_key else []


def _get(url: str, size: int, kiln: KilnStack | None = None, start: int = 0,
         sample_memory: bool = True) -> dict[str, Any]:
    """One transfer of a ``size`` MB file, from byte ``start`` (a Range request) to the end."""
    args = [*_auth(kiln), url] if not start else [*_auth(kiln), "-H", f"Range: bytes={start}-",
                                                  url]
    want_code, want_bytes = (206, size * MB - start) if start else (200, size * MB)
    if kiln is None or not sample_memory:
        result = curl(args)
        rss = None
    else:
        with RssSampler(kiln.api.worker_pids()) as sampler:
            result = curl(args)
        rss = sampler.report()
    if result.get("http_code") != want_code or int(result.get("size_download", 0)) != want_bytes:
        raise BenchError(f"GET {url} from {start}: HTTP {result.get('http_code')}, "
                         f"{result.get('size_download')} bytes of {want_bytes}")
    return {"mb_s": want_bytes / result["time_total"] / MB, "time_total_s": result["time_total"],
            "time_starttransfer_s": result["time_starttransfer"],
            "speed_download_mb_s": result["speed_download"] / MB, "rss": rss}


def _profile(run: Run, kiln: KilnStack, engine_id: str, size: int) -> dict[str, Any]:
    out = run.artifact_path("download-profile.txt")
    log(f"{CASE}: profiling a {size} MB download with py-spy -> {out}")
    spy = profile_gunicorn(kiln.api.proc.pid, 4, out)  # type: ignore[union-attr]
    url = f"{kiln.url}/api/v1/engines/{engine_id}/artifact"
    rates = []
    import time
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        rates.append(_get(url, size, kiln, sample_memory=False)["mb_s"])
    spy.wait(timeout=60)
    summary = summarize_profile(out)
    summary.update({"file": str(out), "under_profiler_mb_s": rates})
    return summary
