"""API keys with a role. Without configured keys Kiln is single-user: everyone is the admin.

Keys come from ``KILN_API_KEYS`` and from the database (``service.api_keys``); both are
looked up by ``resolve_key_hash``, the one place a presented key becomes a caller.

Users see only their own models, jobs and engines; admins see everything. The key travels in
``Authorization: Bearer <key>`` (or ``X-API-Key``). Every API request is authenticated by
``authenticate_api_request`` (a ``before_request`` hook) before anything reads its body.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from flask import current_app, g, request, session

from service import api_keys
from service.errors import KilnError


@dataclass(frozen=True)
class Caller:
    owner: str
    role: str
    key_hash: str | None = None  # sha256 of the key presented; None for the local admin
    key_id: str | None = None  # the database key's id; None for KILN_API_KEYS keys

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def scope(self) -> str | None:
        """The owner to filter by, or None for an admin (sees all)."""
        return None if self.is_admin else self.owner


LOCAL = Caller("local", "admin")


def resolve_key_hash(key_hash: str) -> Caller | None:
    """The caller a key (given by its sha256) stands for, or None: unknown or revoked."""
    services = current_app.extensions["kiln"]
    for key, (owner, role) in services.settings.api_keys.items():
        if hmac.compare_digest(api_keys.hash_key(key), key_hash):
            return Caller(owner, role, key_hash)
    row = api_keys.recently_verified(services.db.url, key_hash)
    if row is None:
        with services.db.autocommit() as s:  # one round trip
            row = api_keys.verify_hash(s, key_hash)
        if row is None:
            return None
        api_keys.remember_verified(services.db.url, key_hash, row)
    return Caller(row.owner, row.role, key_hash, row.id)


def resolve_key(given: str) -> Caller | None:
    return resolve_key_hash(api_keys.hash_key(given)) if given else None


def keys_configured() -> bool:
    services = current_app.extensions["kiln"]
    if services.settings.api_keys:
        return True
    with services.db.autocommit() as s:
        return api_keys.any_keys(s)


def presented_token() -> str:
    """The key the request carries in its headers (the dashboard uses its session instead)."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ").strip()
    return request.headers.get("X-API-Key", "").strip()


def authenticate() -> Caller:
    # The presented credential first: a valid key answers without asking whether any keys
    # exist (one query fewer on every authenticated request, cache hits included).
    given = presented_token()
    found = None
    if given:
        found = resolve_key(given)
    elif request.blueprint == "dashboard":
        # Browsers cannot send headers: the dashboard's signed session holds the hash of a key
        # that was checked at sign-in (never the key itself), and is checked again here.
        key_hash = session.get("key_hash")
        found = resolve_key_hash(key_hash) if isinstance(key_hash, str) else None
    if found is not None:
        return found
    if not keys_configured():
        return LOCAL
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
