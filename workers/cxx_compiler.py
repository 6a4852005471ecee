"""Pick the C++ compiler AOTInductor builds with: the first candidate whose package loads.

A compiler that links libstdc++ statically into the package's wrapper library makes a package
that crashes the process loading it (two copies of libstdc++ disagree about ``std::locale``
facets; docs/gpu-runs.md). The lent GPU hosts set ``CXX`` to such a wrapper, so trusting
``$CXX`` is wrong there and ``/usr/bin/g++`` is right. Rather than make every operator know
that, the worker tries each candidate at start: it builds a tiny AOTInductor package with it,
checks that the library links ``libstdc++.so`` dynamically, and loads and runs it in a separate
process (a crash there costs that process only). The first that passes is used for every
build; if none passes, the worker serves no AOTInductor target and says why.

Candidates, in order: ``KILN_AOTI_CXX``, ``$CXX``, ``g++`` and ``c++`` on ``PATH``,
``/usr/bin/g++``. The answer is cached on disk, keyed by the host, torch's version and each
candidate's path, size and modification time, so a restart with the same toolchain costs a
file read; a changed compiler or torch is probed again.

``python -m workers.cxx_compiler`` prints the choice as JSON (``--fresh`` ignores the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workers.inductor_seed import HEADERS_DIRNAME

FALLBACKS = ("/usr/bin/g++",)
CHECK_TIMEOUT_S = 600.0  # a first build with a new compiler rebuilds Inductor's headers
_chosen: dict[str, Any] | None = None  # this process's answer, for the probe to announce


def candidates(env: Mapping[str, str], fallbacks: Sequence[str] | None = None) -> list[str]:
    """Compiler paths to try, in order, without duplicates (same file, tried once)."""
    fallbacks = FALLBACKS if fallbacks is None else fallbacks
    names = [env.get("KILN_AOTI_CXX", ""), env.get("CXX", "")]
    path = env.get("PATH", "")
    names += [shutil.which(n, path=path) or "" for n in ("g++", "c++")]
    names += list(fallbacks)
    out, seen = [], set()
    for name in names:
        if not name:
            continue
        resolved = shutil.which(name, path=path) if os.sep not in name else name
        if not resolved or not os.path.isfile(resolved):
            out.append(name)  # kept so the report says it was looked for and not found
            continue
        key = os.path.realpath(resolved)
        if key not in seen:
            seen.add(key)
            out.append(resolved)
    return list(dict.fromkeys(out))


CHECK_VERSION = 2


def fingerprint(names: Sequence[str]) -> str:
    """Host, torch and each candidate file's identity: what a cached answer depends on."""
    import torch

    # CHECK_VERSION: what a check keeps changed (its precompiled headers since version 2). The
    # interpreter and torch's location: the headers' key holds torch's include path, so another
    # environment's would never match (a clean clone's builds recompiled them: 33-43 s vs 21 s).
    parts: list[Any] = [CHECK_VERSION, platform.node(), platform.machine(), torch.__version__,
                        sys.version, sys.executable, torch.__file__]
    for name in names:
        try:
            st = os.stat(name)
            parts.append([name, os.path.realpath(name), st.st_size, st.st_mtime_ns])
        except OSError:
            parts.append([name, None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("KILN_CXX_CACHE_DIR") or env.get("XDG_CACHE_HOME") or str(
        Path.home() / ".cache")
    return Path(base) / "kiln"


def check(compiler: str, env: Mapping[str, str], timeout_s: float = CHECK_TIMEOUT_S,
          keep_cache: Path | None = None) -> dict[str, Any]:
    """Build, inspect and load a tiny package with ``compiler``, in a separate process.

    ``keep_cache``: where a passing check's Inductor cache is moved (the worker's own tiny
    program, compiled with the compiler it will use: the seed of its builds' caches starts
    from it instead of compiling the same probes again - 60 s on the H200 host). It keeps the
    check's precompiled headers too, in ``precompiled_headers`` (inductor_seed.HEADERS_DIRNAME):
    torch writes them under ``$TMPDIR/torchinductor_<user>``, whatever the cache dir, so a
    sandboxed build (its own empty /tmp) precompiled them again - 13 of a 36 s convnet build
    on 2 cores - where an unsandboxed build on the same host reused them."""
    report: dict[str, Any] = {"compiler": compiler, "ok": False}
    if not os.path.isfile(compiler) or not os.access(compiler, os.X_OK):
        return {**report, "reason": "not found or not executable"}
    with tempfile.TemporaryDirectory(prefix="kiln-cxx-") as tmp:
        # A fresh Inductor cache: a package cached from another compiler would prove nothing.
        # Its own TMPDIR: the precompiled headers it makes land here, not in the host's.
        (Path(tmp) / "tmp").mkdir()
        child_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
                     "CXX": compiler, "TMPDIR": str(Path(tmp) / "tmp")}
        try:
            proc = subprocess.run([sys.executable, "-m", "workers.cxx_compiler", "--check",
                                   compiler, tmp], env=child_env, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**report, "reason": f"the check did not finish in {timeout_s:.0f} s"}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if lines:
            report.update(json.loads(lines[-1]))
        if proc.returncode < 0:
            report.update(ok=False, reason=f"the package crashed the process that loaded it "
                          f"(signal {-proc.returncode})")
        elif proc.returncode != 0 and "reason" not in report:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            report.update(ok=False, reason=f"the build failed: {tail[0][:300]}")
        if keep_cache is not None and report["ok"] and (Path(tmp) / "inductor").is_dir():
            for headers in (Path(tmp) / "tmp").glob("torchinductor_*/precompiled_headers"):
                shutil.rmtree(headers / "locks", ignore_errors=True)
                shutil.move(str(headers), Path(tmp) / "inductor" / HEADERS_DIRNAME)
                break
            shutil.rmtree(keep_cache, ignore_errors=True)
            keep_cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / "inductor"), keep_cache)
            report["inductor_cache"] = str(keep_cache)
    return report


