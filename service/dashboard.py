"""Admin dashboard: server-rendered pages over jobs, workers, the engine cache and the store.

Admins only. Browsers cannot send a Bearer header, so ``/admin/login`` stores the key in an
HttpOnly, SameSite=Strict cookie that ``service.auth`` accepts for these pages (and only these:
they are read-only, so the cookie can never be used to change anything). Without configured
API keys everyone is the local admin and the pages are open.

Queries live in ``service.dashboard_queries`` and the SVG charts in ``service.dashboard_charts``;
the functions here turn query results into the charts each page shows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from markupsafe import Markup

from service import dashboard_queries as q
from service.auth import require_admin
from service.dashboard_charts import Axis, Bar, bar_chart, line_chart, paired_bars, range_bar
from service.dashboard_charts import timeline as timeline_chart
from service.errors import KilnError, NotFound
from service.models import ACTIVE_STATES, JOB_STATES, Engine, Job, Model, utcnow
from service.services import Services
from service.worker_registry import live_workers

dashboard = Blueprint("dashboard", __name__, url_prefix="/admin",
                      template_folder="templates", static_folder="static")
COOKIE = "kiln_key"
PUBLIC = {"dashboard.login", "dashboard.static"}
# Job timings, in the order the phases happen: (label, key in job.timings).
PHASES = (("queued", "queued_s"), ("fetch", "fetch_s"), ("load", "load_s"),
          ("build", "build_s"), ("validate", "validate_s"), ("store", "store_s"))
REFRESH_MS = {"job": 2000, "overview": 10000}


def services() -> Services:
    return current_app.extensions["kiln"]


@dashboard.before_request
def _admins_only() -> tuple[str, int] | None:
    if request.endpoint in PUBLIC:
        return None
    try:
        require_admin()
    except KilnError as err:
        if err.status == 401:
            return render_template("dashboard/login.html", next=request.full_path,
                                   rejected=COOKIE in request.cookies), 401
        return render_template("dashboard/error.html", error=err), err.status
    return None


@dashboard.errorhandler(NotFound)
def _not_found(err: NotFound) -> tuple[str, int]:
    return render_template("dashboard/error.html", error=err), 404


@dashboard.context_processor
def _layout() -> dict[str, Any]:
    # Who is signed in, for the header; None on the sign-in page and with no keys configured.
    who = g.get("caller") if services().settings.api_keys else None
    return {"who": who}


# ---- sign-in ---------------------------------------------------------------------------

@dashboard.route("/login", methods=["GET", "POST"])
def login() -> Response | str:
    target = request.values.get("next", "")
    # Never redirect off the dashboard, nor with control characters (CR/LF split headers).
    if not target.startswith("/admin") or any(ord(ch) < 32 or ch == "\\" for ch in target):
        target = url_for("dashboard.overview")
    if not services().settings.api_keys:
        return redirect(target)
    if request.method == "GET":
        return render_template("dashboard/login.html", next=target, rejected=False)
    response = redirect(target)
    response.set_cookie(COOKIE, request.form.get("key", "").strip(), httponly=True,
                        samesite="Strict", secure=request.is_secure, path="/admin")
    return response


@dashboard.post("/logout")
def logout() -> Response:
    response = redirect(url_for("dashboard.login"))
    response.delete_cookie(COOKIE, path="/admin")
    return response


# ---- pages -----------------------------------------------------------------------------

@dashboard.get("/")
def overview() -> str:
    window = request.args.get("window", "24h")
    window = window if window in q.WINDOWS else "24h"
    status = request.args.get("status") if request.args.get("status") in JOB_STATES else None
    settings = services().settings
    with services().db.session() as s:
        buckets = q.hit_rate_series(s, window)
        builds = q.recent_builds(s)
        return render_template(
            "dashboard/overview.html", refresh_ms=REFRESH_MS["overview"],
            counts=q.job_counts(s), workers=live_workers(s, settings.worker_ttl_s),
            window=window, windows=list(q.WINDOWS), window_total=_sum_outcomes(buckets),
            overall=q.outcomes_total(s), hit_rate_chart=hit_rate_chart(buckets, window),
            volume_chart=volume_chart(buckets, window), build_chart=build_chart(builds),
            build_backends=sorted({job.backend for job, _ in builds}),
            jobs=q.recent_jobs(s, status), status=status,
            store=q.store_usage(s, settings.store_budget_bytes), now=utcnow())


@dashboard.get("/jobs/<job_id>")
def job_detail(job_id: str) -> str:
    with services().db.session() as s:
        job, model = q.get_job(s, job_id)
        active = job.status in ACTIVE_STATES
        phases = job_phases(job, utcnow())
        return render_template(
            "dashboard/job.html", job=job, model=model, phases=phases,
            timings=ordered_timings(job.timings),
            timeline=timeline_chart(phases, label=f"phases of job {job.id}"),
            refresh_ms=REFRESH_MS["job"] if active else None)


@dashboard.get("/engines")
def engines() -> str:
    backend = request.args.get("backend") or None
    with services().db.session() as s:
        rows, total = q.list_engines(s, backend)
        models = q.models_by_hash(s, (e.model_hash for e in rows))
        return render_template(
            "dashboard/engines.html", engines=rows, total=total, models=models,
            ranges=shape_ranges(rows, models), backend=backend, backends=q.backends_in_use(s))


@dashboard.get("/engines/<engine_id>")
def engine_detail(engine_id: str) -> str:
    with services().db.session() as s:
        engine, models = q.get_engine(s, engine_id)
        return render_template(
            "dashboard/engine.html", engine=engine, models=models,
            ranges=shape_ranges([engine], {m.model_hash: m for m in models})[engine.id],
            benchmark_chart=benchmark_chart(engine), slower=slower_shapes(engine))


# ---- from data to charts ------------------------------------------------------------------

def _sum_outcomes(buckets: list[q.Outcomes]) -> q.Outcomes:
    total = q.Outcomes()
    for b in buckets:
        for k, v in b.counts.items():
            total.counts[k] += v
    return total


def _bucket_label(start: datetime | None, window: str) -> str:
    if start is None:
        return ""
    return start.strftime("%H:00") if q.WINDOWS[window][1] == "hour" else start.strftime("%b %d")


def hit_rate_chart(buckets: list[q.Outcomes], window: str) -> Markup:
    points = [(_bucket_label(b.start, window),
               None if b.hit_rate is None else 100 * b.hit_rate) for b in buckets]
    return line_chart(points, scale=(100, 25), unit="%", name="hit-rate",
                      label=f"cache hit rate per {q.WINDOWS[window][1]}, UTC")


def volume_chart(buckets: list[q.Outcomes], window: str) -> Markup:
    bars = [Bar(_bucket_label(b.start, window),
                [(o, b.counts[o]) for o in q.OUTCOMES if b.counts[o]],
                title=f"{_bucket_label(b.start, window)}: " + ", ".join(
                    f"{b.counts[o]} {o}" for o in q.OUTCOMES))
            for b in buckets]
    return bar_chart(bars, height=150, label="submissions by outcome")


def build_chart(builds: list[tuple[Job, float]]) -> Markup:
    bars = [Bar("", [(job.backend, seconds)], href=url_for(".job_detail", job_id=job.id),
                title=f"{job.id} · {job.backend}/{job.device} · build {seconds:.1f} s")
            for job, seconds in builds]
    return bar_chart(bars, unit="s", height=230,
                     label="build seconds of recent successful jobs")


def job_phases(job: Job, now: datetime) -> list[tuple[str, float]]:
    """Seconds per phase. A running attempt has no timings yet: show time spent so far."""
    done = [(name, float(job.timings[key])) for name, key in PHASES if job.timings.get(key)]
    if done or job.status not in ACTIVE_STATES:
        return done
    waiting_since = job.enqueued_at or job.created_at
    if job.status == "queued" or job.started_at is None:
        return [("queued", (now - waiting_since).total_seconds())]
    current = "build" if job.status == "building" else "validate"
    return [("queued", max((job.started_at - waiting_since).total_seconds(), 0)),
            (current, (now - job.started_at).total_seconds())]


def ordered_timings(timings: dict[str, float]) -> list[tuple[str, float]]:
    """Phase timings in the order the phases happen, then any others (``child_s``) by name."""
    keys = [key for _, key in PHASES if key in timings]
    return [(key, timings[key]) for key in keys + sorted(set(timings) - set(keys))]


def shape_ranges(engines: list[Engine], models: dict[str, Model]
                 ) -> dict[str, list[dict[str, Any]]]:
    """For each engine, one drawn range per dynamic dim (min != max).

    Dims that are one symbol in the program (a batch dim shared by two inputs) and have the
    same range are drawn once, labelled with all of them. Engines of the same graph share an
    axis per dim, so their ranges line up for comparison.
    """
    rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {e.id: {} for e in engines}
    extent: dict[tuple[str, str], tuple[int, int]] = {}
    for e in engines:
        symbols = _dim_symbols(models.get(e.model_hash))
        for p in e.profile:
            for i, (lo, opt, hi) in enumerate(zip(p["min"], p["opt"], p["max"])):
                if lo == hi:
                    continue
                dim = f"{p['name']}[{i}]"
                row = rows[e.id].setdefault((symbols.get(dim, dim), lo, opt, hi), {
                    "dims": [], "min": lo, "opt": opt, "max": hi})
                row["dims"].append(dim)
    for e in engines:  # label each range and widen its axis to cover it
        for row in rows[e.id].values():
            row["label"] = ", ".join(row["dims"])
            key = (e.graph_hash, row["label"])
            lo, hi = extent.get(key, (row["min"], row["max"]))
            extent[key] = (min(lo, row["min"]), max(hi, row["max"]))
    return {e.id: [{**row, "svg": range_bar(row["min"], row["opt"], row["max"],
                                            Axis.fit(*extent[(e.graph_hash, row["label"])]),
                                            label=row["label"])}
                   for row in rows[e.id].values()]
            for e in engines}


def _dim_symbols(model: Model | None) -> dict[str, str]:
    """``{"x[0]": "s31", ...}`` from the program's signature: which dims are one symbol."""
    if model is None:
        return {}
    return {f"{spec['name']}[{i}]": dim["symbol"]
            for spec in model.signature.get("inputs", [])
            for i, dim in enumerate(spec["shape"]) if isinstance(dim, dict) and "symbol" in dim}


def benchmark_chart(engine: Engine) -> Markup:
    rows = [(label, b["engine_ms"], b["eager_ms"])
            for label, b in engine.benchmark.get("shapes", {}).items()
            if b.get("engine_ms") is not None and b.get("eager_ms") is not None]
    return paired_bars(rows, ("engine", "eager"), unit=" ms", width=1000,
                       label="median latency, engine vs eager")


def slower_shapes(engine: Engine) -> list[str]:
    return [label for label, b in engine.benchmark.get("shapes", {}).items()
            if b.get("slower_than_eager")]


# ---- template filters ---------------------------------------------------------------------

@dashboard.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} m"


@dashboard.app_template_filter("ago")
def ago(when: datetime | None) -> str:
    if when is None:
        return "–"
    seconds = max((utcnow() - when).total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


@dashboard.app_template_filter("filesize")
def filesize(n: int | None) -> str:
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dashboard.app_template_filter("percent")
def percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


@dashboard.app_template_filter("utc")
def utc(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else "–"
