"""API keys with a role. Without configured keys Kiln is single-user: everyone is the admin.

Users see only their own models, jobs and engines; admins see everything. The key travels in
``Authorization: Bearer <key>`` (or ``X-API-Key``). Every API request is authenticated by
``authenticate_api_request`` (a ``before_request`` hook) before anything reads its body.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from flask import current_app, g, request

from service.errors import KilnError


@dataclass(frozen=True)
class Caller:
    owner: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def scope(self) -> str | None:
        """The owner to filter by, or None for an admin (sees all)."""
        return None if self.is_admin else self.owner


LOCAL = Caller("local", "admin")


def _configured_keys() -> dict[str, tuple[str, str]]:
    keys: dict[str, tuple[str, str]] = current_app.extensions["kiln"].settings.api_keys
    return keys


def resolve_key(token: str) -> Caller | None:
    """The caller a key belongs to, or None. The one place keys are looked up.

    Every configured key is compared (in constant time each), so the time taken does not say
    which key a guess came close to.
    """
    found = None
    given = token.encode()
    for key, (owner, role) in _configured_keys().items():
        if token and hmac.compare_digest(given, key.encode()):
            found = Caller(owner, role)
    return found


def presented_token() -> str:
    """The key the request carries in its headers (the dashboard adds its cookie itself)."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ").strip()
    return request.headers.get("X-API-Key", "").strip()


def authenticate() -> Caller:
    if not _configured_keys():
        return LOCAL
    given = presented_token()
    if not given and request.blueprint == "dashboard":
        # Browsers cannot send headers: the read-only admin pages take the key from a cookie.
        given = request.cookies.get("kiln_key", "")
    who = resolve_key(given)
    if who is None:
        raise KilnError("unauthorized",
                        "a valid API key is required (Authorization: Bearer KEY)", 401)
    return who


def caller() -> Caller:
    if "caller" not in g:
        g.caller = authenticate()
    return g.caller


def require_admin() -> Caller:
    who = caller()
    if not who.is_admin:
        raise KilnError("forbidden", "this needs an admin API key", 403)
    return who
