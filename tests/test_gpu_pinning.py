"""``kiln worker --gpu N`` (issue 13): one worker per GPU, each pinned with
``CUDA_VISIBLE_DEVICES``. No GPU here: the real worker processes run on the embedded defaults
with the ONNX backend, and what they set, announce and pass to their build children is read
back from the database and from the processes themselves. The GPU's own answer (which card a
build ran on) is mocked only where the CUDA runtime would be asked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.db import Database, upgrade
from service.models import Worker
from service.settings import Settings


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "kiln"))
    upgrade(settings.database_url)
    yield tmp_path / "kiln"


def _start(data_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KILN_DATA_DIR": str(data_dir), "KILN_SANDBOX": "off"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    log = open(data_dir / f"worker{'-'.join(args)}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "workers", "--backends", "onnx", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _workers(data_dir: Path, want: int, procs: list[subprocess.Popen[bytes]]) -> list[Any]:
    settings = Settings.from_env(env={}, data_dir=str(data_dir))
    db = Database(settings.database_url)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a worker exited"
            with db.session() as s:
                rows = [SimpleNamespace(id=w.id, host=dict(w.host), targets=list(w.targets))
                        for w in s.query(Worker).all()]
            if len(rows) >= want:
                return sorted(rows, key=lambda w: w.id)
            time.sleep(0.5)
    finally:
        db.dispose()
    raise AssertionError("workers did not register")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_two_workers_one_per_gpu_pinned_named_and_announced(data_dir: Path) -> None:
    procs = [_start(data_dir, "--gpu", "0"), _start(data_dir, "--gpu", "1")]
    try:
        gpu0, gpu1 = _workers(data_dir, 2, procs)
        by_pid = {p.pid: p for p in procs}
        for row, index in ((gpu0, "0"), (gpu1, "1")):
            # Named after its card, so the dashboard and logs say which GPU a worker owns.
            assert row.id.startswith(f"kiln@gpu{index}-")
            # Announced: the probe (a child of the worker) saw only its card.
            assert row.host["cuda_visible_devices"] == index
            # That probe is a child the worker started like its build children, from the
            # worker's own environment (the pin is set before anything runs).
            assert row.host["pid"] in by_pid
        # Same host, same targets: both consume the same queue and share the jobs.
        assert [t["queue"] for t in gpu0.targets] == [t["queue"] for t in gpu1.targets]
        assert gpu0.id != gpu1.id
    finally:
        _stop(procs)


def test_build_child_environment_keeps_the_pin_and_drops_the_secrets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.sandbox import child_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql://kiln:secret@db/kiln")
    env = child_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "KILN_DATABASE_URL" not in env


def test_an_explicit_name_wins_over_the_gpu_name(data_dir: Path) -> None:
    procs = [_start(data_dir, "--gpu", "3", "--name", "rack7-a")]
    try:
        (row,) = _workers(data_dir, 1, procs)
        assert row.id.startswith("kiln@rack7-a-")
        assert row.host["cuda_visible_devices"] == "3"
    finally:
        _stop(procs)


def test_a_build_reports_the_gpu_it_ran_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CUDA runtime answers is mocked (no GPU here); the report's shape is Kiln's."""
    import torch

    from workers.backends.aoti import gpu_identity

    props = SimpleNamespace(name="NVIDIA H200", uuid="8e2f0c1a-0000-4b5e-9d1f-2a3b4c5d6e7f",
                            pci_domain_id=0, pci_bus_id=0x19, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_identity() == {"name": "NVIDIA H200",
                              "uuid": "GPU-8e2f0c1a-0000-4b5e-9d1f-2a3b4c5d6e7f",
                              "pci_bus_id": "00000000:19:00.0", "cuda_visible_devices": "1",
                              "visible_count": 1}
