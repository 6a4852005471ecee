"""The contract every build backend meets.

A backend turns a loaded ``torch.export`` program plus a shape profile into an artifact on
disk, and knows how to load that artifact back into a callable for validation and timing.
Backends run only inside the build child process (``workers.child``): they may import GPU
toolchains, and may crash; the worker that spawned the child survives either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

Runner = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class InputProfile:
    """One input's optimisation profile: the shapes the engine must accept."""

    name: str
    dtype: str  # torch dtype name without the prefix, e.g. "float32"
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class BuildResult:
    """What a backend reports about one build, stored on the engine row."""

    artifact: Path
    report: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    name: str  # "aoti", "onnx", "tensorrt": the value users pass as `backend`
    artifact_suffix: str  # file suffix of the artifact, e.g. ".pt2", ".onnx", ".engine"

    def unavailable_reason(self) -> str | None:
        """None when this host can build with this backend, else why not (shown to users)."""

    def devices(self) -> list[str]:
        """Device kinds this host can build for with this backend ("cpu", "cuda")."""

    def toolchain(self, device: str) -> dict[str, str]:
        """Versions that change the artifact: recorded in the engine's cache key."""

    def build(
        self,
        program: torch.export.ExportedProgram,
        profile: Sequence[InputProfile],
        device: str,
        options: dict[str, Any],
        workdir: Path,
        log: Callable[[str], None],
    ) -> BuildResult:
        """Build the artifact under ``workdir`` and return it with a build report."""

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        """Load a built artifact as a callable taking user inputs in signature order."""


# Optional parts of the contract: a backend implements them or not, and callers ask with
# ``isinstance(backend, WeightSwapper)`` (runtime-checkable protocols check method names).


@runtime_checkable
class WeightSwapper(Protocol):
    """A backend whose artifacts keep their weights apart and take another model's."""

    def swap_weights(
        self,
        base: Path,
        program: torch.export.ExportedProgram,
        workdir: Path,
        log: Callable[[str], None],
    ) -> BuildResult:
        """A new artifact: ``base``'s compiled code with ``program``'s weights."""


@runtime_checkable
class AheadOfTimeBuilder(Protocol):
    """A backend that can build artifacts this host cannot run (TensorRT-RTX on a CPU-only
    worker or on a GPU outside the plan's compute capabilities)."""

    def target_arch(self, device: str) -> str:
        """The ``arch`` of the target this host announces: where the artifacts run, which
        need not be this host's GPU (e.g. ``sm_80+sm_86+sm_89+sm_120+sm_121``)."""

    def cannot_run_reason(self, built: BuildResult, device: str) -> str | None:
        """None when this host can load and run ``built``, else why not (stored on the
        engine as its validation reason, with status ``not_run``)."""
