"""REST API v1. Handlers parse, call one function, and serialise; errors are KilnError."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any, BinaryIO, cast

from flask import Blueprint, Response, current_app, jsonify, request
from spectree import Response as Resp
from spectree import SpecTree
from sqlalchemy import update
from werkzeug.exceptions import BadRequest

from service import cache, job_events, jobs, queries, uploads, worker_registry
from service.auth import caller, require_admin
from service.cache import CacheRequest
from service.downloads import artifact_response, download_name
from service.errors import KilnError
from service.models import Engine, utcnow
from service.profiles import complete_profile
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
from service.targets import BACKENDS


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


# Bodies of the JSON endpoints are small; uploads (POST /models) stream under their own limit.
JSON_BODY_LIMIT = 1024 * 1024
JSON_MAX_DEPTH = 32
STREAMED_BODIES = frozenset({"api.upload_model"})
# Everything under /api/v1 needs a key. Public routes live outside this blueprint: /healthz;
# /metrics takes an admin key or the scrape token (service/app.py).
PUBLIC_ENDPOINTS: frozenset[str] = frozenset()


@api.before_request
def _authenticate_then_read_body() -> None:
    """Authenticate first, then bound and parse a JSON body, before any handler reads it.

    A request without a valid key is answered 401 without reading a byte of its body.
    """
    if request.endpoint not in PUBLIC_ENDPOINTS:
        caller()
    if "\x00" in request.path or b"%00" in request.query_string:
        # No id or name holds NUL, and PostgreSQL refuses it in text: say so, not a 500.
        raise KilnError("invalid_request", "the path or query string contains a NUL byte", 400)
    if request.endpoint in STREAMED_BODIES or request.method in ("GET", "HEAD", "DELETE"):
        return
    length = request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if not length and not chunked:
        return
    if length is not None and length > JSON_BODY_LIMIT:
        raise KilnError("body_too_large", f"a JSON body may be at most {JSON_BODY_LIMIT} bytes",
                        413, {"limit": JSON_BODY_LIMIT, "content_length": length})
    if request.mimetype != "application/json":
        raise KilnError("unsupported_body",
                        f"send the body as JSON with Content-Type: application/json, not "
                        f"{request.mimetype or 'no content type'}", 400,
                        {"content_type": request.mimetype})
    # Read at most limit + 1 bytes from the server's (de-chunked) input, so a chunked body is
    # bounded too, and hand the handler those bytes.
    raw = request.environ["wsgi.input"].read(
        length if length is not None else JSON_BODY_LIMIT + 1)
    if len(raw) > JSON_BODY_LIMIT:
        raise KilnError("body_too_large", f"a JSON body may be at most {JSON_BODY_LIMIT} bytes",
                        413, {"limit": JSON_BODY_LIMIT})
    request.environ["wsgi.input"] = io.BytesIO(raw)
    request.environ["CONTENT_LENGTH"] = str(len(raw))
    request.environ.pop("wsgi.input_terminated", None)
    try:
        body = request.get_json()
    except RecursionError as exc:
        raise _too_deep() from exc
    except BadRequest as exc:
        raise KilnError("malformed_json", "the body is not valid JSON", 400) from exc
    if _depth(body) > JSON_MAX_DEPTH:
        raise _too_deep()


def _too_deep() -> KilnError:
    return KilnError("json_too_deep", f"the JSON body nests deeper than {JSON_MAX_DEPTH} levels",
                     400, {"limit": JSON_MAX_DEPTH})


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if depth <= JSON_MAX_DEPTH:
                stack.extend((v, depth + 1) for v in item)
    return deepest


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
    model, created = uploads.save_upload(services(), caller().owner, cast(BinaryIO, stream),
                                         filename)
    return jsonify(model_json(model)), 201 if created else 200


@api.get("/models")
@spec.validate(tags=["models"])
def list_models() -> Response:
    with services().db.session() as s:
        models = queries.list_models(s, caller().scope, sha256=request.args.get("sha256"),
                                     model_hash=request.args.get("model_hash"))
        return jsonify({"models": [model_json(m) for m in models]})


@api.get("/models/<model_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["models"])
def get_model(model_id: str) -> Response:
    with services().db.session() as s:
        return jsonify(model_json(queries.get_model(s, model_id, caller().scope)))


@api.post("/jobs")
@spec.validate(json=JobRequest, resp=Resp(HTTP_200=None, HTTP_202=None, HTTP_400=Error,
                                          HTTP_404=Error, HTTP_503=Error), tags=["jobs"])
def submit_job(json: JobRequest) -> tuple[Response, int]:
    """Submit a compile job; answered from the cache (200) or queued/joined (202)."""
    who = caller()
    result = jobs.submit(services(), who.owner, json.cache_request(), who.scope, who.key_hash)
    if result.engine is not None:
        return jsonify({"status": "cached", "engine_id": result.engine.id,
                        "reason": result.reason, "engine": engine_json(result.engine)}), 200
    if result.job is None:
        raise KilnError("internal_error", "the submit answered neither an engine nor a job", 500)
    return jsonify({**job_json(result.job), "submit": result.status,
                    "reason": result.reason}), 202


@api.get("/jobs")
@spec.validate(tags=["jobs"])
def list_jobs() -> Response:
    with services().db.session() as s:
        found = queries.list_jobs(s, caller().scope, request.args.get("status"))
        return jsonify({"jobs": [job_json(j, log_tail=0) for j in found]})


@api.get("/jobs/<job_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["jobs"])
def get_job(job_id: str) -> Response:
    with services().db.session() as s:
        return jsonify(job_json(queries.get_job(s, job_id, caller().scope)))


@api.get("/jobs/<job_id>/log")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["jobs"])
def get_job_log(job_id: str) -> Response:
    with services().db.session() as s:
        job = queries.get_job(s, job_id, caller().scope)
        return Response(job.log, mimetype="text/plain")


# Not wrapped by spectree: its response check would read the whole (endless) stream.
@api.get("/jobs/<job_id>/events")
def job_events_stream(job_id: str) -> Response:
    """The job's state changes (and log lines with ?log=1) as Server-Sent Events."""
    with services().db.session() as s:
        queries.get_job(s, job_id, caller().scope)
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
            shapes = [list(map(int, s.split("x"))) for s in rng.split(",")]
            if len(shapes) not in (2, 3):
                raise ValueError(item)
        except ValueError as exc:
            raise KilnError("bad_covers", f"covers={item!r}: write NAME:MIN,MAX or "
                            "NAME:MIN,OPT,MAX with shapes like 1x3x224x224",
                            details={"covers": item}) from exc
        lo, hi = shapes[0], shapes[-1]
        # Without an opt, the min: ranking then prefers engines tuned nearest the low end.
        out.append({"name": name, "min": lo, "opt": shapes[1] if len(shapes) == 3 else lo,
                    "max": hi})
    return out


