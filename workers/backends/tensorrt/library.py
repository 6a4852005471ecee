"""Which TensorRT library a backend uses, imported one way everywhere.

Two libraries share one Python API: standard TensorRT (module ``tensorrt``) and TensorRT-RTX
(module ``tensorrt_rtx``). The order of imports matters: ``torch_tensorrt`` installs a proxy as
``sys.modules["tensorrt"]`` when it is imported (pointing at ``tensorrt_rtx`` for its RTX
build), so on a host with Torch-TensorRT the standard library is imported *after* it, or the
two disagree about which library is loaded. Every module of this package goes through
:func:`import_library`; none imports ``tensorrt`` itself.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Library:
    """One TensorRT flavour: the module it imports as and the name the toolchain key uses."""

    key: str  # "tensorrt" or "tensorrt_rtx": the toolchain key's name for its version
    module: str
    title: str  # for messages


STANDARD = Library("tensorrt", "tensorrt", "TensorRT")
RTX = Library("tensorrt_rtx", "tensorrt_rtx", "TensorRT-RTX")


class LibraryUnavailable(RuntimeError):
    """The library does not import here; the message says why, for users."""


def import_library(library: Library) -> ModuleType:
    """The library's module (``trt``). Raises :class:`LibraryUnavailable` with the reason."""
    if library is STANDARD:
        if _torch_tensorrt_is_rtx():
            raise LibraryUnavailable(
                "this host's torch_tensorrt is the TensorRT-RTX build (torch-tensorrt-rtx): "
                "its `tensorrt` is TensorRT-RTX, not TensorRT; use the tensorrt-rtx backend")
        if importlib.util.find_spec("torch_tensorrt") is not None:
            import_torch_tensorrt()
    try:
        return importlib.import_module(library.module)
    # A broken install raises OSError (a missing libnvinfer) as often as ImportError.
    except Exception as exc:
        raise LibraryUnavailable(
            f"{library.module} is not importable: {type(exc).__name__}: {exc}") from exc


def import_torch_tensorrt() -> ModuleType:
    """``torch_tensorrt``, imported before any ``import tensorrt`` (see the module docstring).

    It initialises CUDA at import, so this fails on a host without a GPU.
    """
    try:
        return importlib.import_module("torch_tensorrt")
    except Exception as exc:
        raise LibraryUnavailable(
            f"torch_tensorrt is not importable: {type(exc).__name__}: {exc}") from exc


def _torch_tensorrt_is_rtx() -> bool:
    """Whether the installed torch_tensorrt distribution is the RTX build (no import)."""
    from importlib import metadata

    try:
        return "torch-tensorrt-rtx" in metadata.packages_distributions().get("torch_tensorrt", [])
    except Exception:  # metadata scanning is best effort; the import will tell
        return False


def version(trt: ModuleType) -> str:
    """The library's version as the toolchain key holds it: major.minor.patch.

    The fourth part is the build number (``1.7.1.116``); releases never share a
    major.minor.patch, and the short form reads as users know it (``tensorrt_rtx=1.7.1``).
    """
    return ".".join(str(trt.__version__).split(".")[:3])
