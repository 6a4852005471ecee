"""The Flask application factory.

Public without a key: ``/healthz`` and the OpenAPI document. ``/metrics`` needs an admin key or
``KILN_METRICS_TOKEN``; everything under ``/api/v1`` needs a key (checked in ``service.api``
before any body is read); the dashboard checks its own sign-in.
"""

from __future__ import annotations

import hmac
import time

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy import text

from service.api import api, spec
from service.auth import presented_token, require_admin
from service.db import check_schema
from service.errors import register_error_handlers
from service.services import Services
from service.settings import Settings

REQUESTS = Counter("kiln_http_requests_total", "HTTP requests", ["endpoint", "status"])
LATENCY = Histogram("kiln_http_request_seconds", "HTTP request latency", ["endpoint"])


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

    @app.get("/metrics")
    def metrics() -> Response:
        # Job ids and per-endpoint counts are not for everyone: an admin key or the scrape token.
        token = settings.metrics_token
        given = presented_token()
        if not (token and given and hmac.compare_digest(given.encode(), token.encode())):
            require_admin()
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

    return app
