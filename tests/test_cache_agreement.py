"""Submit, explain and search give one answer to "does a stored engine serve this".

Each case asks all three the same question through the API - POST /jobs, POST
/engines/explain, GET /engines?covers= - and checks they agree on hit or miss and on which
engine, across profiles inside, outside, exactly equal to and partly overlapping stored ones,
across toolchains (only a newer worker live), and for engines whose validation did not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service import worker_registry
from service.app import create_app
from service.cache import Target, cache_key, digest, profile_shapes
from service.db import upgrade
from service.models import Engine, Model
from service.services import Services
from service.targets import normalize_options
from tests.conftest import make_settings

NEW = Target("aoti", "cpu", "x86_64-test", "torch=new")
OLD = Target("aoti", "cpu", "x86_64-test", "torch=old")
KEYS = {"ka": ("alice", "user"), "kb": ("bob", "user")}
H = {"Authorization": "Bearer ka"}


def _profile(batch: tuple[int, int, int], seq: tuple[int, int, int] = (2, 16, 64)
             ) -> list[dict[str, Any]]:
    (blo, bopt, bhi), (slo, sopt, shi) = batch, seq
    return [{"name": "x", "dtype": "float32", "min": [blo, slo, 8], "opt": [bopt, sopt, 8],
             "max": [bhi, shi, 8]},
            {"name": "mask", "dtype": "int64", "min": [blo, slo], "opt": [bopt, sopt],
             "max": [bhi, shi]}]


@pytest.fixture
def world(tmp_path: Path, programs: dict[str, Path]) -> tuple[Flask, Services, str]:
    settings = make_settings(tmp_path / "kiln", api_keys=KEYS)
    upgrade(settings.database_url)
    app = create_app(settings)
    services: Services = app.extensions["kiln"]
    with services.db.session() as s:  # only the newer toolchain's worker is live
        worker_registry.heartbeat(s, "w-new", "host", [
            {**NEW.as_dict(), "toolchain": {}, "queue": worker_registry.queue_name(NEW)}], {})
    model_id = app.test_client().post("/api/v1/models", headers=H,
                                      data=programs["two_inputs"].read_bytes()).json["id"]
    return app, services, model_id


def _store(services: Services, model_id: str, target: Target, profile: list[dict[str, Any]],
           validation_status: str = "passed") -> str:
    """Record an engine as jobs.succeed records one (no compiler needed for the question)."""
    options = normalize_options(target.backend, target.device, {})
    with services.db.session() as s:
        model = s.get(Model, model_id)
        assert model is not None
        engine = Engine(
            cache_key=cache_key(model.model_hash, target, options, profile),
            model_hash=model.model_hash, graph_hash=model.graph_hash,
            weights_hash=model.weights_hash, backend=target.backend, device=target.device,
            arch=target.arch, toolchain_id=target.toolchain_id, toolchain={}, options=options,
            options_hash=digest(options), profile=profile,
            profile_hash=digest(profile_shapes(profile)), artifact_uri="file:///nowhere",
            sha256="0" * 64, size=1, validation_status=validation_status,
            validation_reason=None if validation_status == "passed" else "no GPU to run it")
        s.add(engine)
        s.flush()
        return engine.id


def _covers(profile: list[dict[str, Any]]) -> str:
    def shape(v: list[int]) -> str:
        return "x".join(map(str, v))
    return "&".join(f"covers={p['name']}:{shape(p['min'])},{shape(p['opt'])},{shape(p['max'])}"
                    for p in profile)


def _three(c: FlaskClient, model_id: str, profile: list[dict[str, Any]], **extra: Any
           ) -> dict[str, Any]:
    """Ask all three; return what each says serves (engine id or None) and explain's body."""
    body = {"model_id": model_id, "inputs": profile, **extra}
    explained = c.post("/api/v1/engines/explain", json=body, headers=H)
    assert explained.status_code == 200, explained.json
    query = "".join(f"&{k}={v}" for k, v in extra.items() if k != "reuse")
    found = c.get(f"/api/v1/engines?model={model_id}&{_covers(profile)}{query}", headers=H)
    assert found.status_code == 200, found.json
    submitted = c.post("/api/v1/jobs", json=body, headers=H)
    assert submitted.status_code in (200, 202, 503), submitted.json
    return {
        "submit": submitted.json["engine_id"] if submitted.status_code == 200 else None,
        "explain": explained.json["engine_id"] if explained.json["hit"] else None,
        "search": found.json["engines"][0]["id"] if found.json["engines"] else None,
        "explained": explained.json, "submit_status": submitted.status_code,
    }


