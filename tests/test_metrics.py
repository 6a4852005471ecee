"""/metrics after real actions: an upload, a real ONNX build on a worker, cache hits by reuse
mode, a download, an eviction; and counters summed over gunicorn's worker processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service import housekeeping
from service.db import upgrade
from service.services import Services
from tests.conftest import ROOT, LiveKiln, make_settings, running_kiln
from tests.servers import _free_port

PROFILE = [{"name": "x", "min": [1, 2, 8], "opt": [4, 16, 8], "max": [8, 64, 8]},
           {"name": "mask", "min": [1, 2], "opt": [4, 16], "max": [8, 64]}]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{url}/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def onnx_kiln(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKiln]:
    base = tmp_path_factory.mktemp("metrics")
    settings = make_settings(base / "kiln", sweep_interval_s=2)
    with running_kiln(settings, base, "--backends", "onnx") as kiln:
        yield kiln


def test_metrics_follow_uploads_builds_hits_downloads_and_evictions(
        onnx_kiln: LiveKiln, programs: dict[str, Path], tmp_path: Path) -> None:
    kiln, url = onnx_kiln.client, onnx_kiln.url
    before = scrape(url)
    (worker,) = kiln.workers()
    queue = worker["targets"][0]["queue"]
    target = {"backend": "onnx", "device": "cpu", "arch": worker["targets"][0]["arch"],
              "queue": queue}
    assert ("kiln_queue_depth", tuple(sorted(target.items()))) in before  # 0 for a live target
    age = value(before, "kiln_worker_heartbeat_age_seconds", worker=worker["id"],
                hostname=worker["hostname"])
    assert 0 <= age < onnx_kiln.settings.worker_ttl_s

    size = programs["two_inputs"].stat().st_size
    model = kiln.upload(programs["two_inputs"])
    engine = kiln.wait(kiln.submit(model["id"], backend="onnx", inputs=PROFILE), timeout_s=300)
    assert kiln.submit(model["id"], backend="onnx", inputs=PROFILE)["status"] == "cached"
    assert kiln.submit(model["id"], backend="onnx", inputs=PROFILE,
                       reuse="exact")["status"] == "cached"
    kiln.download(engine["id"], tmp_path / "e.onnx")
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kiln_upload_bytes_total", outcome="stored") == size
    assert delta("kiln_cache_requests_total", reuse="covering", result="miss",
                 outcome="queued") == 1
    assert delta("kiln_cache_requests_total", reuse="covering", result="hit",
                 outcome="cached") == 1
    assert delta("kiln_cache_requests_total", reuse="exact", result="hit", outcome="cached") == 1
    assert delta("kiln_download_bytes_total", mode="streamed") == engine["size"]
    assert delta("kiln_jobs", state="succeeded") == 1
    assert value(after, "kiln_jobs", state="building") == 0
    assert delta("kiln_submissions_total", outcome="cached") == 2
    hist = {"backend": "onnx", "device": "cpu", "outcome": "succeeded"}
    assert delta("kiln_build_duration_seconds_count", **hist) == 1
    build_s = delta("kiln_build_duration_seconds_sum", **hist)
    assert build_s > 0
    assert value(after, "kiln_build_duration_seconds_bucket", le="+Inf", **hist) == value(
        after, "kiln_build_duration_seconds_count", **hist)
    assert value(after, "kiln_engine_bytes_stored") >= engine["size"]

    # An eviction, run as housekeeping runs it, shows on the next scrape of the API.
    services = Services(make_settings(onnx_kiln.settings.data_dir, store_budget_bytes=1,
                                      gc_grace_s=0, sweep_interval_s=0))
    time.sleep(1.1)  # last_used_at is at second precision on SQLite; grace 0 means "before now"
    ran: dict[str, housekeeping.TaskResult] = {}
    for _ in range(20):  # the worker's own housekeeping may hold the lease for a moment
        ran = housekeeping.run_due(services, "metrics-test")
        if "evict" in ran:
            break
        time.sleep(0.2)
    assert ran["evict"].items >= 1
    evicted = scrape(url)
    assert value(evicted, "kiln_evictions_total") - value(after, "kiln_evictions_total") >= 1
    assert value(evicted, "kiln_evicted_bytes_total") >= engine["size"]
    assert value(evicted, "kiln_engines_stored") == 0


def test_counters_are_summed_over_gunicorn_workers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "kiln")
    upgrade(settings.database_url)
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KILN_")},
           **settings.to_env(), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "3", "-b", f"127.0.0.1:{port}",
         "service.app:create_app()"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                requests.get(f"{url}/healthz", timeout=10)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.3)
        counted = value(scrape(url), "kiln_http_requests_total", endpoint="healthz",
                        status="200")
        # Concurrent requests keep the sync workers busy, so all of them take some.
        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(lambda _: requests.get(f"{url}/healthz", timeout=30)
                                  .status_code, range(30)))
        assert codes == [200] * 30
        pids = {p.name for p in metrics_dir.iterdir()}
        assert len([p for p in pids if re.search(r"_\d+\.db$", p)]) >= 2, pids
        samples = scrape(url)
        assert value(samples, "kiln_http_requests_total", endpoint="healthz",
                     status="200") - counted == 30
    finally:
        proc.terminate()
        proc.wait(timeout=30)
