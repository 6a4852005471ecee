"""The Inductor cache seed: made once per host by the worker, copied into every build's work
dir, never shared writable between builds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from workers import inductor_seed
from workers.sandbox import Limits, LogTail, run_child


def test_each_build_gets_its_own_copy_of_the_seed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seed = tmp_path / "seed"
    (seed / "ab").mkdir(parents=True)
    (seed / "ab" / "isa_check.so").write_bytes(b"compiled by the worker")
    monkeypatch.setattr(inductor_seed, "_seed", seed)
    first, second = tmp_path / "job1", tmp_path / "job2"
    first.mkdir()
    second.mkdir()
    env = inductor_seed.child_cache_env(first)
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(first / inductor_seed.CACHE_DIRNAME)}
    copied = first / inductor_seed.CACHE_DIRNAME / "ab" / "isa_check.so"
    assert copied.read_bytes() == b"compiled by the worker"
    copied.write_bytes(b"planted by a hostile build")  # the child may change its copy...
    (first / inductor_seed.CACHE_DIRNAME / "ab" / "extra.so").write_bytes(b"x")
    inductor_seed.child_cache_env(second)
    # ... but neither the seed nor the next build sees it.
    assert (seed / "ab" / "isa_check.so").read_bytes() == b"compiled by the worker"
    assert sorted(p.name for p in (second / inductor_seed.CACHE_DIRNAME / "ab").iterdir()) == [
        "isa_check.so"]
    assert (second / inductor_seed.CACHE_DIRNAME / "ab" / "isa_check.so").read_bytes() == (
        b"compiled by the worker")


def test_no_seed_means_no_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inductor_seed, "_seed", None)
    assert inductor_seed.child_cache_env(tmp_path) == {}
    assert not (tmp_path / inductor_seed.CACHE_DIRNAME).exists()


def test_a_ready_seed_is_reused_and_a_failed_probe_leaves_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inductor_seed, "_seed", None)
    final = tmp_path / f"inductor-seed-{inductor_seed._seed_key()}"
    final.mkdir()
    (final / inductor_seed.READY).write_text("avx2")

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("a ready seed was probed again")

    monkeypatch.setattr(subprocess, "run", no_probe)
    assert inductor_seed.prepare(tmp_path) == final
    monkeypatch.undo()

    monkeypatch.setattr(inductor_seed, "_seed", None)
    monkeypatch.setattr(inductor_seed, "_PROBE", "raise SystemExit(3)")
    other = tmp_path / "other"
    assert inductor_seed.prepare(other) is None
    assert inductor_seed.child_cache_env(tmp_path / "job") == {}
    assert [p.name for p in other.iterdir()] == []  # nothing half-made left behind


def test_the_real_probe_makes_a_seed_the_child_environment_points_into(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inductor_seed, "_seed", None)
    seed = inductor_seed.prepare(tmp_path / "scratch")
    assert seed is not None and (seed / inductor_seed.READY).read_text()
    assert any(p.suffix == ".so" for p in seed.rglob("*"))  # the compiled ISA checks
    job = tmp_path / "job"
    job.mkdir()
    env = inductor_seed.child_cache_env(job)
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(job)


def test_an_embedded_profile_the_job_did_not_ask_for_is_refused(tmp_path: Path) -> None:
    """The child writes kiln/engine.json, which kiln.load trusts: the worker checks it."""
    import json
    import zipfile

    from kiln.engine_format import engine_metadata
    from service.models import Job
    from workers.tasks import ChildOutputRefused, check_embedded_profile

    profile = [{"name": "x", "dtype": "float32", "min": [1, 3], "opt": [4, 3], "max": [8, 3]}]
    job = Job(backend="aoti", device="cpu", options={}, profile=profile)
    honest = engine_metadata("aoti", "cpu", {}, profile)
    wider = engine_metadata("aoti", "cpu", {}, [{**profile[0], "max": [4096, 3]}])

    def engine(name: str, entries: dict[str, dict]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("engine/data/aotinductor/model.so", b"code")
            for entry, doc in entries.items():
                zf.writestr(entry, json.dumps(doc))
        return path

    check_embedded_profile(engine("ok.pt2", {"engine/kiln/engine.json": honest}), job)
    for name, entries in (("wide.pt2", {"engine/kiln/engine.json": wider}),
                          ("none.pt2", {}),
                          ("two.pt2", {"engine/kiln/engine.json": honest,
                                       "kiln/engine.json": wider})):
        with pytest.raises(ChildOutputRefused):
            check_embedded_profile(engine(name, entries), job)


def _seed_with_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A seed made by ``prepare`` from a compiler check's cache that holds precompiled headers
    (as ``cxx_compiler.check`` keeps them)."""
    check = tmp_path / "check-cache"
    (check / inductor_seed.HEADERS_DIRNAME).mkdir(parents=True)
    (check / inductor_seed.HEADERS_DIRNAME / "abc.h").write_text("#include <vector>\n")
    (check / inductor_seed.HEADERS_DIRNAME / "abc.h.gch").write_bytes(b"precompiled by the worker")
    (check / "ab").mkdir()
    (check / "ab" / "isa_check.so").write_bytes(b"compiled by the worker")
    monkeypatch.setattr(inductor_seed, "_seed", None)
    monkeypatch.setattr(inductor_seed, "_PROBE", "print('avx2')")
    seed = inductor_seed.prepare(tmp_path / "scratch", start_from=str(check))
    assert seed is not None
    return seed