def _agree(answer: dict[str, Any], expected: str | None) -> None:
    said = {k: answer[k] for k in ("submit", "explain", "search")}
    assert said == {"submit": expected, "explain": expected, "search": expected}, said


def test_three_agree_across_profiles(world) -> None:
    app, services, model_id = world
    c = app.test_client()
    narrow = _store(services, model_id, NEW, _profile((1, 4, 16)))
    wide = _store(services, model_id, NEW, _profile((1, 24, 32), (2, 16, 100)))
    cases = [
        ("inside both, opt near the narrow one", _profile((2, 4, 8), (4, 16, 32)), narrow),
        ("inside both, opt near the wide one", _profile((2, 14, 16), (4, 16, 32)), wide),
        ("inside the wide one only", _profile((2, 4, 8), (4, 16, 100)), wide),
        ("exactly the narrow one", _profile((1, 4, 16)), narrow),
        ("past the narrow one, inside the wide one", _profile((8, 16, 32), (2, 16, 64)), wide),
        ("partly overlapping both", _profile((8, 16, 32), (50, 64, 128)), None),
        ("outside both", _profile((1, 4, 8), (101, 110, 128)), None),
    ]
    for name, profile, expected in cases:
        answer = _three(c, model_id, profile)
        _agree(answer, expected)
        if expected is None:
            misses = answer["explained"]["misses"]
            assert misses and all(any(d["field"] == "profile" for d in m["differs"])
                                  for m in misses), (name, misses)
            assert answer["submit_status"] == 202, name


def test_engine_of_an_older_toolchain_does_not_serve_while_only_a_newer_worker_is_live(
        world) -> None:
    app, services, model_id = world
    c = app.test_client()
    old = _store(services, model_id, OLD, _profile((1, 4, 16)))
    answer = _three(c, model_id, _profile((2, 4, 8)))
    _agree(answer, None)
    assert answer["submit_status"] == 202  # queued for the live (new) toolchain
    assert answer["explained"]["toolchains"] == ["torch=new"]
    [miss] = answer["explained"]["misses"]
    assert miss["engine_id"] == old and {"field": "toolchain", "stored": "torch=old",
                                         "requested": ["torch=new"]} in miss["differs"]
    # Naming the old toolchain asks for its engines: all three serve it.
    _agree(_three(c, model_id, _profile((2, 4, 8)), toolchain="torch=old"), old)


def test_unvalidated_engines_serve_only_when_accepted(world) -> None:
    app, services, model_id = world
    c = app.test_client()
    not_run = _store(services, model_id, NEW, _profile((1, 4, 16)), validation_status="not_run")
    answer = _three(c, model_id, _profile((2, 4, 8)))
    _agree(answer, None)
    assert "accept_unvalidated" in answer["explained"]["reason"]
    assert not_run in answer["explained"]["reason"]
    [miss] = answer["explained"]["misses"]
    assert [d["field"] for d in miss["differs"]] == ["validation"]
    _agree(_three(c, model_id, _profile((2, 4, 8)), accept_unvalidated="true"), not_run)
    # A validated engine, even a wider one, is preferred to nothing but not to the caller's
    # opt-in: with both stored and no opt-in, only the validated one serves.
    passed = _store(services, model_id, NEW, _profile((1, 16, 32), (2, 16, 128)))
    _agree(_three(c, model_id, _profile((2, 4, 8))), passed)


def test_with_no_live_worker_any_toolchain_serves_in_all_three(world) -> None:
    app, services, model_id = world
    c = app.test_client()
    old = _store(services, model_id, OLD, _profile((1, 4, 16)))
    with services.db.session() as s:
        worker_registry.forget(s, "w-new")
    _agree(_three(c, model_id, _profile((2, 4, 8))), old)
    missing = _three(c, model_id, _profile((1, 4, 32)))
    _agree(missing, None)
    assert missing["submit_status"] == 503  # nothing can build it either
