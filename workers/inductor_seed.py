"""A seed for every build's Inductor cache: the worker's own probe results, copied into each
build's work dir.

Each sandboxed build starts with an empty private /tmp, so Inductor re-ran its CPU
instruction-set probe (it compiles and runs a small C++ program per instruction set) in every
build: 12 s of a 40 s convnet build on 2 cores, measured (the probe took 14.1 s in the sandbox,
2.2 s outside it with a warm cache). The worker runs that probe once at start, in its own
process with its chosen compiler - no uploaded code involved - into a seed directory, and
copies the seed into each build's work dir, where the child's ``TORCHINDUCTOR_CACHE_DIR``
points. A build changes only its own copy: nothing one build writes reaches another (a shared
writable cache would let one user's build plant compiled code in the next user's). The seed is
made once per host for an interpreter, torch version and compiler, so a restarted worker does
not pay the probe again.

The seed also carries the compiler check's precompiled headers (``precompiled_headers``:
torch's AOTInductor wrapper and kernel prelude headers, ~150 MB each). Torch keeps those in
``$TMPDIR/torchinductor_<user>`` whatever the cache dir, so each sandboxed build (an empty
private /tmp) compiled them again: 13 s of a 36 s convnet build on 2 cores. They are not
copied (300 MB per build): each build's copy of the seed holds symlinks to them, and the
sandbox binds the seed's header directory read-only (:func:`readonly_paths`), so a build
reads them and cannot change them - not even by chmod: inside its user namespace the worker's
files are the child's own, so a hard link or a mode would not protect them; a read-only mount
does. A header the seed lacks the build compiles into its own directory. The child points
torch's header directory at its copy (:func:`use_seeded_headers`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIRNAME = "inductor-cache"
HEADERS_DIRNAME = "precompiled_headers"
# Part of the seed's key: what a seed holds changed (precompiled headers since version 2).
SEED_VERSION = "2"
# In a fresh process, as a build child runs it: the compiler the children use (KILN_AOTI_CXX)
# is part of what the probe's cache entries are keyed by.
_PROBE = """
import os
from torch._inductor import config, cpu_vec_isa
if os.environ.get("KILN_AOTI_CXX"):
    config.cpp.cxx = os.environ["KILN_AOTI_CXX"]
print(cpu_vec_isa.pick_vec_isa())
"""
_seed: Path | None = None
READY = "kiln-seed-ready"


def _seed_key() -> str:
    """What the probe's results depend on: the interpreter, torch's version, the compiler."""
    from importlib.metadata import version

    return hashlib.sha256("\0".join((SEED_VERSION, sys.executable, version("torch"),
                                      os.environ.get("KILN_AOTI_CXX", ""))).encode()
                          ).hexdigest()[:16]


def prepare(scratch_dir: Path, timeout_s: float = 300, start_from: str | None = None
            ) -> Path | None:
    """The seed for this interpreter, torch and compiler: made once per host (a restarted
    worker reuses it), or None (builds start cold) if the probe fails. ``start_from``: an
    Inductor cache the worker made itself with the same compiler (its compiler check's), copied
    in first so the probe finds its programs compiled."""
    global _seed
    scratch_dir.mkdir(parents=True, exist_ok=True)
    final = scratch_dir / f"inductor-seed-{_seed_key()}"
    if (final / READY).is_file():
        _seed = final
        return final
    seed = Path(tempfile.mkdtemp(prefix=".inductor-seed-", dir=scratch_dir))
    started_from = bool(start_from and Path(start_from).is_dir())
    if start_from and started_from:
        shutil.copytree(start_from, seed, symlinks=True, dirs_exist_ok=True)
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ,
                                                      "TORCHINDUCTOR_CACHE_DIR": str(seed)})
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = None
        problem = str(exc)
    if done is None or done.returncode != 0:
        if done is not None:
            problem = f"exit {done.returncode}: {done.stderr[-500:]}"
        log.warning("the Inductor cache seed could not be made (%s): builds start cold",
                    problem)
        shutil.rmtree(seed, ignore_errors=True)
        return None
    (seed / READY).write_text(done.stdout.strip())
    if final.exists() and not (final / READY).is_file():
        shutil.rmtree(final, ignore_errors=True)  # left half-made by a crash
    try:
        seed.rename(final)  # atomic; another worker of this host may have been first
    except OSError:
        shutil.rmtree(seed, ignore_errors=True)
    log.warning("Inductor cache seed ready (CPU instruction set: %s; %s)", done.stdout.strip(),
                "from the compiler check's cache" if started_from else "from empty")
    _seed = final
    return final


def child_cache_env(workdir: Path) -> dict[str, str]:
    """Copy the seed into ``workdir`` (when there is one); the child's environment for it."""
    if _seed is None or not _seed.is_dir():
        return {}
    dest = workdir / CACHE_DIRNAME
    shutil.copytree(_seed, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda where, names: [HEADERS_DIRNAME] if Path(where) == _seed else [])
    headers = _seed / HEADERS_DIRNAME
    if headers.is_dir():
        # Links into the read-only mount of the seed's headers; the directory is the build's
        # own, for torch's locks and any header the seed lacks.
        (dest / HEADERS_DIRNAME).mkdir(exist_ok=True)
        for header in headers.iterdir():
            if header.is_file():
                (dest / HEADERS_DIRNAME / header.name).symlink_to(header)
    return {"TORCHINDUCTOR_CACHE_DIR": str(dest)}


def readonly_paths() -> list[Path]:
    """What the sandbox binds read-only for every build: the seed's precompiled headers."""
    headers = _seed / HEADERS_DIRNAME if _seed is not None else None
    return [headers] if headers is not None and headers.is_dir() else []


def use_seeded_headers() -> Path | None:
    """In a sandboxed build child, before it compiles: point torch's header directory
    (``<tmp>/torchinductor_<user>/precompiled_headers``, in the sandbox's own empty /tmp) at
    the build's copy of the seed's. Only in a sandbox: elsewhere /tmp is the host's, shared.
    Returns the directory linked to, or None (no seeded headers, or torch's dir exists)."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache or not (Path(cache) / HEADERS_DIRNAME).is_dir():
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    link = Path(default_cache_dir()) / HEADERS_DIRNAME
    if link.exists() or link.is_symlink():
        return None
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(cache) / HEADERS_DIRNAME, target_is_directory=True)
    return Path(cache) / HEADERS_DIRNAME
