"""Admin dashboard: server-rendered pages over jobs, engines, models, workers, keys and the
audit log, and the actions operators take from them.

Admins only. Sign-in checks the key (``service.auth.resolve_key``) before anything is stored;
the session (a signed, HttpOnly, SameSite=Strict cookie on ``/admin``) then holds the key's
sha256, never the key, and every request resolves it again, so a revoked key signs its
sessions out at once. Every form carries a CSRF token (Flask-WTF's ``CSRFProtect``, applied to
this blueprint only: the API authenticates with a header a browser cannot forge) and every
action is written to the audit log. Without configured API keys everyone is the local admin
and the pages are open, as the API is.

Queries live in ``service.dashboard.queries`` and the SVG charts in
``service.dashboard.charts``; the functions here turn query results into the charts each page
shows.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, CSRFProtect
from markupsafe import Markup

from service import api_keys, audit, jobs, store_budget
from service.auth import Caller, keys_configured, require_admin, resolve_key
from service.cache import CacheRequest
from service.dashboard import queries as q
from service.dashboard.charts import Axis, Bar, bar_chart, paired_bars, range_bar
from service.dashboard.charts import timeline as timeline_chart
from service.downloads import artifact_response
from service.errors import KilnError, NotFound
from service.models import ACTIVE_STATES, JOB_STATES, Engine, Job, Model, Worker, utcnow
from service.services import Services
from service.targets import BACKENDS
from service.worker_registry import live_workers

dashboard = Blueprint("dashboard", __name__, url_prefix="/admin",
                      template_folder="templates", static_folder="static")
csrf = CSRFProtect()
PUBLIC = {"dashboard.login", "dashboard.static"}
# Job timings, in the order the phases happen: (label, key in job.timings).
PHASES = (("queued", "queued_s"), ("fetch", "fetch_s"), ("load", "load_s"),
          ("build", "build_s"), ("validate", "validate_s"), ("store", "store_s"))
REFRESH_MS = {"job": 2000, "overview": 10000}
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
# A ?next= target: a path on the dashboard, nothing that could leave it or break a header.
SAFE_NEXT = re.compile(r"/admin(/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")


def services() -> Services:
    return current_app.extensions["kiln"]


def _secret_key(app: Any) -> str:
    """``KILN_SECRET_KEY``, or a random one kept in the data dir (made on first start), so
    sessions survive restarts. Several API processes must share one: set the variable."""
    if os.environ.get("KILN_SECRET_KEY"):
        return os.environ["KILN_SECRET_KEY"]
    path = Path(app.extensions["kiln"].settings.data_dir) / "dashboard_secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


@dashboard.record_once
def _configure(state: BlueprintSetupState) -> None:
    app = state.app
    if not app.secret_key:
        app.secret_key = _secret_key(app)
    app.config.update(SESSION_COOKIE_NAME="kiln_session", SESSION_COOKIE_PATH="/admin",
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      # Checked in this blueprint's before_request only (not on the API).
                      WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=None)
    csrf.init_app(app)


@dashboard.before_request
def _admins_only() -> Any:
    if request.method == "POST":
        csrf.protect()  # raises CSRFError (400) before anything else happens
    if request.endpoint in PUBLIC:
        return None
    try:
        require_admin()
    except KilnError as err:
        if err.status == 401:
            return render_template("dashboard/login.html", next=request.full_path.rstrip("?"),
                                   rejected="key_hash" in session), 401
        return render_template("dashboard/error.html", error=err, forbidden=True), err.status
    return None


@dashboard.errorhandler(NotFound)
def _not_found(err: NotFound) -> tuple[str, int]:
    return render_template("dashboard/error.html", error=err), 404


@dashboard.errorhandler(KilnError)
def _refused(err: KilnError) -> tuple[str, int]:
    return render_template("dashboard/error.html", error=err), err.status


@dashboard.errorhandler(CSRFError)
def _csrf(err: CSRFError) -> tuple[str, int]:
    error = KilnError("csrf_failed", f"{err.description} Reload the page and try again.", 400)
    return render_template("dashboard/error.html", error=error), 400


@dashboard.context_processor
def _layout() -> dict[str, Any]:
    # Who is signed in, for the header; None on the sign-in page and with no keys configured.
    who = g.get("caller")
    return {"who": who if who is not None and who.key_hash else None}


def _actor() -> Caller:
    return require_admin()


def _audit(action: str, object_type: str, object_id: str, **details: Any) -> None:
    with services().db.session() as s:
        audit.record(s, _actor().owner, action, object_type, object_id,
                     request.remote_addr or "", details)


def _next(target: str | None, default: str) -> str:
    return target if target and SAFE_NEXT.fullmatch(target) else default


# ---- sign-in ---------------------------------------------------------------------------

@dashboard.route("/login", methods=["GET", "POST"])
def login() -> Any:
    target = _next(request.values.get("next"), url_for("dashboard.overview"))
    if not keys_configured():
        return redirect(target)
    if request.method == "GET":
        return render_template("dashboard/login.html", next=target, rejected=False)
    who = resolve_key(request.form.get("key", "").strip())
    if who is None:
        return render_template("dashboard/login.html", next=target, rejected=True), 401
    if not who.is_admin:
        return render_template("dashboard/login.html", next=target, rejected=False,
                               not_admin=who.owner), 403
    session.clear()  # a new session on sign-in: nothing from before survives
    session["key_hash"] = who.key_hash
    g.caller = who
    _audit("session.sign_in", "key", who.key_id or "KILN_API_KEYS")
    return redirect(target)


@dashboard.post("/logout")
def logout() -> ResponseReturnValue:
    who = g.get("caller")
    if who is not None and who.key_hash:
        _audit("session.sign_out", "key", who.key_id or "KILN_API_KEYS")
    session.clear()
    return redirect(url_for("dashboard.login"))


# ---- pages -----------------------------------------------------------------------------

def _filters() -> q.Filters:
    args = request.args

    def text(name: str) -> str | None:
        value = args.get(name, "").strip()[:200]
        return value or None

    try:
        page = max(1, min(int(args.get("page", 1)), 100_000))
    except ValueError:
        page = 1
    return q.Filters(state=text("state"), owner=text("owner"), target=text("target"),
                     model=text("model"), q=text("q"), page=page)


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


@dashboard.get("/jobs")
def job_list() -> str:
    f = _filters()
    with services().db.session() as s:
        rows, total = q.find_jobs(s, f)
        return render_template("dashboard/jobs.html", jobs=rows, total=total, f=f,
                               pages=_pages(total), states=JOB_STATES, owners=q.owners(s),
                               targets=q.targets_in_use(s), now=utcnow())


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
    f = _filters()
    with services().db.session() as s:
        rows, total = q.find_engines(s, f)
        models = q.models_by_hash(s, (e.model_hash for e in rows))
        return render_template(
            "dashboard/engines.html", engines=rows, total=total, models=models, f=f,
            pages=_pages(total), ranges=shape_ranges(rows, models), owners=q.owners(s),
            targets=q.targets_in_use(s))


@dashboard.get("/engines/<engine_id>")
def engine_detail(engine_id: str) -> str:
    with services().db.session() as s:
        engine, models = q.get_engine(s, engine_id)
        return render_template(
            "dashboard/engine.html", engine=engine, models=models,
            ranges=shape_ranges([engine], {m.model_hash: m for m in models})[engine.id],
            benchmark_chart=benchmark_chart(engine), slower=slower_shapes(engine))


@dashboard.get("/models")
def model_list() -> str:
    f = _filters()
    with services().db.session() as s:
        rows, total = q.find_models(s, f)
        return render_template("dashboard/models.html", models=rows, total=total, f=f,
                               pages=_pages(total), owners=q.owners(s))


@dashboard.get("/workers")
def workers() -> str:
    settings = services().settings
    with services().db.session() as s:
        return render_template("dashboard/workers.html",
                               workers=q.workers_history(s, settings.worker_ttl_s),
                               queues=q.queue_depth(s), ttl_s=settings.worker_ttl_s)


@dashboard.get("/trends")
def trends() -> str:
    with services().db.session() as s:
        days = q.finished_per_day(s)
        by_target = q.build_seconds_by_target(s)
        growth = q.store_growth(s)
        usage = q.usage_by_owner(s)
        evictions = q.evictions_per_day(s)
    return render_template("dashboard/trends.html", failure_chart=failure_chart(days),
                           finished=sum(d.finished for d in days),
                           build_rows=build_percentiles(by_target),
                           store_chart=store_chart(growth), usage=usage,
                           usage_chart=usage_chart(usage),
                           eviction_chart=eviction_chart(evictions))


@dashboard.get("/keys")
def keys() -> str:
    with services().db.session() as s:
        return render_template("dashboard/keys.html", keys=api_keys.list_keys(s),
                               env_keys=sorted({(o, r) for o, r in
                                                services().settings.api_keys.values()}),
                               roles=api_keys.ROLES, created=None)


@dashboard.get("/audit")
def audit_log() -> str:
    f = _filters()
    with services().db.session() as s:
        rows, total = audit.entries(s, actor=f.owner, action=f.state, object_id=f.q,
                                    offset=f.offset, limit=q.PAGE_SIZE)
        return render_template("dashboard/audit.html", entries=rows, total=total, f=f,
                               pages=_pages(total), actions=audit.ACTIONS)


def _pages(total: int) -> int:
    return max(1, -(-total // q.PAGE_SIZE))


# ---- actions: each a POST with a CSRF token, each audited --------------------------------

def _back(default: str) -> ResponseReturnValue:
    return redirect(_next(request.form.get("next"), default))


@dashboard.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> ResponseReturnValue:
    job = jobs.cancel(services(), job_id, None)
    _audit("job.cancel", "job", job.id, owner=job.owner)
    flash(f"Cancelled job {job.id}.")
    return _back(url_for("dashboard.job_detail", job_id=job.id))


@dashboard.post("/jobs/<job_id>/retry")
def retry_job(job_id: str) -> ResponseReturnValue:
    """Submit the job's request again, as its owner, with reuse=never (it must build)."""
    with services().db.session() as s:
        job, _ = q.get_job(s, job_id)
        if job.status not in ("failed", "cancelled"):
            raise KilnError("job_not_retryable",
                            f"job {job_id} is {job.status}: only failed or cancelled jobs are "
                            "retried", 409, {"status": job.status})
        request_ = CacheRequest(
            model_id=job.model_id, backend=job.backend, device=job.device, arch=job.arch,
            toolchain=job.toolchain_id, options=job.options, reuse="never",
            inputs=[{k: p[k] for k in ("name", "min", "opt", "max")} for p in job.profile])
        owner = job.owner
    result = jobs.submit(services(), owner, request_)
    if result.job is None:
        raise KilnError("internal_error", "the retry answered no job", 500)
    _audit("job.retry", "job", job_id, new_job=result.job.id, submit=result.status)
    flash(f"Retried job {job_id} as {result.job.id} ({result.status}).")
    return redirect(url_for("dashboard.job_detail", job_id=result.job.id))