def test_seeded_headers_are_linked_not_copied_into_each_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = _seed_with_headers(tmp_path, monkeypatch)
    headers = seed / inductor_seed.HEADERS_DIRNAME
    assert inductor_seed.readonly_paths() == [headers]
    job = tmp_path / "job"
    job.mkdir()
    cache = Path(inductor_seed.child_cache_env(job)["TORCHINDUCTOR_CACHE_DIR"])
    mine = cache / inductor_seed.HEADERS_DIRNAME
    # 150 MB each in a real seed: links into the read-only mount, not copies.
    assert sorted(p.name for p in mine.iterdir()) == ["abc.h", "abc.h.gch"]
    assert all(p.is_symlink() and p.resolve() == headers / p.name for p in mine.iterdir())
    assert not mine.is_symlink()  # the directory is the build's own (locks, new headers)
    assert not (cache / "ab" / "isa_check.so").is_symlink()  # the rest: a private copy


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
def test_a_sandboxed_build_uses_the_seeded_headers_and_cannot_change_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As an attacker: the child finds the seed's headers where torch looks, and cannot write
    them, chmod them or plant a file beside them; what it does to its own links stays its own."""
    seed = _seed_with_headers(tmp_path, monkeypatch)
    original = seed / inductor_seed.HEADERS_DIRNAME / "abc.h.gch"
    source = textwrap.dedent('''
        import json, os
        from workers.inductor_seed import use_seeded_headers
        linked = use_seeded_headers()
        from torch._inductor import codecache
        gch = os.path.join(codecache._HEADER_DIR, "abc.h.gch")
        seen = {"linked": str(linked), "header_dir": os.path.realpath(codecache._HEADER_DIR),
                "reads": open(gch, "rb").read().decode()}
        target = os.path.realpath(gch)
        def attempt(name, fn):
            try:
                fn()
                seen[name] = "ok"
            except OSError as exc:
                seen[name] = type(exc).__name__
        attempt("write", lambda: open(gch, "r+b").write(b"planted"))
        attempt("chmod", lambda: os.chmod(target, 0o666))
        attempt("plant", lambda: open(os.path.join(os.path.dirname(target), "x.h.gch"),
                                      "wb").write(b"planted"))
        attempt("relink", lambda: (os.unlink(gch), open(gch, "wb").write(b"mine only")))
        print("REPORT " + json.dumps(seen), flush=True)
    ''')
    job = tmp_path / "job"
    job.mkdir()
    env = {**inductor_seed.child_cache_env(job), "PYTHONPATH": str(ROOT)}
    tail = LogTail()
    outcome = run_child(job, tail, Limits(timeout_s=120, memory_mb=4096), lambda: True,
                        env=env, readonly=inductor_seed.readonly_paths(),
                        argv=[sys.executable, "-c", source])
    line = next((x for x in tail.text().splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, (outcome, tail.text()[-2000:])
    seen = json.loads(line.removeprefix("REPORT "))
    mine = job / inductor_seed.CACHE_DIRNAME / inductor_seed.HEADERS_DIRNAME
    assert seen["linked"] == str(mine) and seen["header_dir"] == str(mine)
    assert seen["reads"] == "precompiled by the worker"
    assert seen["write"] != "ok" and seen["chmod"] != "ok" and seen["plant"] != "ok"
    assert seen["relink"] == "ok"  # its own directory...
    # ... but the seed, and the next build's copy, are as the worker made them.
    assert original.read_bytes() == b"precompiled by the worker"
    assert sorted(p.name for p in original.parent.iterdir()) == ["abc.h", "abc.h.gch"]
    nxt = tmp_path / "next"
    nxt.mkdir()
    cache = Path(inductor_seed.child_cache_env(nxt)["TORCHINDUCTOR_CACHE_DIR"])
    assert (cache / inductor_seed.HEADERS_DIRNAME / "abc.h.gch").read_bytes() == (
        b"precompiled by the worker")
