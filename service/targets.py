"""The catalogue of build targets the API accepts, and the options each backend takes.

This is data only: the API validates requests against it without importing any toolchain,
and ``workers.backends`` builds its registry from the same table (``BACKENDS[name]["impl"]``
names the class), so a backend's name, devices, options and artifact suffix are decided here
once. A new backend is one entry here plus one module under ``workers/backends/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import KilnError


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AotiOptions(_Options):
    max_autotune: bool = Field(False, description="Inductor max-autotune (slower build).")
    swappable_weights: bool = Field(
        False, description="Keep the weights outside the compiled code: the artifact is a zip "
        "of the package and its weights, and a model with the same architecture but other "
        "weights reuses the compiled code without a build. Load with kiln.load.")


class OnnxOptions(_Options):
    opset: int = Field(18, ge=17, le=23, description="ONNX opset version.")
    optimize: bool = Field(True, description="Run the ONNX optimizer after export.")


class TensorRTOptions(_Options):
    frontend: Literal["onnx", "torch_tensorrt"] = Field(
        "onnx",
        description="'onnx': Kiln's ONNX export read by TensorRT's ONNX parser (the route "
        "`trtexec --onnx` users know). 'torch_tensorrt': Torch-TensorRT converts the program "
        "itself (workers where torch_tensorrt imports; needed for format 'exported_program').",
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the export (onnx frontend).")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder level 0-5.")
    workspace_mb: int | None = Field(None, ge=16, description="Workspace memory pool limit.")
    hardware_compatible: bool = Field(
        False, description="Ampere-and-later portable engine (slower; recorded in the key)."
    )
    version_compatible: bool = Field(
        False, description="Engine loadable by later TensorRT versions (recorded in the key)."
    )
    format: Literal["engine", "exported_program"] = Field(
        "engine",
        description="'engine': a serialized TensorRT plan. 'exported_program': a "
        "Torch-TensorRT compiled program (.pt2) for graphs that need PyTorch fallback "
        "(frontend 'torch_tensorrt' only).",
    )

    @model_validator(mode="after")
    def _format_needs_its_frontend(self) -> TensorRTOptions:
        if self.format == "exported_program" and self.frontend != "torch_tensorrt":
            raise ValueError("format 'exported_program' needs frontend 'torch_tensorrt'")
        return self


# What TensorRT-RTX 1.7 lists as the compute capabilities its plans can target (its
# ComputeCapability enum less SM75, for which it builds no plan); sm_90 (H100/H200) is not one.
RtxComputeCapability = Literal["sm_80", "sm_86", "sm_89", "sm_120", "sm_121"]
RTX_COMPUTE_CAPABILITIES: tuple[RtxComputeCapability, ...] = (
    "sm_80", "sm_86", "sm_89", "sm_120", "sm_121")

# Standard-TensorRT options TensorRT-RTX does not have, and what to use instead.
_RTX_LACKS = {
    "hardware_compatible": "TensorRT-RTX ignores hardware compatibility levels; its plans are "
    "portable across the GPUs named in compute_capabilities",
    "version_compatible": "TensorRT-RTX plans never load in another TensorRT-RTX release",
    "optimization_level": "TensorRT-RTX builds the same plan at every optimisation level",
    "frontend": "TensorRT-RTX builds from Kiln's ONNX export only",
    "format": "TensorRT-RTX produces serialized plans only",
}


class TensorRTRtxOptions(_Options):
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the export.")
    workspace_mb: int | None = Field(None, ge=16, description="Workspace memory pool limit.")
    compute_capabilities: list[RtxComputeCapability] = Field(
        default_factory=lambda: list(RTX_COMPUTE_CAPABILITIES),
        min_length=1,
        description="GPUs the plan must run on (TensorRT-RTX compiles kernels for each; the "
        "plan loads on no other). Default: every one TensorRT-RTX supports. sm_90 "
        "(H100/H200) is not supported by TensorRT-RTX.",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_standard_only_options(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in _RTX_LACKS.items():
                if name in data:
                    raise ValueError(f"{name!r} is a standard TensorRT option: {why}")
        return data

    @model_validator(mode="after")
    def _canonical_order(self) -> TensorRTRtxOptions:
        # One key per set of GPUs, however the request orders or repeats them.
        self.compute_capabilities = sorted(
            set(self.compute_capabilities), key=RTX_COMPUTE_CAPABILITIES.index)
        return self


# Input dtypes each backend can take ("float32", as profiles write them). TensorRT has no
# float64, int16, unsigned types wider than 8 bits, complex or float8_e5m2 tensors.
TENSORRT_DTYPES = ("float32", "float16", "bfloat16", "int8", "int32", "int64", "bool",
                   "uint8", "float8_e4m3fn")

BACKENDS: dict[str, dict[str, Any]] = {
    "aoti": {"devices": ["cpu", "cuda"], "options": AotiOptions, "suffix": ".pt2",
             "impl": "workers.backends.aoti:AotiBackend"},
    "onnx": {"devices": ["cpu", "cuda"], "options": OnnxOptions, "suffix": ".onnx",
             "impl": "workers.backends.onnx:OnnxBackend"},
    "tensorrt": {"devices": ["cuda"], "options": TensorRTOptions, "suffix": ".engine",
                 "dtypes": TENSORRT_DTYPES,
                 "impl": "workers.backends.tensorrt:TensorRTBackend"},
    # Builds on any worker with the library, CPU-only included; runs on the GPUs above.
    "tensorrt-rtx": {"devices": ["cuda"], "options": TensorRTRtxOptions, "suffix": ".engine",
                     "dtypes": TENSORRT_DTYPES,
                     "impl": "workers.backends.tensorrt:TensorRTRtxBackend"},
}


def normalize_options(backend: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate ``options`` for ``backend`` and return them with defaults filled in.

    Filling defaults matters for the cache: ``{}`` and ``{"opset": 18}`` are the same build
    and must share one key.
    """
    spec = BACKENDS.get(backend)
    if spec is None:
        raise KilnError(
            "unknown_backend",
            f"backend {backend!r} is not one of {sorted(BACKENDS)}",
            details={"backend": backend, "known": sorted(BACKENDS)},
        )
    if device not in spec["devices"]:
        raise KilnError(
            "unsupported_device",
            f"backend {backend!r} builds for {spec['devices']}, not {device!r}",
            details={"backend": backend, "device": device, "supported": spec["devices"]},
        )
    try:
        return dict(spec["options"](**options).model_dump())
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]),
                   "message": e["msg"].removeprefix("Value error, ")} for e in exc.errors()]
        raise KilnError(
            "invalid_options",
            f"options for backend {backend!r} are not valid: "
            + "; ".join(f"{e['field'] or 'options'}: {e['message']}" for e in errors),
            details={"errors": errors},
        ) from exc


def dtype_problems(backend: str, profile: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The profile's inputs whose dtype ``backend`` cannot take, one problem per input."""
    allowed = BACKENDS.get(backend, {}).get("dtypes")
    if allowed is None:
        return []
    return [{"code": "unsupported_dtype", "input": p["name"], "dtype": p["dtype"],
             "message": f"input {p['name']!r} is {p['dtype']}, which {backend} cannot take; "
             f"cast it in the program to one of {list(allowed)}"}
            for p in profile if p["dtype"] not in allowed]


def check_dtypes(backend: str, profile: list[dict[str, Any]]) -> None:
    """Refuse (422 ``unsupported_dtype``) a profile with inputs ``backend`` cannot take."""
    problems = dtype_problems(backend, profile)
    if problems:
        raise KilnError("unsupported_dtype", "; ".join(p["message"] for p in problems),
                        status=422, details={"errors": problems})
