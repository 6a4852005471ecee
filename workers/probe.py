"""Report what this host can build, as JSON on stdout.

Run as ``python -m workers.probe`` in a child process: importing toolchains and asking CUDA
about devices happens there, so the Celery process that forks nothing else never initialises
CUDA, and a toolchain that crashes on import takes only the probe down.

Each target says what the worker can do with it, never more: ``builds`` always, ``runs`` only
when this host can load and run what it builds (a TensorRT-RTX worker on a CPU-only host or on
an sm_90 GPU builds plans it cannot validate, and says why in ``runs_reason``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import torch

from service.cache import Target, toolchain_id
from service.worker_registry import queue_name
from workers.backends import BACKEND_NAMES, get_backend
from workers.backends.aoti import cpu_arch
from workers.backends.base import AheadOfTimeBuilder, Backend
from workers.cxx_compiler import last_choice


def cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "machine": platform.machine(), "cpu_arch": cpu_arch()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "compute_capability": cuda_arch(),
                       "memory_mb": props.total_memory // 2**20, "cuda": torch.version.cuda,
                       "count": torch.cuda.device_count()}
    return info


def target_arch(backend: Backend, device: str) -> str:
    if isinstance(backend, AheadOfTimeBuilder):
        return backend.target_arch(device)
    return cuda_arch() if device == "cuda" else cpu_arch()


def capabilities(backend: Backend) -> dict[str, Any]:
    """What a worker announces beyond the target: whether it runs what it builds, frontends."""
    found: dict[str, Any] = {"builds": True, "runs": True}
    run_capability = getattr(backend, "run_capability", None)
    if run_capability is not None:
        reason = run_capability()
        found.update(runs=reason is None, **({"runs_reason": reason} if reason else {}))
    frontends = getattr(backend, "frontends", None)
    if frontends is not None:
        found["frontends"] = frontends()
    return found


def probe(backends: list[str]) -> dict[str, Any]:
    targets, unavailable = [], {}
    for name in backends:
        backend = get_backend(name)
        reason = backend.unavailable_reason()
        if reason:
            unavailable[name] = reason
            continue
        for device in backend.devices():
            versions = backend.toolchain(device)
            target = Target(name, device, target_arch(backend, device), toolchain_id(versions))
            targets.append({**target.as_dict(), "toolchain": versions,
                            "queue": queue_name(target), **capabilities(backend)})
    return {"targets": targets, "unavailable": unavailable,
            "host": {**host_info(), "aoti_cxx": last_choice(),
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}


if __name__ == "__main__":
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else list(BACKEND_NAMES)
    print(json.dumps(probe(wanted)))
