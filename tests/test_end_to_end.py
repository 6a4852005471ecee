"""The path a user walks, for real: upload, a worker builds with AOTInductor, the engine is
checked and stored, downloaded and loaded; asking again is answered from the cache."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

import kiln
from kiln.client import KilnAPIError
from kiln.engine_format import metadata_from_record, write_sidecar
from tests.conftest import ROOT, LiveKiln

PROFILE = [{"name": "x", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}]


@pytest.fixture(scope="session")
def convnet_build(live: LiveKiln, programs: dict[str, Path]) -> dict:
    kiln = live.client
    model = kiln.upload(programs["convnet"])
    submitted = kiln.submit(model["id"], inputs=PROFILE)
    statuses: list[str] = []
    engine = kiln.wait(submitted, on_update=lambda j: statuses.append(j["status"]),
                       timeout_s=900)
    return {"model": model, "submitted": submitted, "engine": engine, "statuses": statuses}


def test_upload_reads_signature_without_unpickling(live: LiveKiln, programs: dict[str, Path]
                                                   ) -> None:
    model = live.client.upload(programs["convnet"])
    assert model["inputs"] == [{
        "name": "x", "dtype": "float32",
        "shape": [{"symbol": model["inputs"][0]["shape"][0]["symbol"], "min": 1, "max": 64,
                   "label": "dim 0 of x"},
                  3, 32, 32],
        "example_shape": [4, 3, 32, 32]}]
    again = requests.post(f"{live.url}/api/v1/models", data=programs["convnet"].read_bytes())
    assert again.status_code == 200 and again.json()["id"] == model["id"]


def test_build_runs_through_phases_and_stores_reports(convnet_build: dict) -> None:
    submitted, engine = convnet_build["submitted"], convnet_build["engine"]
    assert submitted["status"] == "queued" and submitted["submit"] == "queued"
    assert convnet_build["statuses"][-1] == "succeeded"
    assert set(convnet_build["statuses"]) <= {"queued", "building", "validating", "succeeded"}
    validation = engine["validation"]
    assert validation["passed"] is True
    assert set(validation["shapes"]) == {"min", "opt", "max", "random1", "random2"}
    assert validation["shapes"]["max"]["shapes"] == [[16, 3, 32, 32]]
    out = validation["shapes"]["opt"]["outputs"][0]
    assert out["max_abs"] < 1e-3 and out["nonfinite"] == 0
    bench = engine["benchmark"]["shapes"]
    assert set(bench) == {"min", "opt", "max"}
    assert all(b["engine_ms"] > 0 and b["eager_ms"] > 0 for b in bench.values())
    assert engine["target"]["backend"] == "aoti" and engine["toolchain"]["torch"] == \
        torch.__version__
    assert engine["build_report"]["compiler_cache"] in ("warm", "cold")
    assert engine["inputs"][0]["max"] == [16, 3, 32, 32]


def test_downloaded_engine_loads_and_matches_eager(live: LiveKiln, convnet_build: dict,
                                                   programs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    engine = convnet_build["engine"]
    path = live.client.download(engine["id"], tmp_path / "engine.pt2")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == engine["sha256"]
    write_sidecar(path, metadata_from_record(engine, convnet_build["model"]))
    compiled = kiln.load(path)  # the documented way: the profile travels with the file
    eager = torch.export.load(programs["convnet"]).module()
    for batch in (1, 5, 16):
        x = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=1e-3)
    for batch in (0, 17, 64):  # the bare package would run these without a word
        with pytest.raises(kiln.ProfileError, match=f"dim 0 of input 'x' is {batch}"):
            compiled(torch.randn(batch, 3, 32, 32))


def test_second_identical_submit_is_a_cache_hit(live: LiveKiln, convnet_build: dict) -> None:
    model_id = convnet_build["model"]["id"]
    t0 = time.perf_counter()
    again = live.client.submit(model_id, inputs=PROFILE)
    elapsed = time.perf_counter() - t0
    assert again["status"] == "cached"
    assert again["engine_id"] == convnet_build["engine"]["id"]
    jobs = requests.get(f"{live.url}/api/v1/jobs").json()["jobs"]
    assert len([j for j in jobs if j["model_id"] == model_id]) == 1, "no second build"
    assert elapsed < 5  # generous: the figure that matters is measured in bench/


def test_narrower_request_is_served_by_covering_engine(live: LiveKiln, convnet_build: dict
                                                       ) -> None:
    narrower = [{"name": "x", "min": [2, 3, 32, 32], "opt": [2, 3, 32, 32],
                 "max": [8, 3, 32, 32]}]
    model_id = convnet_build["model"]["id"]
    hit = live.client.submit(model_id, inputs=narrower)
    assert hit["status"] == "cached" and hit["engine_id"] == convnet_build["engine"]["id"]
    with pytest.raises(KilnAPIError):  # exact reuse needs a new build; no worker queue
        # for an arch nobody serves, so it is refused instead of waiting forever
        live.client.submit(model_id, inputs=narrower, reuse="exact", arch="no-such-arch")


def test_download_supports_range_and_etag(live: LiveKiln, convnet_build: dict) -> None:
    engine = convnet_build["engine"]
    url = f"{live.url}/api/v1/engines/{engine['id']}/artifact"
    whole = requests.get(url)
    assert whole.headers["ETag"] == f'"{engine["sha256"]}"'
    assert int(whole.headers["Content-Length"]) == engine["size"] == len(whole.content)
    part = requests.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == whole.content[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{engine['size']}"
    assert requests.get(url, headers={"If-None-Match": f'"{engine["sha256"]}"'}
                        ).status_code == 304
    bad = requests.get(url, headers={"Range": f"bytes={engine['size'] + 5}-"})
    assert bad.status_code == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"


def test_job_log_and_status(live: LiveKiln, convnet_build: dict) -> None:
    job = live.client.job(convnet_build["submitted"]["id"])
    assert job["status"] == "succeeded" and job["engine_id"] == convnet_build["engine"]["id"]
    assert {"queued_s", "load_s", "build_s", "validate_s", "store_s"} <= set(job["timings"])
    assert "aoti_compile_and_package" in live.client.job_log(job["id"])
    workers = live.client.workers()
    assert workers and any(t["backend"] == "aoti" for t in workers[0]["targets"])


def test_cli_compile_reuses_the_cached_engine(live: LiveKiln, convnet_build: dict,
                                              programs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli-engine.pt2"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "compile", str(programs["convnet"]),
         "--input", "x:1x3x32x32,4x3x32x32,16x3x32x32", "--server", live.url, "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "from cache: yes" in result.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == convnet_build["engine"]["sha256"]
    assert "already on the server, not uploaded" in result.stderr
    assert kiln.load(out).profile[0]["max"] == [16, 3, 32, 32]  # sidecar written beside -o


def test_cli_reports_bad_profile_clearly(live: LiveKiln, programs: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "compile", str(programs["convnet"]),
         "--input", "x:1x3x32x32,4x3x32x32,128x3x32x32", "--server", live.url],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "invalid_profile" in result.stderr and "out_of_range" in result.stderr
