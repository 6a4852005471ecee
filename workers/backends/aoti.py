"""AOTInductor: compile an exported program into a self-contained ``.pt2`` package.

AOTInductor compiles for the program's own symbolic ranges; it has no notion of an opt shape,
and the package does not enforce the range at run time (design.md section 6). Kiln checks the
profile against the program before building, validates at its edges, and records it with the
engine so loaders can enforce it.
"""

from __future__ import annotations

import contextlib
import platform
import shlex
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from workers.backends.base import BuildResult, InputProfile, Runner


def cpu_arch() -> str:
    """The CPU target: machine plus the vector ISA Inductor generates code for.

    Inductor picks AVX-512 or AVX2 kernels from the build host's CPU; a package built for
    AVX-512 must not be served to a host without it, so the ISA is part of the target.
    """
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = str(pick_vec_isa()) or "scalar"
    except Exception:  # an Inductor without this helper: fall back to the machine alone
        isa = "unknown"
    return f"{platform.machine()}-{isa}"


# Linking the C++ runtime statically into the package's wrapper library breaks std::locale:
# the wrapper's copy of libstdc++ and the process's libstdc++.so number locale facets
# differently, and the first std::regex (parse_device_str, while the model container is
# created) calls a wrong virtual and segfaults. Seen with torch 2.11.0+cu130 and g++ 13 on the
# H100 hosts (docs/gpu-runs.md). Linking it dynamically makes the wrapper use the process's.
_STATIC_RUNTIME_FLAGS = ("-static-libstdc++", "-static-libgcc")


@contextlib.contextmanager
def dynamic_cxx_runtime(removed: list[str]) -> Iterator[None]:
    """While building, drop static C++ runtime flags from Inductor's compiler commands."""
    try:
        from torch._inductor import cpp_builder
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(cpp_builder, "_run_compile_cmd", None)
    if original is None:  # another Inductor layout: nothing to adjust
        yield
        return

    def run(cmd_line: str, cwd: str) -> None:
        tokens = shlex.split(cmd_line)
        kept = [t for t in tokens if t not in _STATIC_RUNTIME_FLAGS]
        removed.extend(t for t in tokens if t in _STATIC_RUNTIME_FLAGS)
        original(shlex.join(kept), cwd)

    cpp_builder._run_compile_cmd = run
    try:
        yield
    finally:
        cpp_builder._run_compile_cmd = original


class AotiBackend:
    name = "aoti"
    artifact_suffix = ".pt2"

    def unavailable_reason(self) -> str | None:
        try:
            import torch._inductor  # noqa: F401
        except Exception as exc:  # pragma: no cover - torch ships Inductor
            return f"torch._inductor does not import: {exc}"
        return None

    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]

    def toolchain(self, device: str) -> dict[str, str]:
        versions = {"torch": torch.__version__}
        if device == "cuda":
            versions["cuda"] = str(torch.version.cuda)
        return versions

    def build(self, program: torch.export.ExportedProgram, profile: Sequence[InputProfile],
              device: str, options: dict[str, Any], workdir: Path,
              log: Callable[[str], None]) -> BuildResult:
        from torch._dynamo.utils import counters
        from torch._inductor import aoti_compile_and_package

        out = workdir / "engine.pt2"
        configs = {"max_autotune": bool(options.get("max_autotune", False))}
        log(f"aoti_compile_and_package(device={device}, inductor_configs={configs})")
        counters.clear()
        removed: list[str] = []
        with dynamic_cxx_runtime(removed):
            aoti_compile_and_package(program, package_path=str(out), inductor_configs=configs)
        if removed:
            log(f"linked the C++ runtime dynamically (dropped {sorted(set(removed))})")
        hits = int(counters["inductor"].get("fxgraph_cache_hit", 0))
        misses = int(counters["inductor"].get("fxgraph_cache_miss", 0))
        return BuildResult(out, {
            "inductor_configs": configs,
            # Users pay the cold cost; say whether Inductor's own cache made this build cheap.
            "compiler_cache": "warm" if hits and not misses else "cold",
            "fxgraph_cache": {"hits": hits, "misses": misses},
            "range_enforced_by_engine": False,
            "dropped_link_flags": sorted(set(removed)),
        })

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        from torch._inductor import aoti_load_package

        compiled = aoti_load_package(str(artifact))

        def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return list(tree_leaves(compiled(*inputs)))

        return run
