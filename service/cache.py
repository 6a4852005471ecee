"""The engine cache: keys, the one resolver of "does a stored engine serve this", and
explanations of misses.

The cache key covers everything that changes an engine (design.md section 3): the model's
canonical hash, backend, device, architecture, the toolchain versions, the options with their
defaults filled in, and the profile. Lookups filter rows by the indexed part of the key, then
check shape-range containment in Python over the few candidates one model has.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, bindparam, select
from sqlalchemy.orm import Session

from service import queries
from service.errors import KilnError, NotFound
from service.models import Engine, Model
from service.profiles import covers, first_uncovered, resolve_profile
from service.targets import check_dtypes, normalize_options

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


VALIDATED = "passed"


@dataclass(frozen=True)
class CacheRequest:
    """One question - does a stored engine serve this? - as submit, explain and search ask it.

    ``inputs`` None means the program's own ranges; ``toolchain`` None means the toolchains of
    live workers (any, when none is live); ``accept_unvalidated`` lets engines whose validation
    did not run (``validation_status="not_run"``) serve.
    """

    model_id: str
    backend: str = "aoti"
    device: str = "cpu"
    arch: str | None = None
    toolchain: str | None = None
    inputs: list[dict[str, Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    reuse: str = "covering"
    accept_unvalidated: bool = False


@dataclass
class Resolution:
    """The answer: the target a build would use, the toolchains that may serve, and either the
    serving engines (best first) or why nothing serves."""

    model: Model
    options: dict[str, Any]
    profile: list[dict[str, Any]]
    target: Target | None
    toolchains: list[str] | None
    hits: list[Engine]
    reason: str
    misses: list[dict[str, Any]]

    @property
    def engine(self) -> Engine | None:
        return self.hits[0] if self.hits else None


def choose_target(live_targets: list[dict[str, Any]], backend: str, device: str,
                  arch: str | None, toolchain: str | None
                  ) -> tuple[Target | None, list[str] | None]:
    """The target a build would run on, and the toolchains whose engines may serve.

    A request that names a toolchain gets engines of that toolchain only. Otherwise engines of
    the live workers' toolchains for this backend, device (and arch) serve, the most recently
    seen worker's target building; with no live worker, engines of any toolchain may serve.
    """
    targets = [t for t in live_targets
               if t["backend"] == backend and t["device"] == device
               and (arch is None or t["arch"] == arch)
               and (toolchain is None or t["toolchain_id"] == toolchain)]
    if targets:
        t = targets[0]
        return (Target(backend, device, t["arch"], t["toolchain_id"]),
                sorted({x["toolchain_id"] for x in targets}))
    return None, ([toolchain] if toolchain else None)


def _model_and_candidates(session: Session, request: CacheRequest, scope: str | None,
                          options: dict[str, Any], toolchains: list[str] | None
                          ) -> tuple[Model, list[Engine]]:
    """The caller's model and the engines matching the indexed part of the key, in one query."""
    params: dict[str, Any] = {"model_id": request.model_id, "backend": request.backend,
                              "device": request.device, "options_hash": digest(options),
                              "arch": request.arch, "toolchains": toolchains, "owner": scope}
    statement = _candidates_statement(bool(request.arch), toolchains is not None,
                                      scope is not None)
    rows = session.execute(statement, params).all()
    if not rows:
        raise NotFound("model", request.model_id)
    return rows[0][0], [engine for _, engine in rows if engine is not None]


# Built once per shape and reused with bound values: building the expression cost more on a
# cache hit than compiling it (which SQLAlchemy caches anyway). Statements are immutable.
_CANDIDATES: dict[tuple[bool, bool, bool], Select[Any]] = {}


def _candidates_statement(by_arch: bool, by_toolchain: bool, scoped: bool) -> Select[Any]:
    key = (by_arch, by_toolchain, scoped)
    statement = _CANDIDATES.get(key)
    if statement is None:
        on = and_(Engine.model_hash == Model.model_hash,
                  Engine.backend == bindparam("backend"), Engine.device == bindparam("device"),
                  Engine.options_hash == bindparam("options_hash"),
                  *([Engine.arch == bindparam("arch")] if by_arch else []),
                  *([Engine.toolchain_id.in_(bindparam("toolchains", expanding=True))]
                    if by_toolchain else []))
        statement = select(Model, Engine).outerjoin(Engine, on).where(
            Model.id == bindparam("model_id"))
        if scoped:
            statement = statement.where(Model.owner == bindparam("owner"))
        _CANDIDATES[key] = statement
    return statement


