"""`kiln serve` keeps its worker: killed mid-build with SIGKILL (as the out-of-memory killer
does), the worker is reaped, the job says why it stopped, a new worker starts, and the job
finishes on it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kiln.client import KilnClient
from tests.conftest import ROOT

PROFILE = [{"name": "x", "min": [1, 2, 8], "opt": [4, 16, 8], "max": [8, 64, 8]},
           {"name": "mask", "min": [1, 2], "opt": [4, 16], "max": [8, 64]}]


def _wait(predicate, timeout_s: float, what: str, every_s: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _zombie_or_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").exists()
    except OSError:
        return False


def test_worker_killed_mid_build_is_replaced_and_the_job_finishes(
        tmp_path: Path, programs: dict[str, Path]) -> None:
    log_path = tmp_path / "serve.log"
    # A long lease: only the supervisor's fail-over, not the lease sweeper, can requeue in time.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_LEASE_S="600", KILN_SWEEP_INTERVAL_S="2", PYTHONUNBUFFERED="1",
               KILN_API_KEYS="sup-key:sup:admin")
    http = requests.Session()
    http.headers["Authorization"] = "Bearer sup-key"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--data-dir",
             str(tmp_path / "data"), "--backends", "onnx"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        def url() -> str | None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            match = re.search(r"serving on (http://\S+)", log_path.read_text())
            return match.group(1) if match else None

        base = _wait(url, 240, "kiln serve's URL", every_s=0.3)
        kiln = KilnClient(base, api_key="sup-key")
        model = kiln.upload(programs["two_inputs"])
        job = kiln.submit(model["id"], backend="onnx", inputs=PROFILE)
        assert job["submit"] == "queued"
        job_url = f"{base}/api/v1/jobs/{job['id']}"
        _wait(lambda: http.get(job_url).json()["status"] in ("building", "validating"),
              120, "the build to start", every_s=0.05)
        (first,) = http.get(f"{base}/api/v1/workers").json()["workers"]
        dead_pid = first["host"]["pid"]
        os.kill(dead_pid, signal.SIGKILL)

        # The job says what happened while it waits for the new worker.
        said = _wait(lambda: (http.get(job_url).json().get("error") or {}).get("message"),
                     30, "the job to say its worker died", every_s=0.05)
        assert f"pid {dead_pid}" in said and "SIGKILL" in said, said
        # Reaped at once: no zombie left behind.
        _wait(lambda: not _zombie_or_alive(dead_pid), 10, "the dead worker to be reaped")

        done = _wait(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
            http.get(job_url).json()), 300, "the job to finish", every_s=0.5)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        (second,) = http.get(f"{base}/api/v1/workers").json()["workers"]
        assert second["host"]["pid"] != dead_pid
        log = log_path.read_text()
        assert re.search(rf"worker \(pid {dead_pid}\) killed by SIGKILL.*requeued job\(s\) "
                         rf"{job['id']}; restarting it in 1 s", log), log[-3000:]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
