"""Run ``inspect_archive`` in a child process with its own memory and CPU limits.

The checks themselves are bounded (sizes, counts, ratios from real bytes, expression sizes),
but ``json.loads`` still costs about 20-70 bytes of memory per byte of JSON, and a bound that
is generous enough for a large real program is too generous for the API process, which serves
every other request too. So the API inspects in a child that caps its own address space
(``RLIMIT_AS``) and CPU time before it opens the upload: a bomb no rule foresaw ends the child
with ``archive_too_complex``, and the API's own memory does not move.

The child is Kiln's own code; the caps are set first thing in it (not with ``preexec_fn``,
which is unsafe in a threaded server).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from typing import Any

from service.archive import DEFAULT_LIMITS, ArchiveInfo, ArchiveLimits, DimSpec, InputSpec
from service.errors import KilnError

MiB = 1024**2
DEFAULT_MEMORY_BYTES = 1024 * MiB
DEFAULT_CPU_SECONDS = 120


def _to_wire(info: ArchiveInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def _from_wire(data: dict[str, Any]) -> ArchiveInfo:
    inputs = tuple(InputSpec(name=i["name"], dtype=i["dtype"],
                             dims=tuple(DimSpec(**d) for d in i["dims"]))
                   for i in data["inputs"])
    fields = dict(data, inputs=inputs, outputs=tuple(data["outputs"]),
                  pickled_entries=tuple(data["pickled_entries"]),
                  entry_sha256=tuple((n, d) for n, d in data["entry_sha256"]))
    return ArchiveInfo(**fields)


def _too_complex(reason: str, memory_bytes: int) -> KilnError:
    return KilnError("archive_too_complex", "inspecting the archive needed more memory or time "
                     f"than intake allows ({reason}); a program saved by torch.export.save "
                     "inspects well within it, so the archive is refused", 400,
                     {"reason": reason, "memory_limit": memory_bytes})


def inspect_isolated(path: str | os.PathLike[str], limits: ArchiveLimits = DEFAULT_LIMITS,
                     memory_bytes: int = DEFAULT_MEMORY_BYTES,
                     cpu_seconds: int = DEFAULT_CPU_SECONDS) -> ArchiveInfo:
    """``inspect_archive(path, limits)`` in a memory- and CPU-limited child process."""
    request = json.dumps({"path": os.fspath(path), "limits": dataclasses.asdict(limits),
                          "memory_bytes": memory_bytes, "cpu_seconds": cpu_seconds})
    try:
        done = subprocess.run([sys.executable, "-m", "service.archive.isolated"],
                              input=request, capture_output=True, text=True,
                              timeout=cpu_seconds * 2 + 30, check=False)
    except subprocess.TimeoutExpired:
        raise _too_complex("time limit", memory_bytes) from None
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        reason = "memory limit" if done.returncode in (-9, 1, 137) else (
            f"inspection process ended with status {done.returncode}")
        raise _too_complex(reason, memory_bytes) from None
    if "error" in reply:
        err = reply["error"]
        if err["code"] == "archive_too_complex":
            raise _too_complex(err["details"].get("reason", "memory limit"), memory_bytes)
        raise KilnError(err["code"], err["message"], err["status"], err["details"])
    return _from_wire(reply["info"])


def _child() -> None:
    request = json.loads(sys.stdin.read())
    memory, cpu = int(request["memory_bytes"]), int(request["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    from service.archive import inspect_archive

    try:
        info = inspect_archive(request["path"], ArchiveLimits(**request["limits"]))
        reply: dict[str, Any] = {"info": _to_wire(info)}
    except KilnError as exc:
        reply = {"error": {"code": exc.code, "message": exc.message, "status": exc.status,
                           "details": exc.details}}
    except MemoryError:
        reply = {"error": {"code": "archive_too_complex", "message": "", "status": 400,
                           "details": {"reason": "memory limit"}}}
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    _child()
