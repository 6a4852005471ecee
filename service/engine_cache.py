"""The engine cache: keys, lookups and explanations of misses.

The cache key covers everything that changes an engine (design.md section 3): the model's
canonical hash, backend, device, architecture, the toolchain versions, the options with their
defaults filled in, and the profile. Lookups filter rows by the indexed part of the key, then
check shape-range containment in Python over the few candidates one model has.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Engine
from service.profiles import covers, first_uncovered

REUSE_MODES = ("exact", "covering", "never")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def toolchain_id(toolchain: dict[str, str]) -> str:
    """A stable, readable id for a set of toolchain versions: ``onnxruntime=1.31.1,torch=2.13``."""
    return ",".join(f"{k}={toolchain[k]}" for k in sorted(toolchain))


@dataclass(frozen=True)
class Target:
    backend: str
    device: str
    arch: str
    toolchain_id: str

    def as_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "device": self.device, "arch": self.arch,
                "toolchain_id": self.toolchain_id}


def cache_key(model_hash: str, target: Target, options: dict[str, Any],
              profile: list[dict[str, Any]]) -> str:
    return digest({"model": model_hash, **target.as_dict(), "options": options,
                   "profile": profile_shapes(profile)})


def profile_shapes(profile: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The part of a profile that changes an engine (names and shapes, in order)."""
    return [{k: p[k] for k in ("name", "dtype", "min", "opt", "max")} for p in profile]


def _opt_distance(stored: list[dict[str, Any]], requested: list[dict[str, Any]]) -> float:
    by_name = {p["name"]: p for p in stored}
    return sum(abs(math.log((a + 1) / (b + 1)))
               for req in requested for a, b in zip(by_name[req["name"]]["opt"], req["opt"]))


def profile_width(profile: list[dict[str, Any]]) -> float:
    return sum(math.log((hi + 1) / (lo + 1)) for p in profile for lo, hi in zip(p["min"], p["max"]))


@dataclass
class Lookup:
    engine: Engine | None
    reason: str  # why this engine served the request, or why nothing did
    misses: list[dict[str, Any]]


def lookup(session: Session, model_hash: str, backend: str, device: str, arch: str | None,
           toolchain_ids: list[str] | None, options: dict[str, Any],
           profile: list[dict[str, Any]], mode: str) -> Lookup:
    """Find the stored engine that serves this request under ``mode``, best first.

    ``toolchain_ids`` None means any toolchain (nothing known about the client's runtime and no
    live worker to prefer); an empty list means none can serve.
    """
    if mode == "never":
        return Lookup(None, "reuse=never: a fresh build was asked for", [])
    candidates = list(session.scalars(select(Engine).where(
        Engine.model_hash == model_hash, Engine.backend == backend, Engine.device == device,
        Engine.options_hash == digest(options),
        *([Engine.arch == arch] if arch else []),
        *([Engine.toolchain_id.in_(toolchain_ids)] if toolchain_ids is not None else []),
    )))
    wanted = profile_shapes(profile)
    if mode == "exact":
        hits = [e for e in candidates if e.profile_hash == digest(wanted)]
        reason = "same model, target, toolchain, options and profile"
    else:
        hits = [e for e in candidates if covers(e.profile, wanted)]
        reason = "stored profile covers every requested dim"
    if not hits:
        return Lookup(None, "no stored engine serves this request", [])
    # Nearest opt first (the engine is tuned there), then the narrowest range, then newest.
    hits.sort(key=lambda e: (_opt_distance(e.profile, wanted), profile_width(e.profile),
                             -e.created_at.timestamp()))
    return Lookup(hits[0], reason, [])


def find_swap_base(session: Session, graph_hash: str, weights_hash: str, target: Target,
                   options: dict[str, Any], profile: list[dict[str, Any]],
                   visible_model_hashes: set[str] | None) -> Engine | None:
    """A stored engine with this architecture but other weights whose compiled code can serve.

    Only engines built with their weights outside the compiled code qualify, with the same
    target, toolchain and options, and a profile that covers the request.
    """
    if not options.get("swappable_weights"):
        return None
    wanted = profile_shapes(profile)
    rows = session.scalars(select(Engine).where(
        Engine.graph_hash == graph_hash, Engine.weights_hash != weights_hash,
        Engine.backend == target.backend, Engine.device == target.device,
        Engine.arch == target.arch, Engine.toolchain_id == target.toolchain_id,
        Engine.options_hash == digest(options)))
    for engine in rows:
        if (visible_model_hashes is None or engine.model_hash in visible_model_hashes) and \
                covers(engine.profile, wanted):
            return engine
    return None


def explain_miss(session: Session, model_hash: str, graph_hash: str, weights_hash: str,
                 backend: str, device: str, arch: str | None, toolchain_ids: list[str] | None,
                 options: dict[str, Any], profile: list[dict[str, Any]],
                 visible_model_hashes: set[str] | None = None, limit: int = 5
                 ) -> list[dict[str, Any]]:
    """For the nearest stored engines of this model (or its architecture), say what differed.

    ``visible_model_hashes`` limits candidates to models the caller owns, so a miss never
    reveals that someone else compiled a model.
    """
    rows = session.scalars(select(Engine).where(Engine.graph_hash == graph_hash)
                           .order_by(Engine.created_at.desc()).limit(200))
    wanted = profile_shapes(profile)
    reasons = []
    for e in rows:
        if visible_model_hashes is not None and e.model_hash not in visible_model_hashes:
            continue
        differs = []
        if e.model_hash != model_hash:
            differs.append({"field": "weights" if e.weights_hash != weights_hash else "model",
                            "stored": e.weights_hash[:12], "requested": weights_hash[:12]})
        for field, stored, asked in (("backend", e.backend, backend), ("device", e.device, device),
                                     ("arch", e.arch, arch)):
            if asked is not None and stored != asked:
                differs.append({"field": field, "stored": stored, "requested": asked})
        if toolchain_ids is not None and e.toolchain_id not in toolchain_ids:
            differs.append({"field": "toolchain", "stored": e.toolchain_id,
                            "requested": toolchain_ids})
        if e.options_hash != digest(options):
            differs.append({"field": "options", "stored": e.options, "requested": options})
        if e.backend == backend and e.profile and not covers(e.profile, wanted):
            out = first_uncovered(e.profile, wanted)
            if out:
                differs.append({"field": "profile", **out})
        reasons.append({"engine_id": e.id, "differs": differs})
        if len(reasons) >= limit:
            break
    return reasons
