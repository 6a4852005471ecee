"""Timing repeats adapt: stop when the median is stable, within a floor and a ceiling, and
report median, spread and outliers (a single noisy sample once showed an engine "1261x
faster"). Real timed calls, no fake clock."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from workers.backends.base import InputProfile
from workers.validation import TimingPolicy, summarize, time_calls, timing_flags, validate_and_time


def _compute() -> int:
    return sum(range(2000))


def test_a_fast_steady_call_stops_once_the_median_is_stable() -> None:
    t0 = time.perf_counter()
    t = time_calls(_compute)
    assert t["stop"] == "stable" and t["stable"] is True
    assert 10 <= t["samples"] <= 60  # floor of two batches, far below the 200 ceiling
    assert time.perf_counter() - t0 < 1.0  # small engines do not pay seconds of timing
    assert t["p25_ms"] <= t["median_ms"] <= t["p75_ms"]


def test_a_drifting_call_never_settles_stops_at_the_ceiling_and_is_flagged() -> None:
    calls = [0]

    def slower_each_time() -> None:
        calls[0] += 1
        time.sleep(0.0005 * calls[0])  # the median keeps moving: never within 2%

    policy = TimingPolicy(max_samples=30, max_time_s=30)
    t = time_calls(slower_each_time, policy=policy)
    assert t["stop"] == "max_samples" and t["samples"] == 30 and not t["stable"]
    flags = timing_flags(t, time_calls(_compute))
    assert any("engine median not stable at the sample limit (30 samples)" in f for f in flags)


def test_the_time_ceiling_holds_but_never_below_the_floor() -> None:
    calls = [0]

    def slow() -> None:
        calls[0] += 1
        time.sleep(0.02 + 0.002 * calls[0])

    t0 = time.perf_counter()
    t = time_calls(slow, policy=TimingPolicy(min_samples=5, max_time_s=0.15))
    assert t["stop"] == "max_time" and t["samples"] in (5, 10)
    assert time.perf_counter() - t0 < 1.5
    floor = time_calls(slow, policy=TimingPolicy(min_samples=10, batch=5, max_time_s=0.0))
    assert floor["samples"] == 10


def test_one_slow_sample_is_an_outlier_not_the_figure() -> None:
    calls = [0]

    def mostly_fast() -> None:
        calls[0] += 1
        time.sleep(0.08 if calls[0] == 4 else 0.001)

    t = time_calls(mostly_fast, policy=TimingPolicy(max_time_s=10))
    assert t["median_ms"] < 20
    assert t["outliers"] >= 1 and t["max_outlier_ms"] >= 80
    assert any("outlier" in f for f in timing_flags(t, t))


def test_summary_statistics() -> None:
    s = summarize([1.0, 1.1, 0.9, 1.0, 1.0, 1.05, 0.95, 40.0], "stable")
    assert s["median_ms"] == 1.0 and s["outliers"] == 1 and s["max_outlier_ms"] == 40.0
    assert s["samples"] == 8 and 0 < s["spread"] < 0.25 and s["min_ms"] == 0.9
    assert timing_flags(s, s) == ["engine: 1 outlier sample(s) up to 40 ms (the median is the "
                                  "figure)", "eager: 1 outlier sample(s) up to 40 ms (the median "
                                  "is the figure)"]
    steady = summarize([1.0] * 10, "stable")
    assert steady["spread"] == 0 and steady["outliers"] == 0 and timing_flags(steady, steady) == []


def test_validate_and_time_reports_median_spread_and_flags_per_shape() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    profile = [InputProfile("x", "float32", (1, 16), (4, 16), (8, 16))]

    def runner(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [model(*inputs)]

    t0 = time.perf_counter()
    validation, benchmark = validate_and_time(model, runner, profile, "cpu")
    assert validation["passed"]
    assert set(benchmark["shapes"]) == {"min", "opt", "max"}
    assert benchmark["repeats"].startswith("adaptive")
    for b in benchmark["shapes"].values():
        assert b["engine_ms"] == b["engine_timing"]["median_ms"] > 0
        assert b["eager_ms"] == b["eager_timing"]["median_ms"] > 0
        assert b["engine_timing"]["samples"] >= 10 and "engine_spread" in b
        assert b["flagged"] is None or all(isinstance(f, str) for f in b["flagged"])
    assert time.perf_counter() - t0 < 10