def _live_targets(s: Any) -> list[dict[str, Any]]:
    return worker_registry.live_targets_cached(s, services().settings.worker_ttl_s)


@api.get("/engines")
@spec.validate(query=EngineQuery, tags=["engines"])
def search_engines(query: EngineQuery) -> Response:
    """Stored engines; with `covers`, those that would serve a job for those shapes, best first
    (the same answer a submit or explain gives)."""
    scope = caller().scope
    with services().db.session() as s:
        if not query.covers:
            filters = {"backend": query.backend, "device": query.device, "arch": query.arch,
                       "toolchain_id": query.toolchain,
                       "model_hash": queries.model_hash_for(s, query.model, scope)
                       if query.model else None}
            found = queries.list_engines(s, scope, filters, query.limit)
        else:
            if not query.model:
                raise KilnError("bad_covers", "covers= needs model= (shapes are a model's)",
                                details={"covers": query.covers})
            model = queries.model_for(s, query.model, scope)
            request_ = CacheRequest(
                model_id=model.id, backend=query.backend or "aoti", device=query.device or "cpu",
                arch=query.arch, toolchain=query.toolchain, reuse="covering",
                accept_unvalidated=query.accept_unvalidated,
                inputs=complete_profile(model.signature["inputs"], _parse_covers(query.covers)))
            found = cache.resolve(s, request_, scope, _live_targets(s)).hits[: query.limit]
        return jsonify({"engines": [engine_json(e) for e in found]})


