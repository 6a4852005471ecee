"""``kiln keys create|list|revoke``: API keys in the database, on this host's settings."""

from __future__ import annotations

import getpass

import click

from service import api_keys, audit
from service.db import Database
from service.settings import Settings


def _database() -> Database:
    return Database(Settings.from_env().database_url)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@click.group("keys")
def keys() -> None:
    """API keys stored (hashed) in Kiln's database."""


@keys.command("create")
@click.option("--owner", required=True, help="who the key acts as (owns its models and jobs)")
@click.option("--role", type=click.Choice(api_keys.ROLES), default="user", show_default=True)
@click.option("--note", default="", help="what the key is for")
def create(owner: str, role: str, note: str) -> None:
    """Create a key and print it once: only its hash is kept."""
    database = _database()
    try:
        with database.session() as s:
            new = api_keys.create(s, owner, role, note, created_by=_actor())
            audit.record(s, _actor(), "key.create", "key", new.row.id, "cli",
                         {"owner": owner, "role": role})
    finally:
        database.dispose()
    click.echo(f"created {new.row.id} for {owner} ({role}); the key is shown only now:",
               err=True)
    click.echo(new.secret)


@keys.command("list")
def list_() -> None:
    """Keys with owner, role, and when they were created, last used, revoked."""
    database = _database()
    try:
        with database.session() as s:
            rows = api_keys.list_keys(s)
    finally:
        database.dispose()
    click.echo(f"{'ID':<26} {'PREFIX':<13} {'OWNER':<16} {'ROLE':<6} {'CREATED':<20} "
               f"{'LAST USED':<20} REVOKED")
    for k in rows:
        click.echo(f"{k.id:<26} {k.prefix:<13} {k.owner:<16} {k.role:<6} "
                   f"{k.created_at:%Y-%m-%d %H:%M:%S}  "
                   f"{k.last_used_at.strftime('%Y-%m-%d %H:%M:%S') if k.last_used_at else '-':<20}"
                   f" {k.revoked_at.strftime('%Y-%m-%d %H:%M:%S') if k.revoked_at else '-'}")


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key: requests with it are refused from now on."""
    from service.errors import KilnError

    database = _database()
    try:
        with database.session() as s:
            row = api_keys.revoke(s, key_id)
            audit.record(s, _actor(), "key.revoke", "key", row.id, "cli", {"owner": row.owner})
    except KilnError as err:
        raise click.ClickException(err.message) from err
    finally:
        database.dispose()
    click.echo(f"revoked {key_id} ({row.owner})")


def first_admin_key(settings: Settings) -> str | None:
    """On the embedded default's first start (no KILN_API_KEYS, no key in the database), make
    an admin key and return it to print once; None when keys exist already."""
    if settings.api_keys:
        return None
    database = Database(settings.database_url)
    try:
        with database.session() as s:
            if api_keys.any_keys(s):
                return None
            new = api_keys.create(s, "admin", "admin", "made by the first `kiln serve`",
                                  created_by="kiln serve")
            audit.record(s, "kiln serve", "key.create", "key", new.row.id, "cli",
                         {"owner": "admin", "role": "admin"})
            return new.secret
    finally:
        database.dispose()
