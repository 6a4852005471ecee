"""Cache-hit submit: ``POST /api/v1/jobs`` answered 200 ``cached`` from a stored engine, under
wrk at 1..64 concurrent connections, against a trivial Flask endpoint on the same gunicorn."""

from __future__ import annotations

import json
from typing import Any

import requests
from sqlalchemy import func, select

from bench.common import (
    BenchError,
    Gunicorn,
    Row,
    Run,
    log,
    profile_gunicorn,
    profile_note,
    py_spy_available,
    summarize_profile,
    wrk,
)
from bench.kiln import KilnStack, ensure_programs, kiln_stack, synthetic_target
from service.models import Engine, Submission

CASE = "cache-hit submit"
P99_GOAL_RATIO = 3.0  # p99 at most 3x the trivial endpoint's, at P99_GOAL_CLIENTS
P99_GOAL_CLIENTS = 32
RPS_GOAL = 0.5

# What clients ask for: a narrower range than the stored engine's, so the lookup runs the
# covering check (the default reuse mode), not only an exact match.
REQUEST_INPUTS = [{"name": "x", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32],
                   "max": [16, 3, 32, 32]}]


def prepare(kiln: KilnStack, program: Any) -> tuple[bytes, str]:
    """Upload the program, store one engine for it, and check a submit is a cache hit; requests
    authenticate with a database key, as in production."""
    kiln.create_key()
    target = synthetic_target()
    kiln.add_fake_worker(target)
    model = kiln.upload(program)
    engine = kiln.insert_engine(kiln.model_row(model["id"]), target,
                                kiln.default_profile(model["id"]))
    body = json.dumps({"model_id": model["id"], "backend": "aoti", "device": "cpu",
                       "inputs": REQUEST_INPUTS}).encode()
    resp = requests.post(f"{kiln.url}/api/v1/jobs", data=body, timeout=30,
                         headers={"Content-Type": "application/json", **kiln.headers})
    if resp.status_code != 200 or resp.json().get("status") != "cached":
        raise BenchError(f"a submit is not a cache hit: {resp.status_code} {resp.text[:500]}")
    return body, engine.id


def counts(kiln: KilnStack, engine_id: str) -> tuple[int, int]:
    """(submissions recorded as cached, the engine's hit counter)."""
    # One statement, so one snapshot: a hit committing meanwhile is in both numbers or neither
    # (its count and its submission row commit together).
    cached = select(func.count()).select_from(Submission).where(
        Submission.outcome == "cached").scalar_subquery()
    hits = select(Engine.hits).where(Engine.id == engine_id).scalar_subquery()
    with kiln.db.session() as s:
        row = s.execute(select(cached, hits)).one()
    return int(row[0] or 0), int(row[1] or 0)


def measure(url: str, body: bytes, clients: int, duration: float,
            api_key: str | None) -> dict[str, Any]:
    wrk(url, clients, min(2.0, duration), method="POST", body=body, api_key=api_key)  # warm-up
    return wrk(url, clients, duration, method="POST", body=body, api_key=api_key)


