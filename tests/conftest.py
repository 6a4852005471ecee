"""Shared fixtures. Real servers, real workers, real builds; built engines are shared across
the session because an AOTInductor build takes tens of seconds on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flask import Flask
from werkzeug.serving import make_server

from kiln.client import KilnClient
from service.app import create_app
from service.db import upgrade
from service.settings import Settings
from tests import servers

ROOT = Path(__file__).resolve().parent.parent


# ---- programs -------------------------------------------------------------------------

class TwoInputs(torch.nn.Module):
    """Two inputs sharing a batch dim, a second dynamic dim, and a static one."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x).sum(dim=1) * mask.float().mean(dim=1, keepdim=True)


def export_two_inputs(path: Path, scale: float = 1.0) -> Path:
    torch.manual_seed(1)
    module = TwoInputs().eval()
    with torch.no_grad():
        module.proj.weight.mul_(scale)
    batch = torch.export.Dim("batch", min=1, max=32)
    seq = torch.export.Dim("seq", min=2, max=128)
    program = torch.export.export(
        module, (torch.randn(2, 16, 8), torch.ones(2, 16, dtype=torch.int64)),
        dynamic_shapes={"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}})
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "examples"))
    from export_convnet import export

    base = tmp_path_factory.mktemp("programs")
    export(str(base / "convnet.pt2"))
    return {"convnet": base / "convnet.pt2",
            "two_inputs": export_two_inputs(base / "two_inputs.pt2")}


# ---- servers ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    with servers.postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    with servers.fresh_database(postgres_server) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with servers.redis_server() as url:
        yield url


# ---- app -------------------------------------------------------------------------------

def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings.from_env(env={}, data_dir=data_dir, **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "kiln")


@pytest.fixture
def app(settings: Settings) -> Flask:
    upgrade(settings.database_url)
    return create_app(settings)


@pytest.fixture
def client(app: Flask):  # type: ignore[no-untyped-def]
    return app.test_client()


# ---- a live Kiln: API server in a thread, a real worker process ---------------------------

@dataclass
class LiveKiln:
    settings: Settings
    url: str
    client: KilnClient
    worker: subprocess.Popen[bytes]
    worker_log: Path

    def restart_worker(self) -> None:
        stop_process(self.worker)
        self.worker = start_worker(self.settings, self.worker_log)
        wait_for_worker(self.settings, self.worker)


def start_worker(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "workers", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for_worker(settings: Settings, proc: subprocess.Popen[bytes], timeout: float = 240
                    ) -> None:
    from service.db import Database
    from service.worker_registry import live_workers

    db = Database(settings.database_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "worker exited during start-up"
            with db.session() as s:
                if live_workers(s, settings.worker_ttl_s):
                    return
            time.sleep(0.3)
        raise AssertionError("worker did not register")
    finally:
        db.dispose()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKiln]:
    """Kiln on its embedded defaults: SQLite, local artifacts, SQLite broker."""
    base = tmp_path_factory.mktemp("live")
    with running_kiln(make_settings(base / "kiln", sweep_interval_s=2), base) as kiln:
        yield kiln


class _ServerThread(threading.Thread):
    def __init__(self, app: Flask) -> None:
        super().__init__(daemon=True)
        self.server = make_server("127.0.0.1", 0, app, threaded=True)

    def run(self) -> None:
        self.server.serve_forever()


from contextlib import contextmanager  # noqa: E402


@contextmanager
def running_kiln(settings: Settings, base: Path, *worker_args: str) -> Iterator[LiveKiln]:
    upgrade(settings.database_url)
    log = base / "worker.log"
    worker = start_worker(settings, log, *worker_args)
    server = _ServerThread(create_app(settings))
    server.start()
    url = f"http://127.0.0.1:{server.server.server_port}"
    kiln = LiveKiln(settings, url, KilnClient(url), worker, log)
    try:
        wait_for_worker(settings, worker)
        yield kiln
    finally:
        server.server.shutdown()
        stop_process(kiln.worker)
        if os.environ.get("KILN_TEST_SHOW_WORKER_LOG"):
            print(log.read_text()[-5000:])
