"""Logs say what happened: a cancelled build is not "succeeded", polling does not flood the
log, and JSON lines carry the job id."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from service import logging_setup
from service.db import upgrade
from tests.conftest import make_settings, running_kiln

PROFILE = [{"name": "x", "min": [1, 2, 8], "opt": [4, 16, 8], "max": [8, 64, 8]},
           {"name": "mask", "min": [1, 2], "opt": [4, 16], "max": [8, 64]}]


def test_json_lines_carry_the_current_job_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging_setup.JsonFormatter())
    handler.addFilter(logging_setup.JobIdFilter())
    logger = logging.getLogger("kiln.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with logging_setup.job_context("job_abc"):
            logger.warning("phase %s", "building")
        logger.info("between jobs")
        logger.info("explicit", extra={"job_id": "job_xyz"})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["job_id"] == "job_abc" and lines[0]["message"] == "phase building"
    assert lines[0]["level"] == "warning" and lines[0]["logger"] == "kiln.test-json"
    assert "job_id" not in lines[1]
    assert lines[2]["job_id"] == "job_xyz"


def test_polling_does_not_flood_the_access_log(tmp_path: Path) -> None:
    from service.app import create_app

    settings = make_settings(tmp_path / "kiln")
    upgrade(settings.database_url)
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    werkzeug_log = logging.getLogger("werkzeug")
    quiet = logging_setup.QuietPolling()
    werkzeug_log.addHandler(handler)
    werkzeug_log.addFilter(quiet)
    werkzeug_log.setLevel(logging.INFO)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for _ in range(20):
            assert requests.get(f"{url}/api/v1/jobs/job_nope").status_code == 404
            assert requests.get(f"{url}/healthz").status_code == 200
        assert requests.post(f"{url}/api/v1/jobs", json={}).status_code == 400
        time.sleep(0.2)
    finally:
        server.shutdown()
        werkzeug_log.removeHandler(handler)
        werkzeug_log.removeFilter(quiet)
    text = stream.getvalue()
    assert "GET /healthz" not in text  # the successful polls are gone
    assert text.count("GET /api/v1/jobs/job_nope") == 20  # errors stay
    assert "POST /api/v1/jobs" in text


@pytest.fixture
def json_kiln(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path / "kiln", log_format="json")
    with running_kiln(settings, tmp_path, "--backends", "onnx") as kiln:
        yield kiln


def test_cancelled_build_is_not_logged_as_succeeded(json_kiln, programs) -> None:  # type: ignore[no-untyped-def]
    kiln = json_kiln.client
    model = kiln.upload(programs["two_inputs"])
    job = kiln.submit(model["id"], backend="onnx", inputs=PROFILE)
    deadline = time.monotonic() + 120
    while kiln.job(job["id"])["status"] == "queued":
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    kiln.cancel(job["id"])
    deadline = time.monotonic() + 60
    while f"build of job {job['id']}: " not in json_kiln.worker_log.read_text():
        assert time.monotonic() < deadline, json_kiln.worker_log.read_text()[-3000:]
        time.sleep(0.2)
    lines = [line for line in json_kiln.worker_log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # Celery's lines too (the banner and Python's warnings are printed, not logged).
    assert any(r["logger"].startswith("celery") for r in records), lines
    (outcome,) = [r for r in records if r["message"].startswith(f"build of job {job['id']}")]
    assert outcome["message"].endswith("cancelled") and outcome["job_id"] == job["id"]
    assert not [line for line in lines if "kiln.build" in line and "succeeded" in line], \
        "Celery's false 'succeeded' line was logged"


def test_celery_success_line_is_dropped_for_builds_only() -> None:
    from celery.app import trace

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logging_setup.NoFalseSuccess())
    trace.logger.addHandler(handler)
    level = trace.logger.level
    trace.logger.setLevel(logging.INFO)
    try:
        for name in ("kiln.build", "other.task"):
            trace.info(trace.LOG_SUCCESS, {"id": "t1", "name": name,
                                           "return_value": "build_crashed: boom",
                                           "runtime": 1.0, "args": "", "kwargs": ""})
    finally:
        trace.logger.removeHandler(handler)
        trace.logger.setLevel(level)
    text = stream.getvalue()
    assert "kiln.build" not in text and "other.task[t1] succeeded" in text
