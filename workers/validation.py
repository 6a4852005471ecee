"""Check a built engine against its source program, and time both.

Runs in the build child. Inputs are drawn at the profile's min, opt and max shapes and at two
random in-range shapes; each output is compared with ``allclose``-style tolerances chosen by
dtype, and NaN/Inf in the engine's output (where eager has none) fails the check.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_latency_ms(fn: Callable[[], Any], device: str, budget_s: float = 1.0,
                      max_iters: int = 50) -> float:
    fn()  # warm-up: first calls load kernels and allocate
    _sync(device)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_iters and (len(samples) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def validate_and_time(eager: torch.nn.Module, runner: Runner, profile: Sequence[InputProfile],
                      device: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (validation report, benchmark report)."""
    validation: dict[str, Any] = {"shapes": {}, "passed": True}
    benchmark: dict[str, Any] = {"unit": "ms", "statistic": "median", "shapes": {}}
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
                engine_ms = median_latency_ms(lambda x=inputs: runner(x), device)
                eager_ms = median_latency_ms(lambda x=inputs: eager(*x), device)
                benchmark["shapes"][label] = {
                    "shapes": [list(s) for s in shapes], "engine_ms": engine_ms,
                    "eager_ms": eager_ms, "speedup": eager_ms / engine_ms if engine_ms else None,
                    "slower_than_eager": engine_ms > eager_ms}
    return validation, benchmark
