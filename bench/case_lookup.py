"""Lookup at scale: cache-hit submit and engine search latency with 100, 10,000, 100,000 and
1,000,000 engines in PostgreSQL (bulk-loaded with COPY across many models, 4 engines per
model, each row shaped like a real one), measured with wrk at a fixed concurrency; the baseline
is the same measurement at 100 engines. Each level has its own Kiln and database; the levels
are measured in interleaved rounds, each point is the median round (by p99), the rounds'
spread is shown and a round far from the median is flagged as an outlier, not reported."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import uuid
from datetime import timedelta
from typing import Any

from bench.common import (
    Row,
    Run,
    log,
    profile_gunicorn,
    profile_note,
    py_spy_available,
    repeats,
    repeats_note,
    summarize_profile,
    wrk,
)
from bench.kiln import KilnStack, ensure_programs, kiln_stack, synthetic_target
from service.cache import Target, cache_key, digest, profile_shapes
from service.models import Engine, Model, utcnow
from service.targets import normalize_options

CASE = "lookup at scale"
CLIENTS = 8
ROUNDS = 5  # per level and endpoint; the median round counts (neighbours make single runs noisy)
COPY_CHUNK = 25_000  # engines per COPY batch: memory stays flat however many engines load
GROWTH_GOAL = 2.0
# A few targets or profiles per model, as a compile service's users build them: 100,000
# engines are 25,000 models.
ENGINES_PER_MODEL = 4

REQUEST = [{"name": "x", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}]
COVERS = "x:1x3x32x32,8x3x32x32"
# Batch ranges (min, max) of the engines stored for the model under test: several cover the
# request, so the lookup ranks candidates, as it does for a popular model.
OWN_RANGES = [(1, 8), (1, 16), (1, 32), (4, 32), (8, 32), (1, 4), (2, 16), (16, 32)]
OTHER_RANGES = OWN_RANGES[:ENGINES_PER_MODEL]  # one per engine of every other model


def _profile(lo: int, hi: int) -> list[dict[str, Any]]:
    opt = max(lo, min(hi, (lo + hi) // 2))
    return [{"name": "x", "dtype": "float32", "min": [lo, 3, 32, 32], "opt": [opt, 3, 32, 32],
             "max": [hi, 3, 32, 32]}]


def _reports(profile: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation and benchmark reports of the size a real build stores."""
    shapes = {k: [p[k] for p in profile] for k in ("min", "opt", "max")}
    shapes |= {"random1": shapes["opt"], "random2": shapes["max"]}
    out = {"output": 0, "dtype": "float32", "max_abs": 1.2e-6, "max_rel": 3.4e-5, "atol": 1e-3,
           "rtol": 1e-3, "nonfinite": 0, "passed": True}
    validation = {"passed": True, "shapes": {k: {"shapes": v, "outputs": [out], "passed": True}
                                             for k, v in shapes.items()}}
    benchmark = {"unit": "ms", "statistic": "median", "shapes": {
        k: {"shapes": shapes[k], "engine_ms": 1.5, "eager_ms": 2.5, "speedup": 1.67,
            "slower_than_eager": False} for k in ("min", "opt", "max")}}
    return {"validation": validation, "benchmark": benchmark,
            "build_report": {"inductor_configs": {"max_autotune": False},
                             "compiler_cache": "cold", "fxgraph_cache": {"hits": 0, "misses": 3},
                             "range_enforced_by_engine": False, "torch": "2.13.0+cpu",
                             "artifact_suffix": ".pt2"}}