def _set_pinned(engine_id: str, pinned: bool) -> ResponseReturnValue:
    with services().db.session() as s:
        engine = s.get(Engine, engine_id)
        if engine is None:
            raise NotFound("engine", engine_id)
        engine.pinned = pinned
        audit.record(s, _actor().owner, "engine.pin" if pinned else "engine.unpin", "engine",
                     engine_id, request.remote_addr or "")
    flash(f"{'Pinned' if pinned else 'Unpinned'} engine {engine_id}.")
    return _back(url_for("dashboard.engine_detail", engine_id=engine_id))


@dashboard.post("/engines/<engine_id>/pin")
def pin_engine(engine_id: str) -> ResponseReturnValue:
    return _set_pinned(engine_id, True)


@dashboard.post("/engines/<engine_id>/unpin")
def unpin_engine(engine_id: str) -> ResponseReturnValue:
    return _set_pinned(engine_id, False)


@dashboard.post("/engines/<engine_id>/evict")
def evict_engine(engine_id: str) -> ResponseReturnValue:
    report = store_budget.evict(services(), engine_id)
    _audit("engine.evict", "engine", engine_id,
           freed_bytes=report.bytes_before - report.bytes_after)
    flash(f"Evicted engine {engine_id}.")
    return redirect(url_for("dashboard.engines"))


