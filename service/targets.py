"""The catalogue of build targets the API accepts, and the options each backend takes.

This is data only: the API validates requests against it without importing any toolchain.
A new backend is one entry here plus one module under ``workers/backends/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
        "Torch-TensorRT compiled program (.pt2) for graphs that need PyTorch fallback.",
    )


BACKENDS: dict[str, dict[str, Any]] = {
    "aoti": {"devices": ["cpu", "cuda"], "options": AotiOptions, "suffix": ".pt2"},
    "onnx": {"devices": ["cpu", "cuda"], "options": OnnxOptions, "suffix": ".onnx"},
    "tensorrt": {"devices": ["cuda"], "options": TensorRTOptions, "suffix": ".engine"},
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
        return spec["options"](**options).model_dump()
    except ValidationError as exc:
        raise KilnError(
            "invalid_options",
            f"options for backend {backend!r} are not valid",
            details={"errors": [
                {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                for e in exc.errors()
            ]},
        ) from exc
