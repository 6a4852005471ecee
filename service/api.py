"""REST API v1. Handlers parse, call one function, and serialise; errors are KilnError."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from spectree import Response as Resp
from spectree import SpecTree
from sqlalchemy import func, select

from service import api_keys, engine_cache, job_events, jobs, uploads
from service.auth import caller, require_admin
from service.downloads import artifact_response
from service.errors import KilnError, NotFound
from service.models import Engine, Job, Model, utcnow
from service.profiles import covers, resolve_profile
from service.schemas import (
    EngineQuery,
    Error,
    JobRequest,
    engine_json,
    job_json,
    model_json,
    worker_json,
)
from service.services import Services
from service.targets import BACKENDS, normalize_options
from service.worker_registry import live_workers


def _before(req: Any, resp: Any, err: Exception | None, instance: Any, adapter: Any) -> None:
    # Spectree's own validation errors leave in Kiln's one error shape.
    if err is not None:
        raise KilnError("invalid_request", "the request does not match the API schema",
                        400, {"errors": [
                            {"field": ".".join(str(p) for p in e.get("loc", ())),
                             "message": e.get("msg", "")}
                            for e in adapter.validation_errors(err)]})


spec = SpecTree("flask", title="Kiln API", version="v1", path="api/v1/docs", before=_before,
                validation_error_status=400, annotations=True)
api = Blueprint("api", __name__, url_prefix="/api/v1")
ERRORS = {"HTTP_400": Error, "HTTP_404": Error}


def services() -> Services:
    return current_app.extensions["kiln"]


def _visible_engine(session: Any, engine_id: str) -> Engine:
    """An engine the caller may see: admins see all; users, engines of models they own."""
    engine = session.get(Engine, engine_id)
    scope = caller().scope
    if engine is None or (scope is not None and not session.scalar(select(func.count()).where(
            Model.owner == scope, Model.model_hash == engine.model_hash))):
        raise NotFound("engine", engine_id)
    return engine


@api.post("/models")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_201=None, HTTP_400=Error, HTTP_413=Error),
               tags=["models"])
def upload_model() -> tuple[Response, int]:
    """Upload a torch.export program (.pt2): raw body, or multipart field `file`."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise KilnError("missing_file", "multipart upload needs a field named 'file'")
        stream, filename = upload.stream, upload.filename or "model.pt2"
    else:
        stream, filename = request.stream, request.args.get("filename", "model.pt2")
    model, created = uploads.save_upload(services(), caller().owner, stream, filename)
    return jsonify(model_json(model)), 201 if created else 200


@api.get("/models")
@spec.validate(tags=["models"])
def list_models() -> Response:
    with services().db.session() as s:
        q = select(Model).order_by(Model.created_at.desc()).limit(500)
        if caller().scope:
            q = q.where(Model.owner == caller().scope)
        # Clients hash locally and skip the upload when the caller already has these bytes.
        for field in ("sha256", "model_hash"):
            if request.args.get(field):
                q = q.where(getattr(Model, field) == request.args[field])
        return jsonify({"models": [model_json(m) for m in s.scalars(q)]})