@api.get("/engines/explain")
@spec.validate(query=JobRequest, resp=Resp(HTTP_200=None, HTTP_400=Error, HTTP_404=Error),
               tags=["engines"])
def explain(query: JobRequest) -> Response:
    """Would this request be served from the cache? If not, why not."""
    return _explain(query)


@api.post("/engines/explain")
@spec.validate(json=JobRequest, resp=Resp(HTTP_200=None, HTTP_400=Error, HTTP_404=Error),
               tags=["engines"])
def explain_job(json: JobRequest) -> Response:
    """Explain for a full job request body (a profile does not fit a query string)."""
    return _explain(json)


def _explain(job: JobRequest) -> Response:
    with services().db.session() as s:
        found = cache.resolve(s, job.cache_request(), caller().scope, _live_targets(s))
        return jsonify({"hit": found.engine is not None,
                        "engine_id": found.engine.id if found.engine else None,
                        "reason": found.reason, "misses": found.misses,
                        "target": found.target.as_dict() if found.target else None,
                        "toolchains": found.toolchains})


@api.get("/engines/<engine_id>")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_404=Error), tags=["engines"])
def get_engine(engine_id: str) -> Response:
    with services().db.session() as s:
        return jsonify(engine_json(queries.get_engine(s, engine_id, caller().scope)))


MARK_USE_EVERY = timedelta(seconds=60)


# Not wrapped by spectree: its response check reads the body, which would buffer a
# multi-GB engine in memory instead of streaming it.
@api.get("/engines/<engine_id>/artifact")
def download_engine(engine_id: str) -> Response:
    with services().db.autocommit() as s:
        engine = queries.engine_for_download(s, engine_id, caller().scope)
        # Marks the engine as in use: eviction spares engines used within its grace period
        # (an hour by default), so a download in progress keeps its blob. At most once a
        # minute, and without waiting for the log flush: not a write per download.
        now = utcnow()
        if engine.last_used_at is None or now - engine.last_used_at > MARK_USE_EVERY:
            s.connection().execute(update(Engine).where(Engine.id == engine.id)
                                   .values(last_used_at=now))
    return artifact_response(services().store, engine.artifact_uri, engine.sha256, engine.size,
                             download_name(engine))


@api.post("/engines/<engine_id>/pin")
@spec.validate(resp=Resp(HTTP_200=None, HTTP_403=Error, HTTP_404=Error), tags=["engines"])
def pin_engine(engine_id: str) -> Response:
    require_admin()
    pinned = request.args.get("pinned", "true").lower() != "false"
    with services().db.session() as s:
        engine = queries.get_engine(s, engine_id, caller().scope)
        engine.pinned = pinned
        return jsonify(engine_json(engine))


@api.get("/workers")
@spec.validate(tags=["workers"])
def list_workers() -> Response:
    with services().db.session() as s:
        return jsonify({"workers": [worker_json(w) for w in
                                    worker_registry.live_workers(
                                        s, services().settings.worker_ttl_s)]})


@api.get("/targets")
@spec.validate(tags=["workers"])
def list_targets() -> Response:
    """Backends the API accepts, their devices and option schemas."""
    return jsonify({"backends": {name: {"devices": b["devices"],
                                        "options": b["options"].model_json_schema()}
                                 for name, b in BACKENDS.items()}})
