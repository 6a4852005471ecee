"""Build backends by name: the registry is ``service.targets.BACKENDS``, read here.

Each entry names its implementation as ``module:Class``; the module is imported only when the
backend is asked for, inside the build child or the probe, because it may import a toolchain.
The artifact suffix comes from the same entry, so it is decided once for the API and workers.
"""

from __future__ import annotations

import importlib

from service.targets import BACKENDS
from workers.backends.base import Backend

BACKEND_NAMES = tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    spec = BACKENDS.get(name)
    if spec is None:
        raise KeyError(f"unknown backend {name!r}")
    module_name, _, class_name = spec["impl"].partition(":")
    backend: Backend = getattr(importlib.import_module(module_name), class_name)()
    return backend


def artifact_suffix(name: str) -> str:
    """The file suffix of ``name``'s artifacts (".engine", ".pt2", ...)."""
    suffix: str = BACKENDS[name]["suffix"]
    return suffix
