"""Store budget: eviction by rebuild value, pins kept, recent use spared; orphan collection."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from service.cache import digest
from service.db import upgrade
from service.models import Engine, utcnow
from service.services import Services
from service.store_budget import collect_orphans, enforce_budget
from tests.conftest import make_settings


def _services(tmp_path: Path) -> Services:
    services = Services(make_settings(tmp_path / "kiln"))
    upgrade(services.settings.database_url)
    return services


def _engine(services: Services, tmp_path: Path, name: str, size: int, build_s: float,
            hits: int = 0, pinned: bool = False, age_s: int = 3600) -> str:
    blob = tmp_path / name
    blob.write_bytes(os.urandom(size))
    uri = services.store.put_file(blob, f"engines/{name}")
    with services.db.session() as s:
        e = Engine(cache_key=digest(name), model_hash="m", graph_hash="g", weights_hash="w",
                   backend="aoti", device="cpu", arch="a", toolchain_id="t", toolchain={},
                   options={}, options_hash=digest({}), profile=[], profile_hash="p",
                   artifact_uri=uri, sha256=digest(name), size=size, build_seconds=build_s,
                   hits=hits, pinned=pinned, last_used_at=utcnow() - timedelta(seconds=age_s))
        s.add(e)
        s.flush()
        return e.id


def test_eviction_keeps_pinned_and_valuable_engines_under_budget(tmp_path: Path) -> None:
    services = _services(tmp_path)
    cheap_big = _engine(services, tmp_path, "cheap_big", 40_000, build_s=1)
    valuable = _engine(services, tmp_path, "valuable", 40_000, build_s=300, hits=10)
    pinned = _engine(services, tmp_path, "pinned", 40_000, build_s=1, pinned=True)
    recent = _engine(services, tmp_path, "recent", 40_000, build_s=1, age_s=5)
    middling = _engine(services, tmp_path, "middling", 40_000, build_s=30)
    report = enforce_budget(services, budget_bytes=130_000, grace_s=600)
    assert report.bytes_before == 200_000 and report.bytes_after <= 130_000
    assert report.evicted == [cheap_big, middling]  # lowest rebuild value first
    with services.db.session() as s:
        left = set(s.scalars(select(Engine.id)))
        uris = {e.id: e.artifact_uri for e in s.scalars(select(Engine))}
    assert left == {valuable, pinned, recent}
    stored = {b.uri for b in services.store.list()}
    assert set(uris.values()) <= stored and len(stored) == 3, "evicted blobs deleted, rest kept"


def test_budget_not_reached_when_only_pinned_remain(tmp_path: Path) -> None:
    services = _services(tmp_path)
    _engine(services, tmp_path, "p1", 10_000, build_s=1, pinned=True)
    _engine(services, tmp_path, "p2", 10_000, build_s=1, pinned=True)
    report = enforce_budget(services, budget_bytes=5_000)
    assert report.evicted == [] and report.bytes_after == 20_000


def test_orphans_collected_after_grace_only(tmp_path: Path) -> None:
    services = _services(tmp_path)
    kept = _engine(services, tmp_path, "kept", 1000, build_s=1)
    old = tmp_path / "old"
    old.write_bytes(b"x" * 10)
    old_uri = services.store.put_file(old, "engines/orphan-old")
    new_uri = services.store.put_file(old, "engines/orphan-new")
    past = time.time() - 7200
    os.utime(services.store.local_path(old_uri), (past, past))  # type: ignore[attr-defined]
    removed = collect_orphans(services, grace_s=3600)
    assert removed == [old_uri]
    stored = {b.uri for b in services.store.list()}
    assert new_uri in stored and old_uri not in stored
    with services.db.session() as s:
        assert s.get(Engine, kept).artifact_uri in stored
