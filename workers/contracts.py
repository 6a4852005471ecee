"""What the worker and the build child say to each other, as typed, bounded records.

``BuildRequest`` goes worker -> child (``request.json``); ``ChildResult`` comes back
(``result.json``). The child runs untrusted code, so ``ChildResult`` is parsed as hostile
input: a bare artifact name, finite non-negative timings under a day, bounded strings, lists
and free-form reports, and nothing the model does not declare. A result that fails to parse
fails the build with ``bad_child_result``; the numbers that pass are stored as what the child
reported, never as facts the worker checked.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# A file name in the work directory: no separators, no "..", no leading dot or dash.
BareName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Key = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Seconds = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
Millis = Annotated[float, Field(ge=0, le=3_600_000, allow_inf_nan=False)]
# Error metrics may be large for a wrong engine, but never NaN, infinite or negative.
Metric = Annotated[float, Field(ge=0, le=1e300, allow_inf_nan=False)]
Dim = Annotated[int, Field(ge=0, le=2**31)]
Shape = Annotated[tuple[Dim, ...], Field(max_length=16)]
Text = Annotated[str, StringConstraints(max_length=4000)]
REPORT_BYTES = 64 * 1024  # a free-form report (build report, error details) as JSON


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    """A free-form dict: JSON only, finite numbers, at most REPORT_BYTES serialised."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not finite JSON: {exc}") from exc
    if len(text) > REPORT_BYTES:
        raise ValueError(f"{len(text)} bytes of JSON, over the limit of {REPORT_BYTES}")
    return value


class InputSpec(_Record):
    name: Annotated[str, StringConstraints(max_length=256)]
    dtype: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
    min: Shape
    opt: Shape
    max: Shape


class BuildRequest(_Record):
    """Worker -> child. File names are relative to the work directory the child runs in."""

    program: BareName = "program.pt2"
    backend: Key
    device: Literal["cpu", "cuda"]
    profile: tuple[InputSpec, ...]
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    swap_from: BareName | None = None
    swap_from_engine_id: str | None = None
    swap_from_build_seconds: Seconds = 0.0


class OutputCheck(_Record):
    output: Annotated[int, Field(ge=-1, le=100_000)]
    passed: bool
    dtype: Annotated[str, StringConstraints(max_length=32)] | None = None
    max_abs: Metric | None = None
    max_rel: Metric | None = None
    atol: Metric | None = None
    rtol: Metric | None = None
    nonfinite: Annotated[int, Field(ge=0)] | None = None
    mismatched: Annotated[int, Field(ge=0)] | None = None
    reason: Text | None = None


class ShapeCheck(_Record):
    shapes: Annotated[tuple[Shape, ...], Field(max_length=256)]
    outputs: Annotated[tuple[OutputCheck, ...], Field(max_length=1000)]
    passed: bool


class ValidationReport(_Record):
    passed: bool
    shapes: Annotated[dict[Key, ShapeCheck], Field(max_length=16)]


class NotRunReport(_Record):
    """An engine the child built but could not run here (e.g. TensorRT-RTX without a GPU it
    targets): the reason, and what the backend checked without running it."""

    status: Literal["not_run"]
    reason: Text
    checked_without_running: Annotated[tuple[Any, ...], Field(max_length=256)] = ()

    @field_validator("checked_without_running")
    @classmethod
    def _bounded(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        _bounded_json({"checked": list(v)})
        return v


Ratio = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=10_000_000)]


class TimingStats(_Record):
    """One side's adaptive timing (workers.validation.time_calls)."""

    median_ms: Millis
    p25_ms: Millis
    p75_ms: Millis
    min_ms: Millis
    spread: Ratio
    samples: Count
    outliers: Count
    max_outlier_ms: Millis | None = None
    stable: bool
    stop: Annotated[str, StringConstraints(max_length=32)]


class ShapeTiming(_Record):
    shapes: Annotated[tuple[Shape, ...], Field(max_length=256)]
    engine_ms: Millis
    eager_ms: Millis
    speedup: Ratio | None = None
    slower_than_eager: bool
    engine_spread: Ratio | None = None
    eager_spread: Ratio | None = None
    engine_timing: TimingStats | None = None
    eager_timing: TimingStats | None = None
    flagged: Annotated[tuple[Text, ...], Field(max_length=16)] | None = None


class BenchmarkReport(_Record):
    unit: Literal["ms"] = "ms"
    statistic: Literal["median"] = "median"
    repeats: Text | None = None
    shapes: Annotated[dict[Key, ShapeTiming], Field(max_length=16)]


class ChildError(_Record):
    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    message: Text
    details: dict[str, Any] = Field(default_factory=dict)

    _details = field_validator("details")(classmethod(lambda cls, v: _bounded_json(v)))


class ChildResult(_Record):
    """Child -> worker; hostile input. ``ok`` with an artifact, or an error."""

    ok: bool
    artifact: BareName | None = None
    timings: Annotated[dict[Key, Seconds], Field(max_length=32)] = Field(default_factory=dict)
    build_report: dict[str, Any] = Field(default_factory=dict)
    validation: ValidationReport | NotRunReport | None = None
    benchmark: BenchmarkReport | None = None
    error: ChildError | None = None

    _report = field_validator("build_report")(classmethod(lambda cls, v: _bounded_json(v)))


def finite_or_none(value: float | None) -> float | None:
    """Validation metrics of a broken engine can be inf; the record keeps those as None
    (its ``nonfinite`` count says what happened)."""
    return value if value is None or math.isfinite(value) else None