class Loader:
    """COPY rows into ``models`` and ``engines`` straight through psycopg."""

    def __init__(self, kiln: KilnStack, model: Model, target: dict[str, Any]) -> None:
        self.kiln, self.model, self.target = kiln, model, target
        self.options = normalize_options("aoti", "cpu", {})
        self.t = Target(target["backend"], target["device"], target["arch"],
                        target["toolchain_id"])
        self.engines = 0
        self.rng = random.Random(0)
        self.now = utcnow()
        self._static: dict[tuple[int, int], dict[str, Any]] = {}
        self._signature = json.dumps(model.signature)
        self.load_s = 0.0

    def _shared_columns(self, lo: int, hi: int) -> dict[str, Any]:
        """Columns equal for every engine of one profile, JSON encoded once (COPY speed)."""
        if (lo, hi) not in self._static:
            profile = _profile(lo, hi)
            cols = {"toolchain": self.target["toolchain"], "options": self.options,
                    "profile": profile, **_reports(profile)}
            self._static[(lo, hi)] = {
                **{k: json.dumps(v) for k, v in cols.items()}, "_profile": profile,
                "options_hash": digest(self.options),
                "profile_hash": digest(profile_shapes(profile))}
        return self._static[(lo, hi)]

    def _engine_row(self, model_hash: str, graph_hash: str, weights_hash: str,
                    lo: int, hi: int) -> dict[str, Any]:
        shared = self._shared_columns(lo, hi)
        sha = os.urandom(32).hex()
        created = self.now - timedelta(seconds=self.rng.randint(0, 90 * 86400))
        # The model under test gets its real keys (the lookup must find them); the others a
        # key of the same shape, unique per model and profile, at a fraction of the cost.
        key = (cache_key(model_hash, self.t, self.options, shared["_profile"])
               if model_hash == self.model.model_hash else
               hashlib.sha256(f"{model_hash}:{shared['profile_hash']}".encode()).hexdigest())
        return {
            **shared, "id": f"eng_{os.urandom(10).hex()}", "cache_key": key,
            "validation_status": "passed", "validation_reason": None,
            "model_hash": model_hash, "graph_hash": graph_hash, "weights_hash": weights_hash,
            "backend": self.t.backend, "device": self.t.device, "arch": self.t.arch,
            "toolchain_id": self.t.toolchain_id,
            "artifact_uri": f"file:///srv/kiln/artifacts/engines/{sha}.pt2", "sha256": sha,
            "size": 1_500_000, "build_seconds": 30.0, "hits": 0,
            "pinned": False, "last_used_at": created, "created_at": created, "job_id": None}

    def add_own(self) -> None:
        rows = [self._engine_row(self.model.model_hash, self.model.graph_hash,
                                 self.model.weights_hash, lo, hi)
                for lo, hi in OWN_RANGES]
        self._copy([], rows)

    def grow_to(self, total: int) -> None:
        """Add other models' engines until ``total``, COPY_CHUNK engines per batch."""
        import time

        t0 = time.perf_counter()
        while self.engines < total:
            self._grow_chunk(min(total, self.engines + COPY_CHUNK))
        self._sql("ANALYZE models")
        self._sql("ANALYZE engines")
        self.load_s += time.perf_counter() - t0

    def _grow_chunk(self, total: int) -> None:
        models: list[dict[str, Any]] = []
        engines: list[dict[str, Any]] = []
        while self.engines + len(engines) < total:
            h = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
            g = hashlib.sha256(h.encode()).hexdigest()
            w = hashlib.sha256(g.encode()).hexdigest()
            models.append({
                "id": f"mdl_{uuid.uuid4().hex[:20]}", "owner": "local", "model_hash": h,
                "graph_hash": g, "weights_hash": w, "sha256": w, "size": self.model.size,
                "filename": "other.pt2", "torch_version": self.model.torch_version,
                "signature": self._signature,
                "blob_uri": f"file:///srv/kiln/artifacts/models/{h}.pt2",
                "created_at": self.now - timedelta(seconds=self.rng.randint(0, 90 * 86400))})
            for i in range(min(ENGINES_PER_MODEL, total - self.engines - len(engines))):
                lo, hi = OTHER_RANGES[i]
                engines.append(self._engine_row(h, g, w, lo, hi))
        self._copy(models, engines)

    def _copy(self, models: list[dict[str, Any]], engines: list[dict[str, Any]]) -> None:
        raw = self.kiln.db.engine.raw_connection()
        try:
            conn = raw.driver_connection
            with conn.cursor() as cur:  # type: ignore[union-attr]
                for table, rows in ((Model.__table__, models), (Engine.__table__, engines)):
                    name = Model.__tablename__ if table is Model.__table__ else \
                        Engine.__tablename__
                    if not rows:
                        continue
                    cols = [c.name for c in table.columns]
                    with cur.copy(f"COPY {name} ({', '.join(cols)}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row([json.dumps(v) if isinstance(v, (dict, list)) else v
                                            for v in (row[c] for c in cols)])
            conn.commit()  # type: ignore[union-attr]
        finally:
            raw.close()
        self.engines += len(engines)

    def _sql(self, statement: str) -> list[tuple[Any, ...]]:
        raw = self.kiln.db.engine.raw_connection()
        try:
            with raw.driver_connection.cursor() as cur:  # type: ignore[union-attr]
                cur.execute(statement)
                rows = cur.fetchall() if cur.description else []
            raw.driver_connection.commit()  # type: ignore[union-attr]
            return list(rows)
        finally:
            raw.close()