@dashboard.post("/engines/<engine_id>/download")
def download_engine(engine_id: str) -> Response:
    with services().db.session() as s:
        engine = s.get(Engine, engine_id)
        if engine is None:
            raise NotFound("engine", engine_id)
        engine.last_used_at = utcnow()  # as the API's download: eviction spares it meanwhile
        audit.record(s, _actor().owner, "engine.download", "engine", engine_id,
                     request.remote_addr or "", {"sha256": engine.sha256})
    suffix = engine.build_report.get("artifact_suffix") or BACKENDS.get(
        engine.backend, {}).get("suffix", ".bin")
    return artifact_response(services().store, engine.artifact_uri, engine.sha256, engine.size,
                             f"{engine.id}{suffix}")


@dashboard.post("/keys")
def create_key() -> tuple[str, int, dict[str, str]]:
    with services().db.session() as s:
        new = api_keys.create(s, request.form.get("owner", ""), request.form.get("role", ""),
                              request.form.get("note", ""), created_by=_actor().owner)
        audit.record(s, _actor().owner, "key.create", "key", new.row.id,
                     request.remote_addr or "", {"owner": new.row.owner, "role": new.row.role})
    with services().db.session() as s:
        page = render_template("dashboard/keys.html", keys=api_keys.list_keys(s),
                               env_keys=sorted({(o, r) for o, r in
                                                services().settings.api_keys.values()}),
                               roles=api_keys.ROLES, created=new)
    # The key is in this page only: never cached, never shown again.
    return page, 201, {"Cache-Control": "no-store"}


