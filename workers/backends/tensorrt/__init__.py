"""TensorRT engines: serialized plans built by standard TensorRT or by TensorRT-RTX.

Two backends share one builder (``builder``) over the TensorRT Python API:

- ``tensorrt`` (standard TensorRT): built on the GPU that runs it, so every plan is validated
  in the build job. Frontend ``onnx`` (default) or ``torch_tensorrt`` (``torch_frontend``, for
  hosts where Torch-TensorRT imports; the only route to the ``exported_program`` format). A
  timing cache per GPU model and TensorRT version speeds up rebuilds (``timing_cache``).
- ``tensorrt-rtx`` (TensorRT-RTX): builds ahead of time on any worker, CPU-only included, for
  the compute capabilities in the options (Ampere, Ada, Blackwell; not sm_90). A worker that
  cannot run the plan (no GPU, or a GPU outside the plan's targets) checks what it can without
  running it (the plan's profile, I/O names and dtypes, as the builder held them) and stores the
  engine as ``not_run`` with the reason; a worker whose GPU the plan targets validates it at
  min/opt/max against eager, like every other backend.

The route is Kiln's ONNX export then TensorRT's ``OnnxParser`` (``onnx_frontend``): the same
export the ``onnx`` backend ships, and the one route both libraries have (Torch-TensorRT cannot
import without a GPU, and its RTX build trails TensorRT-RTX's releases).

The toolchain key names the library and its version (``tensorrt=10.15.1`` or
``tensorrt_rtx=1.7.1``), the exporter's versions, and where plans run: the GPU's compute
capability for ``tensorrt``, the targeted set for ``tensorrt-rtx``. The frontend is an option,
so it is in the cache key too.

Nothing here imports a TensorRT library at module import: this package must import, and its
pure helpers must run, on hosts without one (the API host, CI without the extra).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from service.errors import KilnError
from service.targets import RTX_COMPUTE_CAPABILITIES, dtype_problems
from workers.backends import artifact_suffix
from workers.backends.base import BuildResult, InputProfile, Runner
from workers.backends.tensorrt import onnx_frontend, timing_cache
from workers.backends.tensorrt.builder import BuildSettings, build_plan
from workers.backends.tensorrt.library import (
    RTX,
    STANDARD,
    Library,
    LibraryUnavailable,
    import_library,
    import_torch_tensorrt,
    version,
)
from workers.backends.tensorrt.plan import (
    EngineRunner,
    check_against_request,
    describe_engine,
    deserialize,
)

ENGINE_FORMAT = "engine"
PROGRAM_FORMAT = "exported_program"


def profile_problems(profile: Sequence[InputProfile], fmt: str = ENGINE_FORMAT) -> list[str]:
    """What TensorRT cannot build from ``profile``; the service checks the program's ranges."""
    problems = []
    for p in profile:
        if not len(p.min) == len(p.opt) == len(p.max):
            problems.append(f"input {p.name!r}: min, opt and max have different ranks")
            continue
        for axis, (lo, mid, hi) in enumerate(zip(p.min, p.opt, p.max, strict=True)):
            if not 0 <= lo <= mid <= hi:
                problems.append(f"input {p.name!r} dim {axis}: need 0 <= min <= opt <= max, "
                                f"got {lo}, {mid}, {hi}")
            elif lo == 0 and hi > 0:
                # TensorRT clamps a 0 minimum to 1, so the engine would not accept empty inputs.
                problems.append(f"input {p.name!r} dim {axis}: a dynamic dim cannot start at 0")
            elif fmt == PROGRAM_FORMAT and lo != hi and mid == 1:
                # Re-exporting at opt size hits torch.export's 0/1 specialisation.
                problems.append(f"input {p.name!r} dim {axis}: opt must be >= 2 for the "
                                "exported_program format")
    return problems


def check_request(backend: str, profile: Sequence[InputProfile], fmt: str) -> None:
    """Refuse what no TensorRT build can serve, before any library is touched."""
    bad_dtypes = dtype_problems(backend, [{"name": p.name, "dtype": p.dtype} for p in profile])
    if bad_dtypes:
        raise KilnError("unsupported_dtype", "; ".join(p["message"] for p in bad_dtypes),
                        status=422, details={"errors": bad_dtypes})
    problems = profile_problems(profile, fmt)
    if problems:
        raise KilnError("invalid_profile", "the shape profile cannot be built: "
                        + "; ".join(problems), status=422, details={"problems": problems})


def program_output_count(program: torch.export.ExportedProgram) -> int:
    return len(program.graph_signature.user_outputs)


