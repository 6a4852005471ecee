"""The Flask application factory.

Public without a key: ``/healthz`` and the OpenAPI document. ``/metrics`` needs an admin key or
``KILN_METRICS_TOKEN``; everything under ``/api/v1`` needs a key (checked in ``service.api``
before any body is read); the dashboard checks its own sign-in.
"""

from __future__ import annotations

import hmac
import time

from flask import Flask, Response, g, jsonify, redirect, request
from flask.typing import ResponseReturnValue
from prometheus_client import Counter, Histogram
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

from service import metrics as kiln_metrics
from service.api import api, spec
from service.auth import presented_token, require_admin
from service.db import check_schema
from service.errors import KilnError
from service.services import Services
from service.settings import Settings

REQUESTS = Counter("kiln_http_requests_total", "HTTP requests", ["endpoint", "status"])
LATENCY = Histogram("kiln_http_request_seconds", "HTTP request latency", ["endpoint"])


def error_response(err: KilnError) -> tuple[Response, int]:
    response = jsonify(err.to_dict())
    if err.status == 429:  # rate limited: say when to come back (RFC 9110 Retry-After)
        response.headers["Retry-After"] = str(err.details.get("retry_after_s", 1))
    return response, err.status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(KilnError)
    def _kiln(err: KilnError) -> tuple[Response, int]:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> tuple[Response, int]:
        code = (err.name or "http_error").lower().replace(" ", "_")
        status = err.code or 500
        return error_response(KilnError(code, err.description or err.name, status))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> tuple[Response, int]:
        app.logger.exception("unhandled error")
        # The message of an unexpected error may hold internals: never send it to clients.
        return error_response(KilnError("internal_error", "internal server error", 500))


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    services = Services(settings)
    app.extensions["kiln"] = services
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    check_schema(services.db)

    register_error_handlers(app)
    app.register_blueprint(api)
    from service.dashboard import dashboard

    app.register_blueprint(dashboard)
    spec.register(app)

    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unknown"
        REQUESTS.labels(endpoint, str(response.status_code)).inc()
        if "t0" in g:
            LATENCY.labels(endpoint).observe(time.perf_counter() - g.t0)
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        with services.db.session() as s:
            s.execute(text("SELECT 1"))
        return jsonify({"status": "ok"})

    kiln_metrics.init_app(app)

    @app.get("/")
    def index() -> ResponseReturnValue:
        # A browser goes to the dashboard; anything else gets a short map of the service.
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return redirect("/admin/")
        return jsonify({"service": "kiln", "api": "/api/v1", "docs": "/api/v1/docs",
                        "targets": "/api/v1/targets", "dashboard": "/admin/",
                        "health": "/healthz"})

    @app.get("/metrics")
    def metrics() -> Response:
        # Job ids and per-endpoint counts are not for everyone: an admin key or the scrape token.
        token = settings.metrics_token
        given = presented_token()
        if not (token and given and hmac.compare_digest(given.encode(), token.encode())):
            require_admin()
        return kiln_metrics.scrape(services)

    return app
