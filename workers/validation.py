"""Check a built engine against its source program, and time both.

Runs in the build child. Inputs are drawn at the profile's min, opt and max shapes and at two
random in-range shapes; each output is compared with ``allclose``-style tolerances chosen by
dtype, and NaN/Inf in the engine's output (where eager has none) fails the check.

Timing repeats adapt: each side is timed until its median is stable (with a floor and a
ceiling on samples and time), and the report carries the median, the spread and flags for
anything that makes a speed-up untrustworthy.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from workers.backends.base import InputProfile, Runner

# (atol, rtol) by output dtype: fused kernels reorder float sums, so exact equality is wrong.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-3),
    torch.float64: (1e-6, 1e-6),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def shape_sets(profile: Sequence[InputProfile], seed: int = 0) -> dict[str, list[tuple[int, ...]]]:
    """Named shape sets: min, opt, max and two random shapes inside the profile.

    Dims with the same range draw the same random value, so dims that are one symbol in the
    program (a batch dim shared by two inputs, which validation forces to one range) agree.
    """
    rng = random.Random(seed)
    sets = {k: [tuple(getattr(p, k)) for p in profile] for k in ("min", "opt", "max")}
    for i in range(2):
        picks: dict[tuple[int, int], int] = {}
        sets[f"random{i + 1}"] = [
            tuple(picks.setdefault((lo, hi), rng.randint(lo, hi)) for lo, hi in zip(p.min, p.max))
            for p in profile
        ]
    return sets


def make_inputs(profile: Sequence[InputProfile], shapes: Sequence[tuple[int, ...]],
                device: str, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p, shape in zip(profile, shapes):
        dtype = getattr(torch, p.dtype)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            # Small non-negative ints are valid indices for any embedding or gather.
            t = torch.randint(0, 2, shape, generator=gen).to(dtype)
        out.append(t.to(device))
    return out


def compare(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    if len(got) != len(want):
        return [{"output": -1, "passed": False,
                 "reason": f"engine returned {len(got)} outputs, program {len(want)}"}]
    report = []
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach().cpu(), w.detach().cpu()
        if g.shape != w.shape:
            report.append({"output": i, "passed": False,
                           "reason": f"shape {list(g.shape)} != {list(w.shape)}"})
            continue
        if not w.dtype.is_floating_point:
            equal = bool(torch.equal(g.to(w.dtype), w))
            report.append({"output": i, "passed": equal, "max_abs": 0.0 if equal else None,
                           "mismatched": int((g.to(w.dtype) != w).sum())})
            continue
        atol, rtol = TOLERANCES.get(w.dtype, (1e-3, 1e-3))
        g64, w64 = g.double(), w.double()
        finite = torch.isfinite(w64)
        bad = int((~torch.isfinite(g64) & finite).sum())
        diff = (g64 - w64).abs().where(finite, torch.zeros_like(w64))
        max_abs = float(diff.max()) if diff.numel() else 0.0
        max_rel = float((diff / w64.abs().clamp_min(atol)).max()) if diff.numel() else 0.0
        excess = float((diff - atol - rtol * w64.abs().where(finite, torch.zeros_like(w64)))
                       .max()) if diff.numel() else 0.0
        report.append({"output": i, "dtype": str(w.dtype).removeprefix("torch."),
                       "max_abs": max_abs, "max_rel": max_rel, "atol": atol, "rtol": rtol,
                       "nonfinite": bad, "passed": bad == 0 and excess <= 0})
    return report


@dataclass(frozen=True)
class TimingPolicy:
    """When to stop timing: once the median is stable, between a floor and a ceiling.

    Samples come in batches; after each batch (from the second on) the median of all samples
    is compared with the median before that batch. ``stable_checks`` agreeing checks in a row
    within ``rel_tol`` stop the timing. A fast engine is done after a few milliseconds; a slow
    or noisy one stops at ``max_samples`` or ``max_time_s`` (never before ``min_samples``)
    and is flagged as not stable.
    """

    min_samples: int = 5
    max_samples: int = 200
    max_time_s: float = 2.0
    batch: int = 5
    rel_tol: float = 0.02
    stable_checks: int = 2
    warmup: int = 1


DEFAULT_TIMING = TimingPolicy()
# Tukey's far-out fences: a sample beyond Q3 + 3*IQR is an outlier (a GC pause, a context
# switch), counted and shown, never the reported figure.
OUTLIER_IQR = 3.0
NOISY_SPREAD = 0.25  # interquartile range over the median beyond which a timing is flagged


def summarize(samples: Sequence[float], stop: str) -> dict[str, Any]:
    """Median and spread of timing samples (ms), with outliers counted."""
    ordered = sorted(samples)
    median = statistics.median(ordered)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = median
    iqr = q3 - q1
    lo, hi = q1 - OUTLIER_IQR * iqr, q3 + OUTLIER_IQR * iqr
    outliers = [x for x in ordered if x < lo or x > hi]
    return {"median_ms": median, "p25_ms": q1, "p75_ms": q3, "min_ms": ordered[0],
            "spread": iqr / median if median else 0.0, "samples": len(ordered),
            "outliers": len(outliers), "max_outlier_ms": max(outliers) if outliers else None,
            "stable": stop == "stable", "stop": stop}


def time_calls(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None,
               policy: TimingPolicy = DEFAULT_TIMING) -> dict[str, Any]:
    """Time ``fn`` (ms per call) until its median is stable or a ceiling is reached."""
    for _ in range(policy.warmup):  # first calls load kernels and allocate
        fn()
        sync()
    samples: list[float] = []
    agreeing = 0
    start = time.perf_counter()
    while True:
        for _ in range(policy.batch):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1000)
        n = len(samples)
        if n > policy.batch:
            now, before = statistics.median(samples), statistics.median(samples[:-policy.batch])
            agreeing = agreeing + 1 if abs(now - before) <= policy.rel_tol * now else 0
        if n >= policy.min_samples and agreeing >= policy.stable_checks:
            return summarize(samples, "stable")
        if n >= policy.max_samples:
            return summarize(samples, "max_samples")
        if n >= policy.min_samples and time.perf_counter() - start >= policy.max_time_s:
            return summarize(samples, "max_time")


def timing_flags(engine: dict[str, Any], eager: dict[str, Any]) -> list[str]:
    """Why a speed-up should not be trusted as it stands (empty: it can be)."""
    flags = []
    for who, t in (("engine", engine), ("eager", eager)):
        if not t["stable"]:
            t_stop = "time limit" if t["stop"] == "max_time" else "sample limit"
            flags.append(f"{who} median not stable at the {t_stop} ({t['samples']} samples)")
        if t["spread"] > NOISY_SPREAD:
            flags.append(f"{who} timings spread {t['spread']:.0%} (IQR/median)")
        if t["outliers"]:
            flags.append(f"{who}: {t['outliers']} outlier sample(s) up to "
                         f"{t['max_outlier_ms']:.3g} ms (the median is the figure)")
    return flags


def _syncer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def median_latency_ms(fn: Callable[[], Any], device: str,
                      policy: TimingPolicy = DEFAULT_TIMING) -> float:
    return float(time_calls(fn, _syncer(device), policy)["median_ms"])


def validate_and_time(eager: torch.nn.Module, runner: Runner, profile: Sequence[InputProfile],
                      device: str, seed: int = 0, policy: TimingPolicy = DEFAULT_TIMING
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (validation report, benchmark report)."""
    validation: dict[str, Any] = {"shapes": {}, "passed": True}
    benchmark: dict[str, Any] = {"unit": "ms", "statistic": "median", "shapes": {},
                                 "repeats": "adaptive: until the median is stable within "
                                 f"{policy.rel_tol:.0%}, {policy.min_samples}-"
                                 f"{policy.max_samples} samples, at most {policy.max_time_s} s"}
    with torch.inference_mode():
        for i, (label, shapes) in enumerate(shape_sets(profile, seed).items()):
            inputs = make_inputs(profile, shapes, device, seed + i)
            want = list(tree_leaves(eager(*inputs)))
            got = runner(inputs)
            outputs = compare(got, want)
            passed = all(o["passed"] for o in outputs)
            validation["shapes"][label] = {"shapes": [list(s) for s in shapes],
                                           "outputs": outputs, "passed": passed}
            validation["passed"] &= passed
            if label in ("min", "opt", "max"):
                sync = _syncer(device)
                engine_t = time_calls(functools.partial(runner, inputs), sync, policy)
                eager_t = time_calls(functools.partial(eager, *inputs), sync, policy)
                engine_ms, eager_ms = engine_t["median_ms"], eager_t["median_ms"]
                flags = timing_flags(engine_t, eager_t)
                benchmark["shapes"][label] = {
                    "shapes": [list(s) for s in shapes], "engine_ms": engine_ms,
                    "eager_ms": eager_ms, "speedup": eager_ms / engine_ms if engine_ms else None,
                    "slower_than_eager": engine_ms > eager_ms,
                    "engine_spread": engine_t["spread"], "eager_spread": eager_t["spread"],
                    "engine_timing": engine_t, "eager_timing": eager_t,
                    "flagged": flags or None}
    return validation, benchmark
