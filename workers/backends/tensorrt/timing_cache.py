"""Standard TensorRT's timing cache: one file per GPU model and TensorRT version per host.

A build starts from the host's file and merges what it measured back (``ITimingCache.combine``)
under a file lock, written by atomic rename, so concurrent builds neither tear nor drop
entries. The cache only saves time: any error reading or writing it (missing, unreadable,
corrupt, a full disk) leaves the build with a cold cache, never a failed build. TensorRT-RTX has
no timing cache (its calls are no-ops since 1.2), so its builds do not use this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

TIMING_CACHE_ENV = "KILN_TRT_TIMING_CACHE_DIR"
DEFAULT_TIMING_CACHE_DIR = "~/.cache/kiln/trt-timing"


def timing_cache_dir() -> Path:
    return Path(os.environ.get(TIMING_CACHE_ENV) or DEFAULT_TIMING_CACHE_DIR).expanduser()


def timing_cache_file(cache_dir: Path, gpu: str, compute_capability: str,
                      trt_version: str) -> Path:
    """One cache file per GPU model and TensorRT version: TensorRT refuses to mix either."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return Path(cache_dir) / f"{slug}-{compute_capability}-trt{trt_version}.cache"


def read(path: Path, log: Callable[[str], None]) -> bytes | None:
    """The cache's bytes, or None (a cold cache) on any error."""
    # Writers replace the file by rename, so a reader never sees half of one: no lock needed.
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log(f"timing cache {path} unreadable, building cold: {type(exc).__name__}: {exc}")
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def merge(shared: Path, ours: bytes, combine: Callable[[bytes, bytes], bytes],
          log: Callable[[str], None]) -> bool:
    """Fold this build's cache into the host's file; True when it was saved.

    Another build may have saved the file since this one read it, so the two are combined
    rather than the newer overwriting the older. A failure here never fails the build.
    """
    try:
        with _locked(shared):
            data = ours
            if shared.exists():
                data = combine(shared.read_bytes(), ours)
            _atomic_write(shared, data)
        return True
    except Exception as exc:
        log(f"timing cache not saved: {type(exc).__name__}: {exc}")
        return False


def combiner(trt: ModuleType, log: Callable[[str], None]) -> Callable[[bytes, bytes], bytes]:
    """``combine(shared, ours)`` with TensorRT's ``ITimingCache.combine``."""

    def combine(shared: bytes, ours: bytes) -> bytes:
        config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
        combined = config.create_timing_cache(shared)
        # ignore_mismatch=False: never fold in entries from another device or version.
        if combined.combine(config.create_timing_cache(ours), False):
            return bytes(memoryview(combined.serialize()))
        log("timing cache: could not combine with the shared cache; replacing it")
        return ours

    return combine
