"""The schema is built by Alembic only, on SQLite and on PostgreSQL, and round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from service.db import Database, check_schema, upgrade
from service.errors import KilnError

TABLES = {"models", "jobs", "engines", "workers", "submissions", "housekeeping",
          "alembic_version"}


def _check(url: str) -> None:
    db = Database(url)
    with pytest.raises(KilnError) as err:
        check_schema(db)  # empty database: refused with the command that fixes it
    assert err.value.code == "schema_out_of_date" and "kiln db upgrade" in err.value.message
    upgrade(url)
    check_schema(db)
    engine = create_engine(url)
    insp = inspect(engine)
    assert TABLES <= set(insp.get_table_names())
    indexes = {ix["name"]: ix for ix in insp.get_indexes("jobs")}
    assert indexes["uq_jobs_active_cache_key"]["unique"]
    engine.dispose()
    from alembic import command

    from service.db import alembic_config

    command.downgrade(alembic_config(url), "base")
    assert set(inspect(create_engine(url)).get_table_names()) <= {"alembic_version"}
    upgrade(url)
    check_schema(db)
    db.dispose()


def test_migrations_on_sqlite(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path / 'kiln.db'}")


def test_migrations_on_postgres(postgres_url: str) -> None:
    _check(postgres_url)
