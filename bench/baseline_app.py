"""The baseline for cache-hit submits: a trivial Flask endpoint on the same server stack.

    gunicorn -w N 'bench.baseline_app:create_app()'

It parses the same JSON body and answers a small JSON document, and nothing else: no
database, no validation. Kiln's ratio to it is what Kiln's own request path costs.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.post("/api/v1/jobs")
    def submit() -> tuple[Response, int]:
        body = request.get_json()
        return jsonify({"status": "cached", "model_id": body.get("model_id")}), 200

    return app
