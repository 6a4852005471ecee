"""``/metrics``: what operators alert on, in Prometheus' text format.

Two kinds of numbers, by where the truth lives:

- **Read from the database at scrape time** (a custom collector): jobs by state, queue depth
  per target, build duration by target (a histogram over finished jobs), worker heartbeat age,
  submissions by outcome, engines and bytes stored, evictions and collected orphans (running
  totals kept on the housekeeping rows). Workers and housekeeping run in other processes, often
  on other hosts, and have no HTTP endpoint; the database already holds their results, so every
  API process reports the same deployment-wide numbers, and they survive restarts.
- **Counted in the API process**: HTTP requests, cache answers by reuse mode, bytes uploaded
  and downloaded. Under gunicorn each worker process counts its own; set
  ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, emptied at each start) and every process
  writes its counters there, and a scrape of any of them sums all (prometheus-client's
  multiprocess mode). Without it (``kiln serve``, one process) the process' own registry is it.

The build duration histogram is computed over the finished jobs' rows on each scrape, so it is
exact and cumulative (jobs are never deleted); its cost grows with the number of finished jobs
(one indexed scan of their timings).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from service.models import JOB_STATES, Engine, HousekeepingTask, Job, Submission, Worker, utcnow
from service.services import Services

BUILD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

CACHE_ANSWERS = Counter(
    "kiln_cache_requests", "Compile requests by reuse mode and how the cache answered: "
    "result=hit (served a stored engine) or miss (outcome queued: a new build; joined: an "
    "identical build already running)", ["reuse", "result", "outcome"])
UPLOAD_BYTES = Counter("kiln_upload_bytes", "Bytes of programs received by the API",
                       ["outcome"])
DOWNLOAD_BYTES = Counter(
    "kiln_download_bytes", "Bytes of engines the API sent (Content-Length of each answer); "
    "presigned downloads go from the store and count 0 here", ["mode"])
DOWNLOADS = Counter("kiln_downloads", "Engine download answers", ["mode", "status"])


def observe(endpoint: str, response: Response) -> None:
    """Count what one API answer did (called after each request)."""
    if endpoint == "api.submit_job" and response.status_code in (200, 202):
        body = request.get_json(silent=True) or {}
        answer = response.get_json(silent=True) or {}
        reuse = str(body.get("reuse") or "covering")
        outcome = "cached" if response.status_code == 200 else str(answer.get("submit", "queued"))
        if reuse not in ("exact", "covering", "never"):
            reuse = "other"
        CACHE_ANSWERS.labels(reuse, "hit" if outcome == "cached" else "miss", outcome).inc()
    elif endpoint == "api.upload_model":
        UPLOAD_BYTES.labels("stored" if response.status_code < 300 else "refused").inc(
            request.content_length or 0)
    elif endpoint == "api.download_engine":
        mode = "redirected" if response.status_code in (301, 302, 303, 307) else "streamed"
        DOWNLOADS.labels(mode, str(response.status_code)).inc()
        if response.status_code in (200, 206):
            DOWNLOAD_BYTES.labels(mode).inc(int(response.headers.get("Content-Length") or 0))


class DatabaseCollector:
    """Deployment-wide numbers read from the database when Prometheus scrapes."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.services.db.session() as s:
            by_state = dict(s.execute(select(Job.status, func.count()).group_by(Job.status))
                            .tuples().all())
            jobs = GaugeMetricFamily("kiln_jobs", "Jobs by state", labels=["state"])
            for state in JOB_STATES:
                jobs.add_metric([state], by_state.get(state, 0))
            yield jobs

            depth = GaugeMetricFamily(
                "kiln_queue_depth", "Jobs queued and not yet claimed, per target queue",
                labels=["backend", "device", "arch", "queue"])
            queued: dict[tuple[str, str, str, str], int] = {}
            for w in s.scalars(select(Worker)):
                for t in w.targets or []:
                    queued[(t["backend"], t["device"], t["arch"], t["queue"])] = 0
            for backend, device, arch, queue, n in s.execute(
                    select(Job.backend, Job.device, Job.arch, Job.queue, func.count())
                    .where(Job.status == "queued")
                    .group_by(Job.backend, Job.device, Job.arch, Job.queue)):
                queued[(backend, device, arch, queue)] = n
            for labels, n in sorted(queued.items()):
                depth.add_metric(list(labels), n)
            yield depth

            yield self._build_durations(s.execute(
                select(Job.backend, Job.device, Job.status, Job.timings)
                .where(Job.status.in_(("succeeded", "failed")))).tuples())

            age = GaugeMetricFamily("kiln_worker_heartbeat_age_seconds",
                                    "Seconds since each registered worker last reported",
                                    labels=["worker", "hostname"])
            for w in s.scalars(select(Worker)):
                age.add_metric([w.id, w.hostname], (now - w.last_seen_at).total_seconds())
            yield age

            submissions = CounterMetricFamily(
                "kiln_submissions", "Answered compile requests by outcome (cached, queued, "
                "joined), from the database: all API processes, across restarts",
                labels=["outcome"])
            for outcome, n in s.execute(select(Submission.outcome, func.count())
                                        .group_by(Submission.outcome)):
                submissions.add_metric([outcome], n)
            yield submissions

            count, size = s.execute(select(func.count(), func.coalesce(func.sum(Engine.size), 0))
                                    .select_from(Engine)).one()
            yield GaugeMetricFamily("kiln_engines_stored", "Engines in the cache", value=count)
            yield GaugeMetricFamily("kiln_engine_bytes_stored", "Bytes of stored engines",
                                    value=int(size))

            tasks = {t.task: t for t in s.scalars(select(HousekeepingTask))}
            evict, gc = tasks.get("evict"), tasks.get("gc")
            yield CounterMetricFamily("kiln_evictions", "Engines evicted to keep the store "
                                      "under its budget", value=evict.items_total if evict else 0)
            yield CounterMetricFamily("kiln_evicted_bytes", "Bytes freed by eviction",
                                      value=evict.bytes_total if evict else 0)
            yield CounterMetricFamily("kiln_orphans_collected", "Unreferenced blobs deleted",
                                      value=gc.items_total if gc else 0)
            last = GaugeMetricFamily("kiln_housekeeping_last_run_age_seconds",
                                     "Seconds since each housekeeping task last ran",
                                     labels=["task"])
            for name, t in sorted(tasks.items()):
                if t.last_run_at is not None:
                    last.add_metric([name], (now - t.last_run_at).total_seconds())
            yield last

    @staticmethod
    def _build_durations(rows: Any) -> HistogramMetricFamily:
        counts: dict[tuple[str, str, str], list[int]] = defaultdict(
            lambda: [0] * (len(BUILD_BUCKETS) + 1))
        sums: dict[tuple[str, str, str], float] = defaultdict(float)
        for backend, device, status, timings in rows:
            seconds = (timings or {}).get("build_s", (timings or {}).get("child_s"))
            if seconds is None:
                continue
            key = (backend, device, status)
            slot = next((i for i, b in enumerate(BUILD_BUCKETS) if seconds <= b),
                        len(BUILD_BUCKETS))
            counts[key][slot] += 1
            sums[key] += float(seconds)
        hist = HistogramMetricFamily(
            "kiln_build_duration_seconds", "Build time of finished jobs by target and outcome",
            labels=["backend", "device", "outcome"])
        for key in sorted(counts):
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, BUILD_BUCKETS), "+Inf"], counts[key]):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric(list(key), buckets, sums[key])
        return hist


def init_app(app: Flask) -> None:
    @app.after_request
    def _count(response: Response) -> Response:
        observe(request.endpoint or "", response)
        return response


def scrape(services: Services) -> Response:
    """The ``/metrics`` answer: this process' (or all processes') counters + the database's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        counted = generate_latest(registry)
    else:
        counted = generate_latest(REGISTRY)
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector(services))
    return Response(counted + generate_latest(database), mimetype=CONTENT_TYPE_LATEST)
