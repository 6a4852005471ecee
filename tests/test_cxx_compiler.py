"""The worker picks a C++ compiler whose AOTInductor packages load, with real compilers.

On the GPU hosts ``CXX`` is a g++ wrapper that links libstdc++ statically, and its packages
crash the process that loads them (docs/gpu-runs.md). Here the same wrapper is a shell script
around the system g++ adding ``-static-libstdc++`` to link steps.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from workers import cxx_compiler, inductor_seed
from workers.cxx_compiler import c_compiler_beside, candidates, choose, compiler_env

pytestmark = pytest.mark.skipif(not shutil.which("g++") or not shutil.which("readelf"),
                                reason="needs g++ and readelf")


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _static_wrapper(tmp_path: Path) -> str:
    return _script(tmp_path / "static-g++", 'case " $* " in *" -shared "*) '
                   'exec /usr/bin/g++ "$@" -static-libstdc++;; esac\nexec /usr/bin/g++ "$@"\n')


def test_candidates_in_order_each_file_once(tmp_path: Path) -> None:
    wrapper = _static_wrapper(tmp_path)
    gxx = shutil.which("g++")
    env = {"KILN_AOTI_CXX": wrapper, "CXX": "g++", "PATH": os.environ["PATH"]}
    names = candidates(env)
    assert names[0] == wrapper
    assert names[1] == gxx
    # c++ and /usr/bin/g++ are the same file as g++ here (Debian alternatives): tried once.
    assert len({os.path.realpath(n) for n in names}) == len(names)


def test_another_python_environment_checks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check keeps precompiled headers keyed by torch's include path: an answer cached by
    another environment (another venv of the same torch) must not be reused."""
    from workers.cxx_compiler import fingerprint

    here = fingerprint(["/usr/bin/g++"])
    assert fingerprint(["/usr/bin/g++"]) == here
    monkeypatch.setattr(sys, "executable", "/elsewhere/.venv/bin/python")
    assert fingerprint(["/usr/bin/g++"]) != here


def test_static_wrapper_refused_system_gxx_chosen_then_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = _static_wrapper(tmp_path)
    env = {**os.environ, "KILN_AOTI_CXX": wrapper, "CXX": str(tmp_path / "no-such-g++"),
           "KILN_CXX_CACHE_DIR": str(tmp_path / "cache")}
    choice = choose(env)
    gxx = shutil.which("g++", path=env["PATH"])
    assert choice["compiler"] == gxx
    assert choice["version"].startswith("g++")
    static, missing = choice["tried"][0], choice["tried"][1]
    assert static["compiler"] == wrapper and static["ok"] is False
    assert "statically" in static["reason"]
    assert not any(n.startswith("libstdc++") for n in static["needed"])
    assert missing["ok"] is False and "not found" in missing["reason"]
    assert any(n.startswith("libstdc++") for n in choice["tried"][-1]["needed"])
    # The passing check's Inductor cache is kept (the refused one's is not), and the builds'
    # seed starts from it: what the check compiled is in the seed.
    assert "inductor_cache" not in static
    kept = Path(choice["inductor_cache"])
    compiled = {p.relative_to(kept) for p in kept.rglob("*.so")}
    assert compiled
    # So are the precompiled headers torch made for it (in the check's own TMPDIR, not the
    # host's): the wrapper's and the kernels' preludes, which every build would make again.
    headers = sorted(p.name for p in (kept / inductor_seed.HEADERS_DIRNAME).glob("*.gch"))
    assert len(headers) >= 2, list(kept.iterdir())
    monkeypatch.setattr(inductor_seed, "_seed", None)
    seed = inductor_seed.prepare(tmp_path / "scratch", start_from=str(kept))
    assert seed is not None and compiled <= {p.relative_to(seed) for p in seed.rglob("*.so")}
    assert inductor_seed.readonly_paths() == [seed / inductor_seed.HEADERS_DIRNAME]
    assert sorted(p.name for p in (seed / inductor_seed.HEADERS_DIRNAME).glob("*.gch")) == headers
    env = compiler_env(choice)
    assert env["KILN_AOTI_CXX"] == gxx
    # Triton compiles its launcher with $CC: the C compiler of the same toolchain.
    assert env.get("CC") == c_compiler_beside(gxx) and Path(env["CC"]).name.endswith(("gcc", "cc"))

    t0 = time.monotonic()
    again = choose(env)
    assert again["cached"] is True and again["compiler"] == gxx
    assert time.monotonic() - t0 < 5  # a restart reads the answer, it does not rebuild

    # A changed toolchain is probed again: the wrapper's file changed, so the key did.
    Path(wrapper).write_text(Path(wrapper).read_text() + "# edited\n")
    os.utime(wrapper, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert cxx_compiler.fingerprint(candidates(env)) != cxx_compiler.fingerprint(
        [n for n in candidates(env) if n != wrapper] + [str(tmp_path / "other")])
    assert not (tmp_path / "cache" / "kiln" /
                f"aoti-cxx-{cxx_compiler.fingerprint(candidates(env))}.json").exists()


def test_no_working_compiler_means_no_aoti_target_and_a_reason(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    broken = _script(tmp_path / "broken-g++", "echo 'broken compiler' >&2\nexit 1\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("KILN_AOTI_CXX", broken)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("KILN_CXX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(empty))  # no g++ or c++ to find (/bin is /usr/bin here)
    monkeypatch.setattr(cxx_compiler, "FALLBACKS", ())

    from workers.probe import probe

    found = probe(["aoti"])
    assert not [t for t in found["targets"] if t["backend"] == "aoti"]
    reason = found["unavailable"]["aoti"]
    assert reason.startswith("no working C++ compiler for AOTInductor")
    assert broken in reason and "KILN_AOTI_CXX" in reason
    assert found["host"]["aoti_cxx"]["compiler"] is None
    assert compiler_env(found["host"]["aoti_cxx"]) == {}
