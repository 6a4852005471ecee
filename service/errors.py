"""One error type, one JSON shape: ``{"error": {"code", "message", "details"}}``.

Handlers and the functions they call raise :class:`KilnError`; ``register_error_handlers``
turns it, and anything else that escapes, into that shape. Codes are stable strings that
clients may branch on; messages say what to fix.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException


class KilnError(Exception):
    """An error a client can act on. ``status`` is the HTTP status it maps to."""

    def __init__(
        self, code: str, message: str, status: int = 400, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class NotFound(KilnError):
    def __init__(self, what: str, ident: object) -> None:
        super().__init__("not_found", f"{what} {ident} not found", 404, {"what": what, "id": ident})


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
