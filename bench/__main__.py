"""``python -m bench``: run the benchmark suite, print one table, write the raw numbers.

    .venv/bin/python -m bench                  # everything (under 15 minutes on 2 cores)
    .venv/bin/python -m bench --quick          # smaller sizes, fewer clients, shorter runs
    .venv/bin/python -m bench --only submit --only lookup

Cases: submit (cache-hit submit), download (engine download), upload (program upload),
overhead (service overhead), single-flight, lookup (lookup at scale), quality (engine
quality). overhead, single-flight and quality share one worker and its builds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH,
    PG_SERVER,
    REDIS_URL,
    Neighbours,
    Row,
    Run,
    log,
    machine,
    py_spy_available,
)

CASE_NAMES = ["submit", "download", "upload", "overhead", "single-flight", "lookup", "quality"]
BUILD_CASES = ("overhead", "single-flight", "quality")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short run: smaller sizes, fewer clients, 3 s per load point")
    parser.add_argument("--only", action="append", default=[], metavar="CASE",
                        help=f"run only this case (repeat or comma-separate): "
                             f"{', '.join(CASE_NAMES)}")
    parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1) + 1,
                        help="gunicorn workers for Kiln and the baselines "
                             "(default: 2 x cores + 1, gunicorn's recommendation)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per wrk load point (default 8, --quick 3)")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile misses with py-spy")
    parser.add_argument("--no-setup", action="store_true",
                        help="do not run bench/setup.sh when a tool is missing")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--results", type=Path, default=BENCH / "results",
                        help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)
    only = [c.strip() for item in args.only for c in item.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CASE_NAMES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {CASE_NAMES}")
    args.cases = [c for c in CASE_NAMES if c in only] if only else list(CASE_NAMES)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 8.0
    return args


def ensure_tools(no_setup: bool) -> None:
    missing = [t for t in ("wrk", "curl") if shutil.which(t) is None]
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        missing.append("nginx")
    if not py_spy_available():
        missing.append("py-spy")
    if not missing:
        return
    if no_setup:
        raise SystemExit(f"missing tools {missing}: run bench/setup.sh")
    log(f"missing {', '.join(missing)}: running bench/setup.sh")
    subprocess.run(["bash", str(BENCH / "setup.sh")], check=True)


def check_servers() -> None:
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(PG_SERVER)
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
    except Exception as exc:
        raise SystemExit(f"PostgreSQL at {PG_SERVER} does not answer ({exc}); set "
                         "KILN_BENCH_POSTGRES_URL") from exc
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except Exception as exc:
        raise SystemExit(f"Redis at {REDIS_URL} does not answer ({exc}); set "
                         "KILN_BENCH_REDIS_URL") from exc


# ---- the table -------------------------------------------------------------------------------

def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(rows: list[Row]) -> str:
    head = ["case", "configuration", "metric", "Kiln", "baseline", "ratio", "goal", "status"]
    body = [[r.case, r.config, r.metric, fmt(r.kiln), fmt(r.baseline), fmt(r.ratio, "x"),
             r.goal or "-", r.status()] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {3, 4, 5}

    def line(cells: list[str]) -> str:
        return " | ".join(c.rjust(w) if i in right else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), "-+-".join("-" * w for w in widths)]
    out += [line(cells) for cells in body]
    if any(r.note for r in rows):
        out.append("")
        out.append("notes:")
        out += [f"  [{r.case} / {r.config} / {r.metric}] {r.note}" for r in rows if r.note]
    return "\n".join(out)


# ---- main ------------------------------------------------------------------------------------

def run_cases(run: Run, cases: list[str]) -> list[str]:
    import importlib

    def case(module: str, *extra: Any) -> Any:
        return lambda r: importlib.import_module(f"bench.{module}").run_case(r, *extra)

    plan: list[tuple[str, Any]] = [(name, case(f"case_{name}")) for name in
                                   ("submit", "lookup", "download", "upload") if name in cases]
    wanted_builds = [c for c in BUILD_CASES if c in cases]
    if wanted_builds:
        plan.append((",".join(wanted_builds), case("case_builds", wanted_builds)))
    failed = []
    for name, fn in plan:
        t0, started = time.monotonic(), time.time()
        log(f"=== {name}")
        try:
            fn(run)
        except Exception as exc:
            failed.append(name)
            tb = traceback.format_exc()
            log(f"{name} failed:\n{tb}")
            run.raw.setdefault("errors", {})[name] = tb
            run.add(Row(name, "-", "error", None, met=None,
                        note=f"ERROR: {type(exc).__name__}: {str(exc)[:300]}"))
        run.raw.setdefault("case_seconds", {})[name] = round(time.monotonic() - t0, 1)
        run.raw.setdefault("case_windows", {})[name] = (started, time.time())
        log(f"=== {name} took {time.monotonic() - t0:.0f} s")
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    ensure_tools(args.no_setup)
    check_servers()
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y-%m-%dT%H-%M-%SZ")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    run = Run(quick=args.quick, workers=args.workers, duration_s=args.duration,
              profile=not args.no_profile, work=work, results_stem=args.results / stamp)
    log(f"cases {args.cases}; gunicorn -w {args.workers}; {args.duration:g} s per load point; "
        f"scratch {work}")
    info = machine()
    try:
        with Neighbours() as neighbours:
            failed = run_cases(run, args.cases)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - t0
    result = {
        "started": started.isoformat(), "duration_s": round(elapsed, 1),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]),
        "options": {"quick": args.quick, "cases": args.cases, "gunicorn_workers": args.workers,
                    "load_point_s": args.duration},
        "machine": info, "neighbours": neighbours.report(),
        "rows": [dataclasses.asdict(r) | {"status": r.status()} for r in run.rows],
        "raw": run.raw,
    }
    out = run.results_stem.with_suffix(".json")
    out.write_text(json.dumps(result, indent=1, default=str))
    print()
    print(table(run.rows))
    print()
    misses = sum(r.met is False for r in run.rows)
    met = sum(r.met is True for r in run.rows)
    print(f"{met} goals met, {misses} missed{', errors in ' + ', '.join(failed) if failed else ''}"
          f"; ran {elapsed / 60:.1f} min on {info['cpus_logical']} cores, "
          f"{info['memory_gb']} GB; raw numbers in {out}")
    with contextlib.suppress(Exception):
        busy = result["neighbours"]["cpu_seconds_by_other_process"]
        others = sum(v for k, v in busy if not k.startswith("[stack]"))
        share = others / elapsed / (info["cpus_logical"] or 1)
        result["neighbours"]["other_share_of_machine"] = round(share, 3)
        out.write_text(json.dumps(result, indent=1, default=str))
        if busy:
            print("other processes that used CPU during the run (cpu-seconds): "
                  + "; ".join(f"{k} {v}" for k, v in busy[:6]))
        per_case = {name: neighbours.share(a, b)
                    for name, (a, b) in run.raw.get("case_windows", {}).items()}
        result["neighbours"]["other_share_by_case"] = {k: round(v, 3) for k, v in per_case.items()}
        out.write_text(json.dumps(result, indent=1, default=str))
        print("share of the machine's CPU used by other processes, by case: "
              + ", ".join(f"{k} {v:.0%}" for k, v in per_case.items()))
        if share > 0.05:
            print(f"WARNING: processes outside the suite used {share:.0%} of this machine's CPU "
                  "during the run; timings are noisier than usual")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
