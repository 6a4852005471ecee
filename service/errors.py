"""One error type, one JSON shape: ``{"error": {"code", "message", "details"}}``.

Handlers and the functions they call raise :class:`KilnError`; the app's error handlers
(``service.app.register_error_handlers``) turn it, and anything else that escapes, into that
shape. Codes are stable strings that clients may branch on; messages say what to fix. This
module imports no web framework: the build child raises these errors too.
"""

from __future__ import annotations

from typing import Any


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
