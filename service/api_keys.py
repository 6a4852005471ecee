"""API keys stored in the database: create (shown once), list, revoke, verify; and a per-key
rate limit on job submission.

A key is ``kiln_`` + 43 characters of ``secrets.token_urlsafe(32)`` (256 random bits). Only its
sha256 is stored. bcrypt/argon2 exist to slow down guessing *low-entropy* passwords from a
leaked hash; nobody can enumerate 2**256 keys however fast the hash, and a slow hash would cost
every API request tens of milliseconds and rule out looking the key up by an indexed equality.

The rate limit is a token bucket per key in the database (``rate_buckets``), not in process
memory (flask-limiter's default): every API process and every restart sees the same bucket, on
SQLite and PostgreSQL alike, with no extra server. Updates are compare-and-swap on the row, so
concurrent submissions cannot both spend the last token.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import KilnError, NotFound
from service.models import ApiKey, RateBucket, utcnow

ROLES = ("user", "admin")
PREFIX = "kiln_"
# New builds per key: a burst of SUBMIT_BURST, refilled at SUBMIT_PER_MINUTE.
SUBMIT_BURST = 30
SUBMIT_PER_MINUTE = 30.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    secret: str  # shown once; only its hash is kept


def create(session: Session, owner: str, role: str, note: str = "", created_by: str = ""
           ) -> NewKey:
    owner = owner.strip()
    if role not in ROLES:
        raise KilnError("bad_role", f"role must be one of {', '.join(ROLES)}, got {role!r}",
                        details={"role": role})
    if not owner or len(owner) > 100 or not owner.isprintable():
        raise KilnError("bad_owner", "owner must be 1-100 printable characters",
                        details={"owner": owner[:120]})
    secret = PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(key_hash=hash_key(secret), prefix=secret[:12], owner=owner, role=role,
                 note=note[:255], created_by=created_by, created_at=utcnow())
    session.add(row)
    session.flush()
    return NewKey(row, secret)


def list_keys(session: Session, include_revoked: bool = True) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.created_at.desc())
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(q))


def revoke(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound("api key", key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    _verified.clear()  # this process stops accepting it at once; others within VERIFIED_FOR_S
    return row


@dataclass(frozen=True)
class LiveKey:
    """What authentication needs of a live (unrevoked) database key."""

    id: str
    owner: str
    role: str


# Columns, not the ORM entity: authentication runs on every request (one indexed lookup).
_LIVE_KEY = select(ApiKey.id, ApiKey.owner, ApiKey.role, ApiKey.last_used_at).where(
    ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))


def verify_hash(session: Session, key_hash: str) -> LiveKey | None:
    """The live key with this sha256, or None (unknown or revoked)."""
    row = session.execute(_LIVE_KEY, {"key_hash": key_hash}).first()
    if row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        # At most once a minute: no write per request.
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return LiveKey(row.id, row.owner, row.role)


# Per process, a key found live is trusted for VERIFIED_FOR_S seconds without asking the
# database again: authentication was a third of a cache hit's time. A revocation therefore takes
# effect at once in the process that made it and within VERIFIED_FOR_S everywhere else.
# Unknown keys are never remembered (guessing cannot grow this), and its size is bounded.
VERIFIED_FOR_S = 2.0
VERIFIED_MAX = 10_000
_verified: dict[tuple[str, str], tuple[float, LiveKey]] = {}


def recently_verified(db_url: str, key_hash: str) -> LiveKey | None:
    found = _verified.get((db_url, key_hash))
    return found[1] if found is not None and time.monotonic() < found[0] else None


def remember_verified(db_url: str, key_hash: str, key: LiveKey) -> None:
    if len(_verified) >= VERIFIED_MAX:
        _verified.clear()
    _verified[(db_url, key_hash)] = (time.monotonic() + VERIFIED_FOR_S, key)


# Keys are revoked, never deleted: once a database is seen to hold a key it always does, so
# each process asks only until it sees one (per database URL).
_HOLDS_KEYS: set[str] = set()


def any_keys(session: Session) -> bool:
    url = str(session.get_bind().engine.url)
    if url not in _HOLDS_KEYS and \
            session.scalars(select(ApiKey.id).limit(1)).first() is not None:
        _HOLDS_KEYS.add(url)
    return url in _HOLDS_KEYS


def take_token(session: Session, key_hash: str, burst: int = SUBMIT_BURST,
               per_minute: float = SUBMIT_PER_MINUTE, now: datetime | None = None) -> None:
    """Spend one submission token of this key, or raise 429 with the seconds until the next."""
    rate = per_minute / 60.0
    for _ in range(5):
        now = now or utcnow()
        row = session.get(RateBucket, key_hash, populate_existing=True)
        if row is None:
            try:
                with session.begin_nested():
                    session.add(RateBucket(key_hash=key_hash, tokens=burst - 1.0,
                                           updated_at=now))
                return
            except IntegrityError:
                continue  # created concurrently: read it
        elapsed = max((now - row.updated_at).total_seconds(), 0.0)
        tokens = min(float(burst), row.tokens + elapsed * rate)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) / rate)
            raise KilnError("rate_limited", f"too many job submissions for this key: at most "
                            f"{burst} at once and {per_minute:g} a minute; retry in {wait} s",
                            429, {"retry_after_s": wait, "burst": burst,
                                  "per_minute": per_minute})
        swapped = session.execute(update(RateBucket).where(
            RateBucket.key_hash == key_hash, RateBucket.updated_at == row.updated_at,
            RateBucket.tokens == row.tokens).values(tokens=tokens - 1.0, updated_at=now))
        if swapped.rowcount == 1:  # type: ignore[attr-defined]
            return
        now = None
    raise KilnError("rate_limited", "too many concurrent job submissions for this key", 429,
                    {"retry_after_s": 1})


def limit_submissions(session: Session, key_hash: str | None) -> None:
    """The limit on new builds a key may start (cache hits and joins start none and are not
    limited); the local admin of single-user mode has none."""
    if key_hash is not None:
        take_token(session, key_hash, SUBMIT_BURST, SUBMIT_PER_MINUTE)
