"""AOTInductor: compile an exported program into a self-contained ``.pt2`` package.

AOTInductor compiles for the program's own symbolic ranges; it has no notion of an opt shape,
and the package does not enforce the range at run time (design.md section 6). Kiln checks the
profile against the program before building, validates at its edges, and records it with the
engine so loaders can enforce it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import zipfile
from collections.abc import Callable, Sequence
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


# A wrapper library that carries its own copy of libstdc++ crashes when it is loaded into a
# process that has another libstdc++: the two number std::locale facets differently, and the
# first std::regex (parse_device_str, while the model container is created) calls a wrong
# virtual. Seen on the H100 hosts, whose image sets CXX to a g++ wrapper that links the C++
# runtime statically (docs/gpu-runs.md). KILN_AOTI_CXX picks the compiler for AOTInductor
# builds; a build whose library does not link libstdc++.so is refused before it is loaded.


def linked_libraries(shared_object: Path) -> list[str] | None:
    """DT_NEEDED entries of a shared object, or None when readelf is not available."""
    try:
        out = subprocess.run(["readelf", "-d", str(shared_object)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def check_cxx_runtime(package: Path, workdir: Path, compiler: str | None = None
                      ) -> dict[str, Any]:
    """Refuse a package whose wrapper carries a static libstdc++ (it crashes when loaded)."""
    from service.errors import KilnError

    report: dict[str, Any] = {}
    with zipfile.ZipFile(package) as zf:
        for name in zf.namelist():
            if not name.endswith(".so"):
                continue
            target = workdir / "inspect" / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
            needed = linked_libraries(target)
            report[Path(name).name] = needed
            if needed is not None and not any(n.startswith("libstdc++") for n in needed):
                compiler = compiler or os.environ.get("CXX") or "g++"
                raise KilnError(
                    "aoti_static_cxx_runtime",
                    f"the compiler ({compiler}) "
                    "linked the C++ runtime into the package statically; loading it would crash "
                    "the process (std::locale mismatch). Point KILN_AOTI_CXX at a g++ that links "
                    "libstdc++ dynamically, e.g. /usr/bin/g++",
                    details={"library": name, "needed": needed})
    return report


def _chosen_compiler() -> str | None:
    from workers.cxx_compiler import choose

    return choose()["compiler"]


def gpu_identity() -> dict[str, Any]:
    """The GPU this build ran on, as the build process saw it (issue 13: proves pinning)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    uuid = getattr(props, "uuid", None)
    bus: list[int] = [getattr(props, k, -1) for k in
                      ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    return {"name": props.name, "uuid": f"GPU-{uuid}" if uuid is not None else None,
            "pci_bus_id": "{:08x}:{:02x}:{:02x}.0".format(*bus) if -1 not in bus else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "visible_count": torch.cuda.device_count()}


def bundle_with_weights(package: Path, program: torch.export.ExportedProgram,
                        workdir: Path) -> Path:
    """Zip a constants-free package with the program's weights (Kiln's swappable format)."""
    from kiln.engine_format import SWAPPABLE_FORMAT

    weights = {k: v.detach().contiguous() for k, v in
               {**program.state_dict, **program.constants}.items() if isinstance(v, torch.Tensor)}
    torch.save(weights, workdir / "weights.pt")
    out = workdir / "engine.aoti.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("kiln.json", json.dumps({"format": SWAPPABLE_FORMAT}))
        zf.write(package, "package.pt2")
        zf.write(workdir / "weights.pt", "weights.pt")
    return out


class AotiBackend:
    name = "aoti"
    artifact_suffix = ".pt2"

    def unavailable_reason(self) -> str | None:
        try:
            import torch._inductor  # noqa: F401
        except Exception as exc:  # pragma: no cover - torch ships Inductor
            return f"torch._inductor does not import: {exc}"
        from workers.cxx_compiler import choose

        choice = choose()
        return None if choice["compiler"] else str(choice["reason"])

    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]

    def toolchain(self, device: str) -> dict[str, str]:
        versions: dict[str, str] = {"torch": str(torch.__version__)}
        if device == "cuda":
            versions["cuda"] = str(torch.version.cuda)
        return versions

    def build(self, program: torch.export.ExportedProgram, profile: Sequence[InputProfile],
              device: str, options: dict[str, Any], workdir: Path,
              log: Callable[[str], None]) -> BuildResult:
        from torch._dynamo.utils import counters
        from torch._inductor import aoti_compile_and_package

        swappable = bool(options.get("swappable_weights", False))
        out = workdir / "engine.pt2"
        configs: dict[str, Any] = {"max_autotune": bool(options.get("max_autotune", False))}
        if swappable:
            configs["aot_inductor.package_constants_in_so"] = False
        # The worker chose the compiler at start and passes it as KILN_AOTI_CXX; a child
        # started some other way asks the (cached) choice itself.
        compiler = os.environ.get("KILN_AOTI_CXX") or _chosen_compiler()
        if compiler:
            configs["cpp.cxx"] = compiler
        log(f"aoti_compile_and_package(device={device}, inductor_configs={configs})")
        counters.clear()
        aoti_compile_and_package(program, package_path=str(out), inductor_configs=configs)
        linked = check_cxx_runtime(out, workdir, compiler)
        if swappable:
            out = bundle_with_weights(out, program, workdir)
        hits = int(counters["inductor"].get("fxgraph_cache_hit", 0))
        misses = int(counters["inductor"].get("fxgraph_cache_miss", 0))
        return BuildResult(out, {
            "inductor_configs": configs,
            # Users pay the cold cost; say whether Inductor's own cache made this build cheap.
            "compiler_cache": "warm" if hits and not misses else "cold",
            "fxgraph_cache": {"hits": hits, "misses": misses},
            "range_enforced_by_engine": False,
            "linked_libraries": linked,
            "cxx": compiler,
            **({"gpu": gpu_identity()} if device == "cuda" else {}),
        })

    def swap_weights(self, base: Path, program: torch.export.ExportedProgram, workdir: Path,
                     log: Callable[[str], None]) -> BuildResult:
        """A new engine from a swappable one: its compiled code, this program's weights."""
        with zipfile.ZipFile(base) as zf:
            (workdir / "base").mkdir(exist_ok=True)
            package = Path(zf.extract("package.pt2", workdir / "base"))
        log(f"weight swap: reusing the compiled code of {base.name}")
        return BuildResult(bundle_with_weights(package, program, workdir),
                           {"weight_swap": True, "range_enforced_by_engine": False})

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        from kiln.loader import load_aoti_package

        compiled = load_aoti_package(artifact)

        def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return list(tree_leaves(compiled(*inputs)))

        return run