def run_case(run: Run) -> None:
    levels = [100, 10_000] if run.quick else [100, 10_000, 100_000, 1_000_000]
    program = ensure_programs(run, ["convnet"])["convnet"]
    raw: dict[str, Any] = {"levels": levels, "clients": CLIENTS, "rounds": ROUNDS,
                           "engines_per_model": ENGINES_PER_MODEL, "submit": {}, "search": {}}
    run.raw[CASE] = raw
    # One Kiln (its own database) per level, all loaded first, then measured in interleaved
    # rounds: a neighbour's burst of CPU then lands on every level alike, not on one.
    with contextlib.ExitStack() as stack:
        points: dict[int, dict[str, tuple[str, dict[str, Any]]]] = {}
        stacks: dict[int, KilnStack] = {}
        for level in levels:
            kiln = stacks[level] = stack.enter_context(kiln_stack(run, f"lookup-{level}"))
            target = synthetic_target()
            kiln.add_fake_worker(target)
            model = kiln.upload(program)
            loader = Loader(kiln, kiln.model_row(model["id"]), target)
            loader.add_own()
            loader.grow_to(level)
            raw.setdefault("load", {})[level] = {
                "seconds": round(loader.load_s, 1),
                "engines_per_s": round(level / loader.load_s) if loader.load_s else None}
            body = json.dumps({"model_id": model["id"], "backend": "aoti", "device": "cpu",
                               "inputs": REQUEST}).encode()
            search_url = f"{kiln.url}/api/v1/engines?model={model['id']}&covers={COVERS}"
            _check(kiln, body, search_url)
            log(f"{CASE}: {loader.engines:,} engines stored in {loader.load_s:.1f} s")
            points[level] = {"submit": (f"{kiln.url}/api/v1/jobs",
                                        {"method": "POST", "body": body}),
                             "search": (search_url, {})}
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for i in range(ROUNDS):
            log(f"{CASE}: round {i + 1} of {ROUNDS}")
            for level in levels:
                for name, (url, kwargs) in points[level].items():
                    if i == 0:
                        wrk(url, CLIENTS, min(2.0, run.duration_s), **kwargs)  # warm-up
                    results.setdefault((name, level), []).append(
                        wrk(url, CLIENTS, run.duration_s / 2, **kwargs))
        for (name, level), rounds in results.items():
            rounds.sort(key=lambda r: r["p99_ms"])
            raw[name][level] = rounds[len(rounds) // 2] | {
                "rounds_p99_ms": [r["p99_ms"] for r in rounds],
                "p99_repeats": repeats([r["p99_ms"] for r in rounds])}
        missed = _rows(run, raw, levels)
        if missed and run.profile and py_spy_available():
            top = levels[-1]
            raw["profile"] = _py_spy(run, stacks[top], missed, points[top])
            for row in missed:
                row.note = "; ".join(x for x in (row.note, profile_note(raw["profile"])) if x)


def _rows(run: Run, raw: dict[str, Any], levels: list[int]) -> list[Row]:
    base = levels[0]
    missed = []
    for name, label in (("submit", "cache-hit submit"), ("search", "engine search")):
        b = raw[name][base]
        for level in levels[1:]:
            k = raw[name][level]
            growth = k["p99_ms"] / b["p99_ms"]
            row = run.add(Row(CASE, f"{label}, {level:,} engines, c={CLIENTS}", "p99 ms",
                              k["p99_ms"], b["p99_ms"], growth,
                              goal=f"<= {GROWTH_GOAL:g}x the {base} engines p99",
                              met=growth <= GROWTH_GOAL and not k["error_count"], unit="ms",
                              note=f"p99 {repeats_note(k['p99_repeats'])} vs "
                              f"{repeats_note(b['p99_repeats'])}; "
                              f"p50 {k['p50_ms']:.1f} ms vs {b['p50_ms']:.1f} ms; "
                              f"{k['rps']:.0f} vs {b['rps']:.0f} req/s"
                              + (f"; {k['error_count']} errors" if k["error_count"] else "")))
            if row.met is False:
                missed.append(row)
        log(f"{CASE}: {label} p99 " + ", ".join(
            f"{lv}: {raw[name][lv]['p99_ms']:.1f} ms" for lv in levels))
    return missed


def _py_spy(run: Run, kiln: KilnStack, missed: list[Row],
             points: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """py-spy on the largest level's gunicorn while wrk drives the endpoint that missed."""
    name = "search" if any("search" in r.config for r in missed) else "submit"
    url, kwargs = points[name]
    out = run.artifact_path(f"lookup-{name}-profile.txt")
    log(f"{CASE}: profiling {name} at the largest level with py-spy -> {out}")
    seconds = max(5.0, run.duration_s)
    spy = profile_gunicorn(kiln.api.proc.pid, seconds + 1, out)  # type: ignore[union-attr]
    wrk(url, CLIENTS, seconds, **kwargs)
    spy.wait(timeout=120)
    return summarize_profile(out) | {"file": str(out), "endpoint": name}


def _check(kiln: KilnStack, body: bytes, search_url: str) -> None:
    import requests

    from bench.common import BenchError

    resp = requests.post(f"{kiln.url}/api/v1/jobs", data=body, timeout=30,
                         headers={"Content-Type": "application/json"})
    if resp.status_code != 200 or resp.json().get("status") != "cached":
        raise BenchError(f"lookup: a submit is not a cache hit: {resp.text[:500]}")
    found = requests.get(search_url, timeout=30)
    if found.status_code != 200 or len(found.json()["engines"]) != 3:
        raise BenchError(f"lookup: search found {found.text[:500]}")
