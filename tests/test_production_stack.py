"""Kiln on its production servers: PostgreSQL for the database, Redis as the broker, an S3
artifact store (moto's server mode), a real worker process that builds ONNX engines only, and
jobs routed by target."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime
import pytest
import redis
import requests
import torch

from kiln.client import KilnAPIError
from service.artifacts import S3ArtifactStore
from tests.conftest import ROOT, make_settings, running_kiln
from tests.test_s3_store import BUCKET, s3_endpoint  # noqa: F401  (the S3 server fixture)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_server: str, redis_url: str,
          s3_endpoint: str):  # noqa: F811
    from tests import servers

    base = tmp_path_factory.mktemp("prod")
    broker = redis_url.rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(broker).flushdb()
    with servers.fresh_database(postgres_server) as db_url:
        # The worker inherits the S3 endpoint and credentials from this process' environment.
        settings = make_settings(base / "kiln", database_url=db_url, broker_url=broker,
                                 artifact_uri=f"s3://{BUCKET}/production-stack")
        with running_kiln(settings, base, "--backends", "onnx") as kiln:
            yield kiln


def test_onnx_engine_built_over_redis_and_postgres(stack, programs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    kiln = stack.client
    workers = kiln.workers()
    assert {t["backend"] for w in workers for t in w["targets"]} == {"onnx"}
    assert all(t["queue"].startswith("kiln.onnx.cpu.") for t in workers[0]["targets"])
    model = kiln.upload(programs["two_inputs"])
    profile = [{"name": "x", "min": [1, 2, 8], "opt": [4, 16, 8], "max": [8, 64, 8]},
               {"name": "mask", "min": [1, 2], "opt": [4, 16], "max": [8, 64]}]
    engine = kiln.wait(kiln.submit(model["id"], backend="onnx", inputs=profile), timeout_s=300)
    assert engine["validation"]["passed"] and engine["target"]["backend"] == "onnx"
    assert engine["toolchain"]["onnxruntime"] == onnxruntime.__version__
    stored = {b.uri for b in S3ArtifactStore(stack.settings.artifact_uri).list()}
    # The uploaded program and the engine the worker built, both in S3.
    assert any(u.endswith(".onnx") and "/engines/" in u for u in stored), stored
    assert len(stored) >= 2, stored
    path = kiln.download(engine["id"], tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    eager = torch.export.load(programs["two_inputs"]).module()
    for batch, seq in ((1, 2), (5, 33), (8, 64)):
        x, mask = torch.randn(batch, seq, 8), torch.ones(batch, seq, dtype=torch.int64)
        names = [i.name for i in session.get_inputs()]
        (got,) = session.run(None, dict(zip(names, (x.numpy(), mask.numpy()))))
        torch.testing.assert_close(torch.from_numpy(got), eager(x, mask), rtol=1e-4,
                                   atol=1e-4)
    t0 = time.perf_counter()
    again = kiln.submit(model["id"], backend="onnx", inputs=profile)
    assert again["status"] == "cached" and again["engine_id"] == engine["id"]
    assert time.perf_counter() - t0 < 5


def test_target_without_a_worker_is_refused_not_left_waiting(stack, programs) -> None:
    model = stack.client.upload(programs["two_inputs"])
    with pytest.raises(KilnAPIError) as err:
        stack.client.submit(model["id"], backend="aoti", device="cpu")
    assert err.value.status == 503 and err.value.code == "no_worker_for_target"
    assert {t["backend"] for t in err.value.details["live_targets"]} == {"onnx"}


def test_kiln_serve_starts_api_and_worker(tmp_path: Path) -> None:
    """The README's first command, as `kiln serve` runs it: embedded defaults, a printed URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        url = key = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "kiln serve exited"
            # A fresh data dir: serve makes the first admin key and prints it once.
            if found := re.search(r"shown only now: (\S+)", line):
                key = found.group(1)
            match = re.search(r"serving on (http://\S+)", line)
            url = match.group(1) if match else None
        assert url, "kiln serve printed no URL"
        assert key, "kiln serve printed no first admin key"
        assert requests.get(f"{url}/healthz").json() == {"status": "ok"}
        assert requests.get(f"{url}/api/v1/workers").status_code == 401
        workers = requests.get(f"{url}/api/v1/workers",
                               headers={"Authorization": f"Bearer {key}"}).json()["workers"]
        assert {t["backend"] for t in workers[0]["targets"]} >= {"aoti", "onnx"}
        assert (tmp_path / "data" / "kiln.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