@dashboard.post("/keys/<key_id>/revoke")
def revoke_key(key_id: str) -> ResponseReturnValue:
    with services().db.session() as s:
        row = api_keys.revoke(s, key_id)
        audit.record(s, _actor().owner, "key.revoke", "key", key_id, request.remote_addr or "",
                     {"owner": row.owner})
    flash(f"Revoked key {key_id} ({row.owner}).")
    return redirect(url_for("dashboard.keys"))


@dashboard.post("/workers/<worker_id>/drain")
def drain_worker(worker_id: str) -> ResponseReturnValue:
    """The worker finishes its current job and takes no more (it reads the flag on its next
    heartbeat and stops consuming)."""
    with services().db.session() as s:
        worker = s.get(Worker, worker_id)
        if worker is None:
            raise NotFound("worker", worker_id)
        if worker.drain_requested_at is None:
            worker.drain_requested_at = utcnow()
        audit.record(s, _actor().owner, "worker.drain", "worker", worker_id,
                     request.remote_addr or "", {"current_job": worker.current_job_id})
    flash(f"Draining worker {worker_id}: it finishes its job and takes no more.")
    return redirect(url_for("dashboard.workers"))


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
    # Bars, each with its number of submissions above it: an hour of history is one labelled
    # bar ("40%, 5 submissions"), not a lone dot with no line to read it against.
    bars = [Bar(_bucket_label(b.start, window),
                [("hit-rate", 100 * b.hit_rate)] if b.hit_rate is not None else [],
                title=f"{_bucket_label(b.start, window)}: {100 * (b.hit_rate or 0):.0f}% of "
                      f"{b.total} submissions", note=str(b.total) if b.total else "")
            for b in buckets]
    unit = q.WINDOWS[window][1]
    return bar_chart(bars, scale=(100, 25), unit="%", height=170,
                     label=f"cache hit rate per {unit}, UTC", x_title=f"{unit} (UTC); "
                     "the number above a bar is its submissions", y_title="hit rate")


def volume_chart(buckets: list[q.Outcomes], window: str) -> Markup:
    bars = [Bar(_bucket_label(b.start, window),
                [(o, b.counts[o]) for o in q.OUTCOMES if b.counts[o]],
                title=f"{_bucket_label(b.start, window)}: " + ", ".join(
                    f"{b.counts[o]} {o}" for o in q.OUTCOMES))
            for b in buckets]
    return bar_chart(bars, height=170, label="submissions by outcome",
                     x_title=f"{q.WINDOWS[window][1]} (UTC)", y_title="submissions")


