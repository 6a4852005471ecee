"""API keys with a role. Without configured keys Kiln is single-user: everyone is the admin.

Users see only their own models, jobs and engines; admins see everything. The key travels in
``Authorization: Bearer <key>`` (or ``X-API-Key``).
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


def authenticate() -> Caller:
    keys: dict[str, tuple[str, str]] = current_app.extensions["kiln"].settings.api_keys
    if not keys:
        return LOCAL
    header = request.headers.get("Authorization", "")
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else (
        request.headers.get("X-API-Key", ""))
    if not given and request.blueprint == "dashboard":
        # Browsers cannot send headers: the read-only admin pages take the key from a cookie.
        given = request.cookies.get("kiln_key", "")
    for key, (owner, role) in keys.items():
        if given and hmac.compare_digest(given.encode(), key.encode()):
            return Caller(owner, role)
    raise KilnError("unauthorized", "a valid API key is required (Authorization: Bearer KEY)",
                    401)


def caller() -> Caller:
    if "caller" not in g:
        g.caller = authenticate()
    return g.caller


def require_admin() -> Caller:
    who = caller()
    if not who.is_admin:
        raise KilnError("forbidden", "this needs an admin API key", 403)
    return who