@api.get("/models/<model_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["models"])
def get_model(model_id: str) -> Response:
    with services().db.session() as s:
        return jsonify(model_json(jobs.get_model(s, model_id, caller().scope)))


@api.post("/jobs")
@spec.validate(json=JobRequest, resp=Resp(HTTP_200=None, HTTP_202=None, HTTP_400=Error,
                                          HTTP_404=Error, HTTP_503=Error), tags=["jobs"])
def submit_job(json: JobRequest) -> tuple[Response, int]:
    """Submit a compile job; answered from the cache (200) or queued/joined (202)."""
    with services().db.session() as s:
        api_keys.limit_submissions(s, caller().key_hash)
    result = jobs.submit(services(), caller().owner, json.model_dump(exclude_none=False))
    if result.status == "cached":
        assert result.engine is not None
        return jsonify({"status": "cached", "engine_id": result.engine.id,
                        "reason": result.reason, "engine": engine_json(result.engine)}), 200
    assert result.job is not None
    return jsonify({**job_json(result.job), "submit": result.status,
                    "reason": result.reason}), 202


@api.get("/jobs")
@spec.validate(tags=["jobs"])
def list_jobs() -> Response:
    with services().db.session() as s:
        q = select(Job).order_by(Job.created_at.desc()).limit(200)
        if caller().scope:
            q = q.where(Job.owner == caller().scope)
        if request.args.get("status"):
            q = q.where(Job.status == request.args["status"])
        return jsonify({"jobs": [job_json(j, log_tail=0) for j in s.scalars(q)]})


@api.get("/jobs/<job_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["jobs"])
def get_job(job_id: str) -> Response:
    with services().db.session() as s:
        return jsonify(job_json(jobs.get_job(s, job_id, caller().scope)))


@api.get("/jobs/<job_id>/log")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["jobs"])
def get_job_log(job_id: str) -> Response:
    with services().db.session() as s:
        job = jobs.get_job(s, job_id, caller().scope)
        return Response(job.log, mimetype="text/plain")


# Not wrapped by spectree: its response check would read the whole (endless) stream.
@api.get("/jobs/<job_id>/events")
def job_events_stream(job_id: str) -> Response:
    """The job's state changes (and log lines with ?log=1) as Server-Sent Events."""
    with services().db.session() as s:
        jobs.get_job(s, job_id, caller().scope)
    frames = job_events.stream(services().db, job_id, request.headers.get("Last-Event-ID"),
                               request.args.get("log", "0") not in ("0", "false", ""))
    return Response(frames, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api.delete("/jobs/<job_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error, HTTP_409=Error), tags=["jobs"])
def cancel_job(job_id: str) -> Response:
    return jsonify(job_json(jobs.cancel(services(), job_id, caller().scope)))


def _parse_covers(items: list[str]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        try:
            name, rng = item.split(":", 1)
            lo, hi = (list(map(int, s.split("x"))) for s in rng.split(","))
        except ValueError as exc:
            raise KilnError("bad_covers", f"covers={item!r}: write NAME:MIN,MAX with shapes "
                            "like 1x3x224x224", details={"covers": item}) from exc
        out.append({"name": name, "min": lo, "max": hi})
    return out


def _engine_filter(s: Any, query: EngineQuery) -> list[Engine]:
    scope = caller().scope
    owned = select(Model.model_hash).where(Model.owner == scope) if scope else None
    q = select(Engine)
    if owned is not None:
        q = q.where(Engine.model_hash.in_(owned))
    if query.model:
        # A model id, its canonical hash or its file's sha256; for users, only their own.
        ref = query.model
        match = select(Model.model_hash).where(
            (Model.id == ref) | (Model.model_hash == ref) | (Model.sha256 == ref))
        if scope:
            match = match.where(Model.owner == scope)
        model_hash = s.scalars(match).first()
        if model_hash is None:
            raise NotFound("model", ref)
        q = q.where(Engine.model_hash == model_hash)
    if query.backend:
        q = q.where(Engine.backend == query.backend)
    if query.device:
        q = q.where(Engine.device == query.device)
    rows = list(s.scalars(q.order_by(Engine.created_at.desc()).limit(5000)))
    wanted = _parse_covers(query.covers)
    if wanted:
        names = {w["name"] for w in wanted}
        rows = [e for e in rows if names <= {p["name"] for p in e.profile}
                and covers(e.profile, [{**w, "opt": w["min"]} for w in wanted])]
        # Best first: the narrowest engine that still covers the request.
        rows.sort(key=lambda e: engine_cache.profile_width(e.profile))
    return rows[: query.limit]


@api.get("/engines")
@spec.validate(query=EngineQuery, tags=["engines"])
def search_engines(query: EngineQuery) -> Response:
    with services().db.session() as s:
        return jsonify({"engines": [engine_json(e) for e in _engine_filter(s, query)]})


@api.get("/engines/explain")
@spec.validate(query=JobRequest, resp=Resp(HTTP_200=None, HTTP_400=Error, HTTP_404=Error),
               tags=["engines"])
def explain(query: JobRequest) -> Response:
    """Would this request be served from the cache? If not, why not."""
    body = query.model_dump()
    with services().db.session() as s:
        model = jobs.get_model(s, body["model_id"], caller().scope)
        options = normalize_options(body["backend"], body["device"], body["options"])
        profile = resolve_profile(model.signature["inputs"], body.get("inputs"))
        tc = [body["toolchain"]] if body.get("toolchain") else None
        found = engine_cache.lookup(s, model.model_hash, body["backend"], body["device"],
                                    body.get("arch"), tc, options, profile, body["reuse"])
        misses = [] if found.engine else engine_cache.explain_miss(
            s, model.model_hash, model.graph_hash, model.weights_hash, body["backend"],
            body["device"], body.get("arch"), tc, options, profile,
            visible_model_hashes=jobs.owned_model_hashes(s, caller().scope))
        return jsonify({"hit": found.engine is not None,
                        "engine_id": found.engine.id if found.engine else None,
                        "reason": found.reason, "misses": misses})


@api.get("/engines/<engine_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["engines"])
def get_engine(engine_id: str) -> Response:
    with services().db.session() as s:
        return jsonify(engine_json(_visible_engine(s, engine_id)))


# Not wrapped by spectree: its response check reads the body, which would buffer a
# multi-GB engine in memory instead of streaming it.
@api.get("/engines/<engine_id>/artifact")
def download_engine(engine_id: str) -> Response:
    with services().db.session() as s:
        engine = _visible_engine(s, engine_id)
        # Marks the engine as in use: eviction spares engines used within its grace period,
        # so a download in progress keeps its blob.
        engine.last_used_at = utcnow()
    suffix = BACKENDS.get(engine.backend, {}).get("suffix", ".bin")
    if engine.build_report.get("artifact_suffix"):
        suffix = engine.build_report["artifact_suffix"]
    return artifact_response(services().store, engine.artifact_uri, engine.sha256, engine.size,
                             f"{engine.id}{suffix}")


@api.post("/engines/<engine_id>/pin")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_403=Error, HTTP_404=Error), tags=["engines"])
def pin_engine(engine_id: str) -> Response:
    require_admin()
    pinned = request.args.get("pinned", "true").lower() != "false"
    with services().db.session() as s:
        engine = _visible_engine(s, engine_id)
        engine.pinned = pinned
        return jsonify(engine_json(engine))


@api.get("/workers")
@spec.validate(tags=["workers"])
def list_workers() -> Response:
    with services().db.session() as s:
        return jsonify({"workers": [worker_json(w) for w in
                                    live_workers(s, services().settings.worker_ttl_s)]})


@api.get("/targets")
@spec.validate(tags=["workers"])
def list_targets() -> Response:
    """Backends the API accepts, their devices and option schemas."""
    return jsonify({"backends": {name: {"devices": b["devices"],
                                        "options": b["options"].model_json_schema()}
                                 for name, b in BACKENDS.items()}})