def build_chart(builds: list[tuple[Job, float]]) -> Markup:
    bars = [Bar("", [(job.backend, seconds)], href=url_for(".job_detail", job_id=job.id),
                title=f"{job.id} · {job.backend}/{job.device} · build {seconds:.1f} s")
            for job, seconds in builds]
    return bar_chart(bars, unit="s", height=240, x_title="recent successful jobs, oldest first",
                     y_title="build time", label="build seconds of recent successful jobs")


def failure_chart(days: list[q.DayOutcome]) -> Markup:
    bars = [Bar(d.start.strftime("%b %d"),
                [("failed-rate", 100 * d.failed / d.finished)] if d.finished else [],
                title=f"{d.start:%b %d}: {d.failed} failed of {d.finished} finished "
                      f"({d.succeeded} succeeded, {d.cancelled} cancelled)",
                note=f"{d.failed}/{d.finished}" if d.finished else "")
            for d in days]
    return bar_chart(bars, scale=(100, 25), unit="%", height=190, max_labels=7,
                     label="failure rate per day", x_title="day (UTC); failed/finished above",
                     y_title="failed")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    # Nearest rank: the value at or above ``share`` of the builds, one that really happened.
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def build_percentiles(by_target: dict[str, list[float]]) -> dict[str, Any]:
    rows = [(target, _percentile(v, 0.5), _percentile(v, 0.95), len(v))
            for target, v in sorted(by_target.items())]
    chart = paired_bars([(f"{t} (n={n})", p50, p95) for t, p50, p95, n in rows], ("p50", "p95"),
                        unit=" s", width=760, label="build seconds by target, p50 and p95")
    return {"rows": rows, "chart": chart}


def store_chart(growth: list[tuple[datetime, int, int]]) -> Markup:
    bars = [Bar(day.strftime("%b %d"), [("store", size / 2**20)],
                title=f"{day:%b %d}: {filesize(size)}, {added} engines added",
                note=f"+{added}" if added else "") for day, size, added in growth]
    return bar_chart(bars, unit=" MiB", height=190, max_labels=7,
                     label="store size at the end of each day",
                     x_title="day (UTC); engines added above", y_title="stored")


def eviction_chart(days: list[tuple[datetime, int]]) -> Markup:
    bars = [Bar(day.strftime("%b %d"), [("evicted", n)] if n else [],
                title=f"{day:%b %d}: {n} evicted", note=str(n) if n else "") for day, n in days]
    return bar_chart(bars, height=150, max_labels=7, label="engines evicted per day",
                     x_title="day (UTC)", y_title="evicted")


def usage_chart(usage: list[tuple[str, int, int]]) -> Markup:
    return paired_bars([(owner, n, cached) for owner, n, cached in usage],
                       ("submitted", "cached"), width=760,
                       label="submissions per user in 30 days, and those the cache answered")


def job_phases(job: Job, now: datetime) -> list[tuple[str, float]]:
    """Seconds per phase. A running attempt has no timings yet: show time spent so far."""
    done = [(name, float(job.timings[key])) for name, key in PHASES if job.timings.get(key)]
    if job.status == "failed" and job.started_at and job.finished_at:
        # The phase that failed has no timing of its own: it is the first one not timed,
        # and it lasted what the attempt took beyond the timed phases.
        timed = {name for name, _ in done}
        failing = next((name for name, _ in PHASES if name not in timed and name != "queued"),
                       "build")
        spent = sum(v for name, v in done if name != "queued")
        rest = (job.finished_at - job.started_at).total_seconds() - spent
        return [*done, (f"{failing} (failed)", max(rest, 0.01))]
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


@dashboard.app_template_filter("plain")
def plain(text: str | None) -> str:
    """Terminal text without its colour codes (compilers colour their errors)."""
    return ANSI.sub("", text or "")


@dashboard.app_template_filter("utc")
def utc(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else "–"
