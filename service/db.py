"""Database engine and sessions: one place that commits or rolls back.

The schema is created by Alembic only (``migrations/``); ``check_schema`` refuses to run
against a database that is not at the head revision, so a stale database fails loudly. The
migrations folder sits at the repository's top level and ships inside the wheel as
``service.migrations`` (pyproject's package-dir).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import KilnError

if TYPE_CHECKING:
    from alembic.config import Config


def migrations_dir() -> Path:
    """The Alembic script folder: the checkout's own, else the one installed with the package.

    The checkout comes first: in an editable install the import system may map
    ``service.migrations`` to another checkout's folder than the code that is running.
    """
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    from importlib.resources import files

    # Through the regular package ``service``: ``service.migrations`` has no __init__.py, and a
    # namespace package's files() is not a filesystem path Alembic can use.
    installed = Path(str(files("service") / "migrations"))
    if not (installed / "env.py").is_file():
        raise RuntimeError(f"Kiln's migrations are missing (looked in {checkout} and "
                           f"{installed}): reinstall the package")
    return installed


# A pooled connection idle longer than this is pinged before use (a restarted database or a
# firewall's idle timeout leaves dead connections in the pool). Busy connections are not: a
# ping on every checkout (SQLAlchemy's pool_pre_ping) was one more round trip on every request.
IDLE_PING_S = 10.0


def make_engine(url: str, autocommit: bool = False) -> Engine:
    """An engine for ``url``; ``autocommit``: every statement commits on its own (see
    ``Database.autocommit``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker writes; foreign keys are off by default.
            # synchronous=NORMAL is SQLite's advice for WAL: a commit no longer waits for an
            # fsync (the database stays consistent; a power cut may lose the last commits).
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if autocommit:
        # Asynchronous commit for these connections only: see Database.autocommit.
        engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=20,
                               connect_args={"options": "-c synchronous_commit=off"})
    else:
        engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine, autocommit)
    return engine


def _ping_when_idle(engine: Engine, autocommit: bool) -> None:
    """SQLAlchemy's documented pessimistic-disconnect recipe, for idle connections only."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            cur = dbapi_conn.cursor()
            cur.execute("SELECT 1")
            cur.close()
            if not autocommit:
                dbapi_conn.rollback()  # the ping opened a transaction: end it
        except Exception as exc:
            raise DisconnectionError("the pooled connection is dead") from exc  # pool retries


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._autocommit_engine = make_engine(url, autocommit=True)  # connects when used

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """A session in which every statement is its own transaction, committed without
        waiting for the database's log flush: no BEGIN, no COMMIT, no flush wait.

        For the request path's reads and single-statement writes only (authentication, cache
        lookups, counting a hit, a download's mark of use). Several statements here
        are not atomic together, so state changes of jobs and engines never use it. On
        PostgreSQL ``synchronous_commit=off`` holds for these connections only: a commit is
        visible to every reader at once and survives a restart of Kiln; only a crash of the
        database server itself may drop the last fraction of a second of such writes (at most
        3 x wal_writer_delay) - hit counts, submission rows, marks of use, never a job or an
        engine.
        """
        session = Session(self._autocommit_engine, expire_on_commit=False)
        try:
            yield session
            session.commit()  # flushes ORM changes; the connection commits each statement
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
        self._autocommit_engine.dispose()


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (the only way tables are created)."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def check_schema(db: Database) -> None:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config(db.url)).get_heads())
    with db.engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    if current != heads:
        raise KilnError(
            "schema_out_of_date",
            f"database schema is at {sorted(current) or 'nothing'}, code expects "
            f"{sorted(heads)}: run `kiln db upgrade`",
            status=503,
        )
