"""Build backends by name. Each module imports its toolchain lazily, inside the build child."""

from __future__ import annotations

from workers.backends.base import Backend


def get_backend(name: str) -> Backend:
    if name == "aoti":
        from workers.backends.aoti import AotiBackend

        return AotiBackend()
    if name == "onnx":
        from workers.backends.onnx import OnnxBackend

        return OnnxBackend()
    if name == "tensorrt":
        from workers.backends.tensorrt import TensorRTBackend

        return TensorRTBackend()
    raise KeyError(f"unknown backend {name!r}")


BACKEND_NAMES = ("aoti", "onnx", "tensorrt")
