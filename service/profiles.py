"""Shape profiles: what a user asks an engine to accept, checked against the program.

A profile is one entry per user input, ``{name, dtype, min, opt, max}``, each shape a list of
ints. The program's own signature (read from the archive by ``service.archive``) says which
dims are static and the range of each dynamic one; a profile outside that is refused here,
because neither AOTInductor nor TensorRT's serialized-engine path checks it.
"""

from __future__ import annotations

import math
from typing import Any

from service.errors import KilnError

# Bounds on what a profile may ask for, whatever the program allows: a dim fits a signed 32-bit
# int (what the compilers index with), and one input at its max shape holds at most 2^34
# elements (64 GiB of float32), far past any device. Larger numbers are refused, never queued.
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**34


def _problem(errors: list[dict[str, Any]], code: str, message: str, **where: Any) -> None:
    errors.append({"code": code, "message": message, **where})


def _default_profile(signature: list[dict[str, Any]]) -> list[dict[str, Any]]:
    profile: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for spec in signature:
        lo: list[int] = []
        hi: list[int] = []
        for dim_index, dim in enumerate(spec["shape"]):
            if isinstance(dim, int):
                lo.append(dim)
                hi.append(dim)
                continue
            if dim.get("max") is None:
                _problem(errors, "unbounded_dim",
                         f"input {spec['name']!r} dim {dim_index} ({dim['symbol']}) has no upper "
                         "bound in the program; give a profile with an explicit max",
                         input=spec["name"], dim=dim_index)
                hi.append(0)
            else:
                hi.append(dim["max"])
            # Ranges from torch.export often start at 0; size-0 and size-1 dims are
            # specialised by the compilers, so a derived profile starts at 1.
            lo.append(max(1, dim.get("min") or 0))
        opt = [min(max(e, a), b) for e, a, b in zip(spec["example_shape"], lo, hi)]
        profile.append({"name": spec["name"], "dtype": spec["dtype"], "min": lo, "opt": opt,
                        "max": hi})
    if errors:
        raise KilnError("invalid_profile", "the program has unbounded dims: a profile is required",
                        details={"errors": errors})
    return profile


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def resolve_profile(
    signature: list[dict[str, Any]], requested: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Return the validated profile in signature order, or raise ``invalid_profile``.

    Every problem is collected so the user fixes them all in one round trip.
    """
    if not requested:
        return _default_profile(signature)

    errors: list[dict[str, Any]] = []
    by_name = {spec["name"]: spec for spec in signature}
    seen: dict[str, dict[str, Any]] = {}
    for item in requested:
        name = item.get("name")
        if not isinstance(name, str) or name not in by_name:
            _problem(errors, "unknown_input",
                     f"input {name!r} is not an input of the program; its inputs are "
                     f"{list(by_name)}", input=name)
        elif name in seen:
            _problem(errors, "duplicate_input", f"input {name!r} is given twice", input=name)
        else:
            seen[name] = item
    for name in by_name:
        if name not in seen:
            _problem(errors, "missing_input", f"input {name!r} needs a min, opt and max shape",
                     input=name)

    symbols: dict[str, tuple[str, int, tuple[int, int, int]]] = {}
    for name, item in seen.items():
        spec = by_name[name]
        if item.get("dtype") not in (None, spec["dtype"]):
            _problem(errors, "dtype_mismatch",
                     f"input {name!r} is {spec['dtype']} in the program, not {item['dtype']}",
                     input=name, expected=spec["dtype"], got=item["dtype"])
        given = {k: item.get(k) for k in ("min", "opt", "max")}
        bad = [k for k, v in given.items() if not _is_shape(v)]
        if bad:
            _problem(errors, "bad_shape",
                     f"input {name!r}: {', '.join(bad)} must be a list of non-negative ints",
                     input=name)
            continue
        shapes: dict[str, list[int]] = {k: list(v or []) for k, v in given.items()}
        huge = [k for k, v in shapes.items() if any(d > MAX_DIM for d in v)]
        if huge:
            _problem(errors, "dim_too_large",
                     f"input {name!r}: {', '.join(huge)} has a dim over {MAX_DIM}",
                     input=name, limit=MAX_DIM)
            continue
        if math.prod(shapes["max"]) > MAX_ELEMENTS:
            _problem(errors, "too_many_elements",
                     f"input {name!r}: the max shape holds {math.prod(shapes['max'])} elements, "
                     f"over the limit of {MAX_ELEMENTS}", input=name, limit=MAX_ELEMENTS)
            continue
        rank = len(spec["shape"])
        if any(len(v) != rank for v in shapes.values()):
            _problem(errors, "rank_mismatch",
                     f"input {name!r} has rank {rank}; min/opt/max must each have {rank} dims",
                     input=name, expected=rank)
            continue
        for d, dim in enumerate(spec["shape"]):
            lo, opt, hi = shapes["min"][d], shapes["opt"][d], shapes["max"][d]
            if isinstance(dim, int):
                if (lo, opt, hi) != (dim, dim, dim):
                    _problem(errors, "static_dim_changed",
                             f"input {name!r} dim {d} is static ({dim}) in the program; "
                             f"min/opt/max must all be {dim}", input=name, dim=d, expected=dim)
                continue
            if not lo <= opt <= hi:
                _problem(errors, "profile_order",
                         f"input {name!r} dim {d}: need min <= opt <= max, got {lo}, {opt}, {hi}",
                         input=name, dim=d, min=lo, opt=opt, max=hi)
            allowed_lo, allowed_hi = dim.get("min") or 0, dim.get("max")
            if lo < allowed_lo or (allowed_hi is not None and hi > allowed_hi):
                _problem(errors, "out_of_range",
                         f"input {name!r} dim {d} ({dim['symbol']}): the program accepts "
                         f"[{allowed_lo}, {allowed_hi if allowed_hi is not None else 'inf'}], "
                         f"the profile asks for [{lo}, {hi}]",
                         input=name, dim=d, allowed={"min": allowed_lo, "max": allowed_hi},
                         requested={"min": lo, "max": hi})
            if not dim.get("derived"):
                # One symbol shared by several dims (a batch dim on two inputs) must get one range.
                prev = symbols.setdefault(dim["symbol"], (name, d, (lo, opt, hi)))
                if prev[2] != (lo, opt, hi):
                    _problem(errors, "symbol_mismatch",
                             f"input {name!r} dim {d} and input {prev[0]!r} dim {prev[1]} are the "
                             f"same dim ({dim['symbol']}) in the program and need the same "
                             "min/opt/max", input=name, dim=d, other={"input": prev[0],
                                                                      "dim": prev[1]})
    if errors:
        raise KilnError("invalid_profile", errors[0]["message"] if len(errors) == 1 else
                        f"the profile has {len(errors)} problems", details={"errors": errors})
    return [{"name": spec["name"], "dtype": spec["dtype"], "min": seen[spec["name"]]["min"],
             "opt": seen[spec["name"]]["opt"], "max": seen[spec["name"]]["max"]}
            for spec in signature]


def complete_profile(signature: list[dict[str, Any]], partial: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """A full requested profile from shapes given for some inputs only (``covers=`` search).

    An input not given takes the program's own range for each dim, except a dim that is the
    same symbol as a dim of a given input, which takes that dim's min/opt/max. The result still
    goes through ``resolve_profile``.
    """
    given = {p["name"]: p for p in partial}
    by_symbol: dict[str, tuple[int, int, int]] = {}
    for spec in signature:
        item = given.get(spec["name"])
        if item is None:
            continue
        for d, dim in enumerate(spec["shape"]):
            if isinstance(dim, dict) and not dim.get("derived") and d < len(item["min"]) and \
                    d < len(item["opt"]) and d < len(item["max"]):
                by_symbol.setdefault(dim["symbol"], (item["min"][d], item["opt"][d],
                                                     item["max"][d]))
    out = list(partial)
    missing = [spec for spec in signature if spec["name"] not in given]
    if missing:
        for spec, default in zip(missing, _default_profile(missing)):
            lo, opt, hi = list(default["min"]), list(default["opt"]), list(default["max"])
            for d, dim in enumerate(spec["shape"]):
                if isinstance(dim, dict) and dim.get("symbol") in by_symbol:
                    lo[d], opt[d], hi[d] = by_symbol[dim["symbol"]]
            out.append({"name": spec["name"], "min": lo, "opt": opt, "max": hi})
    return out


def covers(stored: list[dict[str, Any]], requested: list[dict[str, Any]]) -> bool:
    """True when every dim of ``requested`` lies inside ``stored``'s [min, max]."""
    by_name = {p["name"]: p for p in stored}
    for req in requested:
        have = by_name.get(req["name"])
        if have is None or len(have["min"]) != len(req["min"]):
            return False
        for lo, hi, rlo, rhi in zip(have["min"], have["max"], req["min"], req["max"]):
            if rlo < lo or rhi > hi:
                return False
    return True


def first_uncovered(stored: list[dict[str, Any]], requested: list[dict[str, Any]]
                    ) -> dict[str, Any] | None:
    """The first input and dim of ``requested`` outside ``stored``, for miss explanations."""
    by_name = {p["name"]: p for p in stored}
    for req in requested:
        have = by_name[req["name"]]
        for d, (lo, hi, rlo, rhi) in enumerate(zip(have["min"], have["max"], req["min"],
                                                   req["max"])):
            if rlo < lo or rhi > hi:
                return {"input": req["name"], "dim": d, "stored": [lo, hi], "requested": [rlo, rhi]}
    return None
