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
from typing import Any, Protocol

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