def run_case(run: Run) -> None:
    levels = [1, 32] if run.quick else [1, 8, 32, 64]
    program = ensure_programs(run, ["convnet"])["convnet"]
    raw: dict[str, Any] = {"levels": levels, "gunicorn_workers": run.workers,
                           "worker_class": "sync", "kiln": {}, "baseline": {}, "sqlite": {}}
    run.raw[CASE] = raw
    with kiln_stack(run, "submit") as kiln, Gunicorn(
            "bench.baseline_app:create_app()", {}, run.workers,
            run.work / "submit" / "baseline-gunicorn.log") as base:
        body, engine_id = prepare(kiln, program)
        raw["request_body"] = json.loads(body)
        for clients in levels:
            before = counts(kiln, engine_id)
            k = measure(f"{kiln.url}/api/v1/jobs", body, clients, run.duration_s, kiln.api_key)
            after = counts(kiln, engine_id)
            b = measure(f"{base.url}/api/v1/jobs", body, clients, run.duration_s, kiln.api_key)
            k["submissions_cached"] = after[0] - before[0]
            k["hits_counted"] = after[1] - before[1]
            raw["kiln"][clients], raw["baseline"][clients] = k, b
            log(f"{CASE}: c={clients} kiln {k['rps']:.0f} req/s p99 {k['p99_ms']:.1f} ms | "
                f"baseline {b['rps']:.0f} req/s p99 {b['p99_ms']:.1f} ms")
            _rows(run, clients, k, b)
        hits = sum(raw["kiln"][c]["submissions_cached"] for c in levels)
        counted = sum(raw["kiln"][c]["hits_counted"] for c in levels)
        run.add(Row(CASE, "PostgreSQL, all levels", "hits counted %", 100 * counted / hits,
                    goal="100% (correctness check)", met=counted == hits, unit="%",
                    note=f"engine.hits grew by {counted} for {hits} cached submits recorded; "
                    "the increment is one SQL UPDATE (hits = hits + 1), so a shortfall means "
                    "hits were lost on the way (look at errors and batching)" if counted != hits
                    else f"{counted} of {hits} cached submits counted"))
        if run.profile and py_spy_available() and _missed(run):
            raw["profile"] = _profile(run, kiln, body)
            note = profile_note(raw["profile"])
            for row in run.rows:
                if row.case == CASE and row.config == f"PostgreSQL, c={P99_GOAL_CLIENTS}" \
                        and row.met is False:
                    row.note = "; ".join(x for x in (row.note, note) if x)
    # The embedded default (SQLite), for comparison only: not how production serves.
    for clients in ([32] if run.quick else [1, 32]):
        with kiln_stack(run, "submit-sqlite", database="sqlite") as kiln:
            body, engine_id = prepare(kiln, program)
            k = measure(f"{kiln.url}/api/v1/jobs", body, clients, run.duration_s, kiln.api_key)
            raw["sqlite"][clients] = k
            run.add(Row(CASE, f"SQLite (embedded default), c={clients}", "req/s", k["rps"],
                        unit="req/s", note=f"p50 {k['p50_ms']:.1f} ms, p99 {k['p99_ms']:.1f} ms"
                        + _error_note(k)))


def _error_note(k: dict[str, Any]) -> str:
    if not k["error_count"]:
        return ""
    return f"; {k['error_count']} errors {k['errors']}"


def _rows(run: Run, clients: int, k: dict[str, Any], b: dict[str, Any]) -> None:
    config = f"PostgreSQL, c={clients}"
    p99_goal = clients == P99_GOAL_CLIENTS
    run.add(Row(CASE, config, "p50 ms", k["p50_ms"], b["p50_ms"], k["p50_ms"] / b["p50_ms"],
                unit="ms"))
    run.add(Row(CASE, config, "p99 ms", k["p99_ms"], b["p99_ms"], k["p99_ms"] / b["p99_ms"],
                goal=f"<= {P99_GOAL_RATIO:g}x baseline" if p99_goal else "",
                met=(k["p99_ms"] <= P99_GOAL_RATIO * b["p99_ms"]) if p99_goal else None,
                unit="ms"))
    note = _error_note(k).lstrip("; ")
    run.add(Row(CASE, config, "req/s", k["rps"], b["rps"], k["rps"] / b["rps"],
                goal=f">= {RPS_GOAL:.0%} of baseline", met=k["rps"] >= RPS_GOAL * b["rps"]
                and not k["error_count"], unit="req/s", note=note))


def _missed(run: Run) -> bool:
    return any(r.case == CASE and r.met is False for r in run.rows)


def _profile(run: Run, kiln: KilnStack, body: bytes) -> dict[str, Any]:
    """py-spy on every gunicorn worker while wrk drives the goal's concurrency."""
    out = run.artifact_path("submit-profile.txt")
    log(f"{CASE}: profiling c={P99_GOAL_CLIENTS} with py-spy -> {out}")
    seconds = max(5.0, run.duration_s)
    spy = profile_gunicorn(kiln.api.proc.pid, seconds + 1, out)  # type: ignore[union-attr]
    load = wrk(f"{kiln.url}/api/v1/jobs", P99_GOAL_CLIENTS, seconds, method="POST", body=body,
               api_key=kiln.api_key)
    spy.wait(timeout=120)
    summary = summarize_profile(out)
    summary.update({"file": str(out), "under_profiler": {
        "rps": load["rps"], "p99_ms": load["p99_ms"]}})
    return summary