def _rank(hits: list[Engine], wanted: list[dict[str, Any]]) -> list[Engine]:
    # Nearest opt first (the engine is tuned there), then the narrowest range, then newest.
    return sorted(hits, key=lambda e: (_opt_distance(e.profile, wanted), profile_width(e.profile),
                                       -e.created_at.timestamp()))


def resolve(session: Session, request: CacheRequest, scope: str | None,
            live_targets: list[dict[str, Any]]) -> Resolution:
    """The one answer to "does a stored engine serve this request", for submit, explain and
    search alike. ``scope`` is the owner whose models the request may name (None: an admin);
    ``live_targets`` are the targets live workers build (``worker_registry.live_targets``).
    Raises ``KilnError`` for a request that cannot be answered (unknown model, bad options,
    bad profile).
    """
    if request.reuse not in REUSE_MODES:
        raise KilnError("invalid_request", f"reuse must be one of {list(REUSE_MODES)}",
                        details={"reuse": request.reuse})
    options = normalize_options(request.backend, request.device, request.options)
    target, toolchains = choose_target(live_targets, request.backend, request.device,
                                       request.arch, request.toolchain)
    model, candidates = _model_and_candidates(session, request, scope, options, toolchains)
    profile = resolve_profile(model.signature["inputs"], request.inputs)
    check_dtypes(request.backend, profile)  # e.g. float64 for TensorRT: refused, not built
    wanted = profile_shapes(profile)
    if request.reuse == "never":
        serving: list[Engine] = []
        reason = "reuse=never: a fresh build was asked for"
    elif request.reuse == "exact":
        serving = [e for e in candidates if e.profile_hash == digest(wanted)]
        reason = "same model, target, toolchain, options and profile"
    else:
        serving = [e for e in candidates if covers(e.profile, wanted)]
        reason = "stored profile covers every requested dim"
    hits = [e for e in serving
            if request.accept_unvalidated or e.validation_status == VALIDATED]
    if hits:
        return Resolution(model, options, profile, target, toolchains, _rank(hits, wanted),
                          reason, [])
    if serving:
        unvalidated = _rank(serving, wanted)[0]
        reason = (f"only engines whose validation did not run serve this request (engine "
                  f"{unvalidated.id}: {unvalidated.validation_reason or 'not validated'}); "
                  "set accept_unvalidated=true to use one")
    elif request.reuse != "never":
        reason = "no stored engine serves this request"
    misses = explain_miss(
        session, model.model_hash, model.graph_hash, model.weights_hash, request.backend,
        request.device, request.arch, toolchains, options, profile,
        visible_model_hashes=queries.visible_model_hashes(session, scope),
        accept_unvalidated=request.accept_unvalidated)
    return Resolution(model, options, profile, target, toolchains, [], reason, misses)


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
                 visible_model_hashes: set[str] | None = None, limit: int = 5,
                 accept_unvalidated: bool = False) -> list[dict[str, Any]]:
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
        differs: list[dict[str, Any]] = []
        if e.model_hash != model_hash:
            differs.append({"field": "weights" if e.weights_hash != weights_hash else "model",
                            "stored": e.weights_hash[:12], "requested": weights_hash[:12]})
        for name, stored, asked in (("backend", e.backend, backend), ("device", e.device, device),
                                     ("arch", e.arch, arch)):
            if asked is not None and stored != asked:
                differs.append({"field": name, "stored": stored, "requested": asked})
        if toolchain_ids is not None and e.toolchain_id not in toolchain_ids:
            differs.append({"field": "toolchain", "stored": e.toolchain_id,
                            "requested": toolchain_ids})
        if e.options_hash != digest(options):
            differs.append({"field": "options", "stored": e.options, "requested": options})
        if not accept_unvalidated and e.validation_status != VALIDATED:
            differs.append({"field": "validation", "stored": e.validation_status,
                            "reason": e.validation_reason,
                            "fix": "set accept_unvalidated=true to accept it"})
        if e.backend == backend and e.profile and not covers(e.profile, wanted):
            out = first_uncovered(e.profile, wanted)
            if out:
                differs.append({"field": "profile", **out})
        reasons.append({"engine_id": e.id, "differs": differs})
        if len(reasons) >= limit:
            break
    return reasons