def gpu_compute_capability() -> str | None:
    """``sm_XY`` of GPU 0, or None without a usable CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _frontend_unavailable() -> str | None:
    for module in ("onnx", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} (Kiln's ONNX export) is not importable: {exc}"
    return None


class _PlanBackend:
    """What both TensorRT backends share: the library, the ONNX route, the runner."""

    name: str
    library: Library
    artifact_suffix: str

    def _trt(self) -> ModuleType:
        return import_library(self.library)

    def _library_unavailable(self) -> str | None:
        try:
            self._trt()
        except LibraryUnavailable as exc:
            return str(exc)
        return _frontend_unavailable()

    def devices(self) -> list[str]:
        return ["cuda"] if self.unavailable_reason() is None else []

    def unavailable_reason(self) -> str | None:
        raise NotImplementedError

    def _build_onnx(
        self,
        program: torch.export.ExportedProgram,
        profile: Sequence[InputProfile],
        options: dict[str, Any],
        settings: BuildSettings,
        workdir: Path,
        log: Callable[[str], None],
    ) -> tuple[Path, dict[str, Any], bytes | None]:
        trt = self._trt()
        onnx_path, export_report = onnx_frontend.export_onnx(
            program, profile, int(options.get("opset", 18)), workdir, log)
        log(f"building with {self.library.title} {trt.__version__}: {settings_report(settings)}")
        built = build_plan(self.library, trt, onnx_path.read_bytes(), profile, settings, log)
        problems = check_against_request(profile, built.inputs, built.outputs,
                                         program_output_count(program))
        if problems:
            raise KilnError("engine_mismatch", "the built plan is not the one requested: "
                            + "; ".join(problems), status=500, details={"problems": problems})
        artifact = Path(workdir) / f"model{self.artifact_suffix}"
        artifact.write_bytes(built.plan)
        report: dict[str, Any] = {
            "format": ENGINE_FORMAT,
            "library": f"{self.library.key}={version(trt)}",
            "frontend": "onnx",
            "onnx": export_report,
            "builder": settings_report(settings),
            "plan": {"inputs": built.inputs, "outputs": built.outputs},
            "precision": "strongly typed: layer dtypes follow the program's dtypes",
            "size_bytes": artifact.stat().st_size,
            "checked_without_running": [
                "the plan's optimisation profile equals the request (read back from the "
                "builder's profile)", "input names and dtypes equal the request's",
                "one output per program output, named output0..N-1"],
        }
        return artifact, report, built.timing_cache

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        if device != "cuda":
            raise ValueError(f"the {self.name} backend runs on 'cuda', not {device!r}")
        return EngineRunner(self.library, self._trt(), Path(artifact), profile)


def settings_report(settings: BuildSettings) -> dict[str, Any]:
    return {k: v for k, v in vars(settings).items()
            if k != "timing_cache" and v not in (None, False, ())}


class TensorRTBackend(_PlanBackend):
    """Standard TensorRT, built and validated on the GPU that will run the plan."""

    name = "tensorrt"
    library = STANDARD
    artifact_suffix = artifact_suffix("tensorrt")

    def unavailable_reason(self) -> str | None:
        reason = self._library_unavailable()
        if reason:
            return reason
        if gpu_compute_capability() is None:
            return "no CUDA GPU: standard TensorRT builds on the GPU that runs the plan"
        return None

    def frontends(self) -> list[str]:
        found = ["onnx"]
        try:
            import_torch_tensorrt()
            found.append("torch_tensorrt")
        except LibraryUnavailable:
            pass
        return found

    def toolchain(self, device: str) -> dict[str, str]:
        trt = self._trt()
        versions = {"torch": str(torch.__version__), "tensorrt": version(trt),
                    "cuda": torch.version.cuda or "",
                    "compute_capability": gpu_compute_capability() or "",
                    "gpu": torch.cuda.get_device_name(), **onnx_frontend.toolchain()}
        if "torch_tensorrt" in self.frontends():
            versions["torch_tensorrt"] = str(import_torch_tensorrt().__version__)
        return versions

    def build(
        self,
        program: torch.export.ExportedProgram,
        profile: Sequence[InputProfile],
        device: str,
        options: dict[str, Any],
        workdir: Path,
        log: Callable[[str], None],
    ) -> BuildResult:
        if device != "cuda":
            raise KilnError("unsupported_device",
                            f"the tensorrt backend builds for 'cuda', not {device!r}")
        fmt = options.get("format", ENGINE_FORMAT)
        check_request(self.name, profile, fmt)
        toolchain = self.toolchain(device)
        if options.get("frontend", "onnx") == "torch_tensorrt":
            from workers.backends.tensorrt import torch_frontend as frontend

            return frontend.build(program, profile, options, toolchain, workdir, log)
        if fmt != ENGINE_FORMAT:
            raise KilnError("invalid_options", "format 'exported_program' needs frontend "
                            "'torch_tensorrt'", status=422)
        trt = self._trt()
        shared = timing_cache.timing_cache_file(
            timing_cache.timing_cache_dir(), toolchain["gpu"], toolchain["compute_capability"],
            toolchain["tensorrt"])
        warm = timing_cache.read(shared, log)
        log(f"timing cache {shared} ({'warm' if warm else 'cold'})")
        settings = BuildSettings(
            optimization_level=options.get("optimization_level", 3),
            workspace_bytes=(int(options["workspace_mb"]) * 2**20
                             if options.get("workspace_mb") else None),
            hardware_compatible=bool(options.get("hardware_compatible")),
            version_compatible=bool(options.get("version_compatible")),
            timing_cache=warm, use_timing_cache=True)
        artifact, report, cache = self._build_onnx(program, profile, options, settings,
                                                   workdir, log)
        saved = cache is not None and timing_cache.merge(
            shared, cache, timing_cache.combiner(trt, log), log)
        report["toolchain"] = toolchain
        report["timing_cache"] = {"path": str(shared), "warm": warm is not None, "saved": saved}
        # Standard TensorRT builds on the GPU that runs the plan: read the plan itself back.
        _, engine = deserialize(self.library, trt, artifact.read_bytes())
        info = describe_engine(trt, engine)
        report["engine"] = info
        problems = check_against_request(profile, info["inputs"], info["outputs"],
                                         program_output_count(program))
        if settings.hardware_compatible and info["hardware_compatibility_level"] != "AMPERE_PLUS":
            problems.append(f"engine hardware compatibility is "
                            f"{info['hardware_compatibility_level']}, asked AMPERE_PLUS")
        if problems:
            raise KilnError("engine_mismatch", "the built engine is not the one requested: "
                            + "; ".join(problems), status=500, details={"problems": problems})
        return BuildResult(artifact=artifact, report=report)

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        if Path(artifact).suffix == ".pt2":
            from workers.backends.tensorrt import torch_frontend as frontend

            return frontend.load_program(Path(artifact))
        return super().load(artifact, device, profile)


class TensorRTRtxBackend(_PlanBackend):
    """TensorRT-RTX: plans built ahead of time on any host, for the GPUs the options name."""

    name = "tensorrt-rtx"
    library = RTX
    artifact_suffix = artifact_suffix("tensorrt-rtx")

    def unavailable_reason(self) -> str | None:
        return self._library_unavailable()

    def target_arch(self, device: str) -> str:
        return "+".join(RTX_COMPUTE_CAPABILITIES)

    def toolchain(self, device: str) -> dict[str, str]:
        return {"torch": str(torch.__version__), "tensorrt_rtx": version(self._trt()),
                "compute_capabilities": self.target_arch(device), **onnx_frontend.toolchain()}

    def run_capability(self, targets: Sequence[str] = RTX_COMPUTE_CAPABILITIES) -> str | None:
        """None when this host can run plans for ``targets``, else why not."""
        cc = gpu_compute_capability()
        title = f"{self.library.title} {version(self._trt())}"
        if cc is None:
            return (f"no CUDA GPU on this worker: {title} builds plans here ahead of time but "
                    f"cannot run them; they run on {', '.join(targets)}")
        if cc not in targets:
            major, minor = cc.removeprefix("sm_")[:-1], cc[-1]
            supported = " ".join(RTX_COMPUTE_CAPABILITIES)
            return (f"compute capability {major}.{minor} not supported by {title} "
                    f"({torch.cuda.get_device_name()}; it runs plans on {supported}"
                    + (f", and this plan targets {' '.join(targets)}"
                       if tuple(targets) != RTX_COMPUTE_CAPABILITIES else "") + ")")
        return None

    def cannot_run_reason(self, built: BuildResult, device: str) -> str | None:
        return self.run_capability(built.report.get("compute_capabilities")
                                   or RTX_COMPUTE_CAPABILITIES)

    def build(
        self,
        program: torch.export.ExportedProgram,
        profile: Sequence[InputProfile],
        device: str,
        options: dict[str, Any],
        workdir: Path,
        log: Callable[[str], None],
    ) -> BuildResult:
        if device != "cuda":
            raise KilnError("unsupported_device",
                            f"the tensorrt-rtx backend builds for 'cuda', not {device!r}")
        check_request(self.name, profile, ENGINE_FORMAT)
        targets = tuple(options.get("compute_capabilities") or RTX_COMPUTE_CAPABILITIES)
        settings = BuildSettings(
            workspace_bytes=(int(options["workspace_mb"]) * 2**20
                             if options.get("workspace_mb") else None),
            compute_capabilities=targets)
        if gpu_compute_capability() is None:
            log("no CUDA GPU: TensorRT-RTX builds in CPU-only mode")
        artifact, report, _ = self._build_onnx(program, profile, options, settings, workdir, log)
        report["toolchain"] = self.toolchain(device)
        report["compute_capabilities"] = list(targets)
        report["timing_cache"] = "not used: TensorRT-RTX has none (its runtime compiles kernels)"
        return BuildResult(artifact=artifact, report=report)
