"""What a finished build tells the database about its engine: one typed record.

``jobs.succeed`` takes an :class:`EngineRecord` and writes it to the ``Engine`` row; the key
columns derived from it (``options_hash``, ``profile_hash``) are computed there, in one place.
The service cannot import ``workers``, so the record lives here; the worker makes it from the
child's parsed result and the facts it checked itself (sha256, size, artifact URI).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ValidationStatus = Literal["passed", "not_run"]


@dataclass(frozen=True)
class EngineRecord:
    model_hash: str
    graph_hash: str
    weights_hash: str
    backend: str
    device: str
    arch: str
    toolchain_id: str
    options: dict[str, Any]
    profile: list[Any]
    # Facts the worker established: where it stored the blob, its sha256 and size.
    artifact_uri: str
    sha256: str
    size: int
    toolchain: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    # Reported by the build child (untrusted, parsed into bounded records).
    build_report: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    benchmark: dict[str, Any] = field(default_factory=dict)
    validation_status: ValidationStatus = "passed"
    validation_reason: str | None = None

    def __post_init__(self) -> None:
        if self.validation_status not in ("passed", "not_run"):
            raise ValueError(f"validation_status must be passed or not_run, "
                             f"got {self.validation_status!r}")
        if self.validation_status == "not_run" and not self.validation_reason:
            raise ValueError("an engine whose validation did not run needs the reason")
        if len(self.sha256) != 64 or self.size < 0:
            raise ValueError("sha256 must be 64 hex digits and size non-negative")

    def columns(self) -> dict[str, Any]:
        return asdict(self)
