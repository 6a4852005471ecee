"""Each `kiln` command against the live Kiln, run as the user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from kiln.cli import problem_lines
from kiln.client import KilnAPIError
from kiln.compiler import _profile, export_module
from tests.conftest import ROOT, LiveKiln
from tests.kiln_fixtures import INPUT, convnet

pytest_plugins = ["tests.kiln_fixtures"]
ANSI = re.compile(r"\x1b\[")
INPUT_ARG = "x:1x3x32x32,4x3x32x32,16x3x32x32"


def kiln_cli(*args: str, server: str | None = None, timeout: float = 300,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "service.cli", *args]
    if server:
        cmd += ["--server", server]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)})


def as_json(*args: str, server: str) -> Any:
    out = kiln_cli(*args, "--json", server=server)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def program_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The program kiln.compile exported for the shared build, saved as a file."""
    path = tmp_path_factory.mktemp("cli") / "convnet7.pt2"
    profile = _profile([__import__("kiln").Input(**INPUT)], ["x"])
    torch.export.save(export_module(convnet(), profile), path)
    return path


def test_version() -> None:
    out = kiln_cli("--version")
    assert out.returncode == 0 and re.fullmatch(r"kiln, version \S+\n", out.stdout)
    client_only = subprocess.run([sys.executable, "-m", "kiln", "--version"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
    assert client_only.stdout == out.stdout


def test_list_and_show_commands_with_json(live: LiveKiln, compiled_module: dict[str, Any]
                                          ) -> None:
    record = compiled_module["engine"].record
    job_id = compiled_module["engine"].stats.job_id
    models = as_json("models", "list", server=live.url)
    model = next(m for m in models if m["model_hash"] == record["model_hash"])
    assert as_json("models", "show", model["id"], server=live.url)["id"] == model["id"]
    jobs = as_json("jobs", "list", server=live.url)
    assert job_id in [j["id"] for j in jobs]
    assert as_json("jobs", "list", "--status", "succeeded", server=live.url)
    job = as_json("jobs", "show", job_id, server=live.url)
    assert job["status"] == "succeeded" and job["engine_id"] == record["id"]
    engines = as_json("engines", "list", "--model", model["id"], server=live.url)
    assert [e["id"] for e in engines] == [record["id"]]
    assert as_json("engines", "show", record["id"], server=live.url)["sha256"] == \
        record["sha256"]
    workers = as_json("workers", "list", server=live.url)
    assert workers and as_json("workers", "show", workers[0]["id"], server=live.url)["id"] == \
        workers[0]["id"]
    assert "max_autotune" in as_json("targets", server=live.url)["aoti"]["options"][
        "properties"]
    text = kiln_cli("jobs", "list", server=live.url)
    assert text.returncode == 0 and job_id in text.stdout and "succeeded" in text.stdout
    text = kiln_cli("engines", "show", record["id"], server=live.url)
    assert f"sha256: {record['sha256']}" in text.stdout


def test_logs_and_follow(live: LiveKiln, compiled_module: dict[str, Any]) -> None:
    job_id = compiled_module["engine"].stats.job_id
    log = requests.get(f"{live.url}/api/v1/jobs/{job_id}/log", timeout=30).text
    out = kiln_cli("logs", job_id, server=live.url)
    assert out.returncode == 0 and "aoti_compile_and_package" in out.stdout
    follow = kiln_cli("logs", job_id, "--follow", server=live.url)
    assert follow.returncode == 0 and follow.stdout == log
    assert "[succeeded]" in follow.stderr


def test_errors_are_one_line_per_problem(live: LiveKiln, compiled_module: dict[str, Any],
                                         program_file: Path) -> None:
    job_id = compiled_module["engine"].stats.job_id
    done = kiln_cli("cancel", job_id, server=live.url)
    assert done.returncode == 1
    assert done.stderr == f"error: job_finished: job {job_id} is already succeeded\n"
    missing = kiln_cli("jobs", "show", "job_nope", server=live.url)
    assert missing.stderr == "error: not_found: job job_nope not found\n"
    bad = kiln_cli("compile", str(program_file), "--input", "x:1x3x32x32,4x3x32x32,128x3x32x32",
                   server=live.url)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[first].startswith("error: invalid_profile: ")
    assert lines[first + 1:] and all(line.startswith("  - ") for line in lines[first + 1:])
    assert any("out_of_range" in line for line in lines[first + 1:])
    assert not any(line.lstrip().startswith("{") for line in lines)
    down = kiln_cli("models", "list", server="http://127.0.0.1:9")
    assert down.returncode == 1 and down.stderr.startswith(
        "error: cannot reach Kiln at http://127.0.0.1:9: ") and down.stderr.count("\n") == 1


def test_server_escape_codes_are_stripped() -> None:
    err = KilnAPIError(400, "build_failed", "\x1b[31mRuntimeError\x1b[0m: boom\x07",
                       {"errors": [{"field": "x", "message": "\x1b[1mbad\x1b[0m\nshape"}]})
    assert problem_lines(err) == ["build_failed: RuntimeError: boom", "  - x: bad shape"]


def test_backend_choices_and_options_in_help_and_errors(live: LiveKiln,
                                                        program_file: Path) -> None:
    help_text = kiln_cli("compile", "--help", env={"KILN_SERVER": live.url}).stdout
    assert "aoti (devices: cpu, cuda)" in help_text and "onnx (devices" in help_text
    assert "max_autotune (boolean, default false)" in help_text
    assert "opset (integer, default 18)" in help_text
    bad = kiln_cli("compile", str(program_file), "--option", "optimization_level=5",
                   server=live.url)
    assert bad.returncode == 2
    assert "optimization_level not an option of backend aoti" in bad.stderr
    assert "max_autotune (boolean, default false)" in bad.stderr
    assert not ANSI.search(bad.stderr)
    unknown = kiln_cli("compile", str(program_file), "--backend", "nope", server=live.url)
    assert unknown.returncode == 2 and "'nope' is not one of aoti, onnx, tensorrt" in \
        unknown.stderr


def test_compile_skips_upload_and_download_when_they_match(
        live: LiveKiln, compiled_module: dict[str, Any], program_file: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "engine.pt2"
    first = kiln_cli("compile", str(program_file), "--input", INPUT_ARG, "-o", str(out),
                     server=live.url)
    assert first.returncode == 0, first.stderr
    assert "already on the server, not uploaded" in first.stderr
    assert "from cache: yes" in first.stdout and f"saved to {out}" in first.stdout
    assert out.read_bytes() == compiled_module["engine"].path.read_bytes()
    second = as_json("compile", str(program_file), "--input", INPUT_ARG, "-o", str(out),
                     server=live.url)
    assert second["from_cache"] and not second["uploaded"] and not second["downloaded"]
    import kiln

    engine = kiln.load(out)  # the sidecar written beside -o carries the profile
    with pytest.raises(kiln.ProfileError):
        engine(torch.randn(17, 3, 32, 32))


def _start_compile(program_file: Path, server: str, *extra: str,
                   stdin: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "compile", str(program_file), "--input",
         INPUT_ARG, "--reuse", "never", "--server", server, *extra],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"job (job_\w+) (queued|joined)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError("compile never reported its job")


def test_ctrl_c_without_a_terminal_says_the_job_keeps_running(
        live: LiveKiln, compiled_module: dict[str, Any], program_file: Path) -> None:
    proc, job_id = _start_compile(program_file, live.url, "--option", "max_autotune=true")
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert f"job {job_id} keeps running on the server" in err
        assert f"kiln cancel {job_id}" in err and "Traceback" not in err
        assert requests.get(f"{live.url}/api/v1/jobs/{job_id}", timeout=30).json()[
            "status"] in ("queued", "building", "validating")
    finally:
        cancelled = as_json("cancel", job_id, server=live.url)
        assert cancelled["status"] == "cancelled"


def test_ctrl_c_at_a_terminal_asks_and_cancels(live: LiveKiln, compiled_module: dict[str, Any],
                                               program_file: Path) -> None:
    primary, secondary = pty.openpty()
    proc, job_id = _start_compile(program_file, live.url, "--option", "max_autotune=true",
                                  stdin=secondary)
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        prompt = ""
        deadline = time.monotonic() + 30
        while "on the server?" not in prompt and time.monotonic() < deadline:
            prompt += proc.stderr.read(1)
        assert f"cancel job {job_id} on the server?" in prompt
        os.write(primary, b"y\n")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and f"job {job_id} cancelled" in err
        assert requests.get(f"{live.url}/api/v1/jobs/{job_id}", timeout=30).json()[
            "status"] == "cancelled"
    finally:
        os.close(primary)
        os.close(secondary)
        if proc.poll() is None:
            proc.kill()


def test_engines_download_writes_a_loadable_engine_once(live: LiveKiln,
                                                        compiled_module: dict[str, Any],
                                                        tmp_path: Path) -> None:
    record = compiled_module["engine"].record
    out = tmp_path / "e.pt2"
    first = as_json("engines", "download", record["id"], "-o", str(out), server=live.url)
    assert first["downloaded"] and out.read_bytes() == compiled_module["engine"].path.read_bytes()
    again = as_json("engines", "download", record["id"], "-o", str(out), server=live.url)
    assert not again["downloaded"]
    import kiln

    with pytest.raises(kiln.ProfileError, match="dim 0 of input 'x' is 20"):
        kiln.load(out)(torch.randn(20, 3, 32, 32))