def _check_here(compiler: str, workdir: Path) -> None:
    """The check's own process: build, readelf, load, run; one JSON line at each stage."""
    import torch

    from workers.backends.aoti import linked_libraries

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2 + 1

    program = torch.export.export(Tiny(), (torch.randn(2, 4),))
    package = workdir / "tiny.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                             inductor_configs={"cpp.cxx": compiler})
    import zipfile

    with zipfile.ZipFile(package) as zf:
        libs = [n for n in zf.namelist() if n.endswith(".so")]
        zf.extractall(workdir / "unpacked", libs)
    needed = sorted({n for lib in libs for n in linked_libraries(workdir / "unpacked" / lib)
                     or []})
    if not any(n.startswith("libstdc++") for n in needed):
        print(json.dumps({"ok": False, "needed": needed, "reason": "links the C++ runtime "
                          "statically (no libstdc++.so among its libraries); such packages "
                          "crash at load"}), flush=True)
        return
    print(json.dumps({"ok": False, "needed": needed, "reason": "built; crashed while loading"}),
          flush=True)
    loaded = torch._inductor.aoti_load_package(str(package))
    x = torch.randn(2, 4)
    ok = bool(torch.equal(loaded(x), torch.relu(x) * 2 + 1))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[:1]
    print(json.dumps({"ok": ok, "needed": needed, "version": version[0] if version else "",
                      **({} if ok else {"reason": "the package ran but gave wrong results"})}),
          flush=True)


def choose(env: Mapping[str, str] | None = None, fallbacks: Sequence[str] | None = None,
           use_cache: bool = True) -> dict[str, Any]:
    """The compiler AOTInductor builds with on this host, and how it was chosen.

    ``{"compiler": path or None, "version", "tried": [each candidate's report], "cached",
    "reason" (when none works)}``.
    """
    global _chosen
    env = dict(os.environ if env is None else env)
    names = candidates(env, fallbacks)
    cache = cache_dir(env) / f"aoti-cxx-{fingerprint(names)}.json"
    if use_cache:
        try:
            _chosen = {**json.loads(cache.read_text()), "cached": True}
            return _chosen
        except (OSError, ValueError):
            pass
    tried: list[dict[str, Any]] = []
    result: dict[str, Any] = {"compiler": None, "tried": tried, "cached": False}
    for name in names:
        report = check(name, env, keep_cache=cache.with_name(f"inductor-{cache.stem}"))
        tried.append(report)
        if report.get("ok"):
            result.update(compiler=name, version=report.get("version", ""),
                          inductor_cache=report.get("inductor_cache"))
            break
    else:
        result["reason"] = "no working C++ compiler for AOTInductor: " + "; ".join(
            f"{r['compiler']}: {r.get('reason', 'failed')}" for r in tried) + (
            ". Install g++ or point KILN_AOTI_CXX at a g++ that links libstdc++ dynamically")
    if any("did not finish" in r.get("reason", "") for r in tried):
        _chosen = result  # a timeout may be a busy host: decide again next start
        return result
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(cache)
    except OSError:
        pass  # an unwritable cache costs the next start a probe, nothing else
    _chosen = result
    return result


def last_choice() -> dict[str, Any] | None:
    """What :func:`choose` answered in this process (None if it was not asked)."""
    return _chosen


_C_BESIDE = (("clang++", "clang"), ("g++", "gcc"), ("c++", "cc"))


def c_compiler_beside(cxx: str) -> str | None:
    """The C compiler of the same toolchain (``/usr/bin/g++`` -> ``/usr/bin/gcc``), if present.

    Triton compiles its CUDA launcher with ``$CC``: left at an image's ``CC`` (the same static
    wrapper as its ``CXX`` on the lent GPU hosts), CUDA builds failed inside the sandbox."""
    path = Path(cxx)
    for plus, plain in _C_BESIDE:
        if path.name.endswith(plus):
            sibling = path.with_name(path.name[: -len(plus)] + plain)
            return str(sibling) if sibling.is_file() and os.access(sibling, os.X_OK) else None
    return None


def compiler_env(choice: Mapping[str, Any] | None) -> dict[str, str]:
    """The environment that makes build children use the chosen compiler (none: unchanged):
    AOTInductor's C++ compiler, and the C compiler beside it for Triton."""
    if not choice or not choice.get("compiler"):
        return {}
    env = {"KILN_AOTI_CXX": str(choice["compiler"])}
    if cc := c_compiler_beside(str(choice["compiler"])):
        env["CC"] = cc
    return env


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        _check_here(sys.argv[2], Path(sys.argv[3]))
    else:
        print(json.dumps(choose(use_cache="--fresh" not in sys.argv)))
