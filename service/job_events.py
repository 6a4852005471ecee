"""Live job progress as Server-Sent Events: ``GET /api/v1/jobs/<id>/events``.

Events are derived from the job row, not stored: a job's phases only move forward within an
attempt (queued -> building -> validating -> terminal), so the id of each event is its place
in that order plus the log offset, ``<attempt>.<rank>.<log offset>``. A client that reconnects
with ``Last-Event-ID`` gets exactly what it has not seen, from any API process, with nothing
kept in memory between requests. A phase that came and went between two reads (a fast
validation) is still sent, in order, because a later phase implies it.

Each stream lasts at most ``MAX_STREAM_S``; it then ends with a ``retry`` hint and the client
reconnects with its last id, so a long build never pins a server worker for hours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from service.db import Database
from service.models import TERMINAL_STATES, Job
from service.schemas import job_json

POLL_S = 0.25
KEEPALIVE_S = 15.0
MAX_STREAM_S = 600.0
LOG_CHUNK = 16_000  # characters of log per event
_RANK = {"queued": 0, "building": 1, "validating": 2}
TERMINAL_KEY = (1_000_000, 0)


def phase_key(status: str, attempts: int) -> tuple[int, int]:
    """Where a state sits in the job's history; later states compare greater."""
    if status in TERMINAL_STATES:
        return TERMINAL_KEY
    if status == "queued":  # queued again after a failed attempt belongs to the next attempt
        return (attempts + 1, 0)
    return (attempts, _RANK.get(status, 1))


def parse_event_id(text: str | None) -> tuple[tuple[int, int], int]:
    """``Last-Event-ID`` -> (phase key, log offset); anything unreadable starts from scratch."""
    try:
        attempt, rank, offset = (int(p) for p in (text or "").split("."))
        return (attempt, rank), max(offset, 0)
    except ValueError:
        return (-1, -1), 0


def _implied_phases(status: str, attempts: int) -> list[tuple[str, tuple[int, int]]]:
    """The phases a job in this state has passed through in its current attempt, in order."""
    if status == "succeeded":
        n = max(attempts, 1)
        chain = [("queued", (n, 0)), ("building", (n, 1)), ("validating", (n, 2))]
        return [*chain, (status, TERMINAL_KEY)]
    key = phase_key(status, attempts)
    if status in TERMINAL_STATES or status == "queued":
        return [(status, key)]
    return [(s, (key[0], r)) for s, r in (("queued", 0), ("building", 1), ("validating", 2))
            if r <= key[1]]


def _frame(event: str, event_id: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


def stream(db: Database, job_id: str, last_event_id: str | None, with_log: bool,
           poll_s: float = POLL_S, max_stream_s: float = MAX_STREAM_S) -> Iterator[str]:
    """Yield SSE frames for one job until it ends (or the stream's time is up)."""
    sent_key, sent_log = parse_event_id(last_event_id)
    started = last_beat = time.monotonic()
    yield "retry: 1000\n\n"
    while True:
        with db.session() as s:
            job = s.get(Job, job_id)
            if job is None:  # deleted while followed
                return
            status, attempts, log = job.status, job.attempts, job.log or ""
            body = job_json(job, log_tail=0)
        if len(log) < sent_log:  # the log was reset by a retry
            sent_log = 0
        frames: list[tuple[str, tuple[int, int], int, dict[str, Any]]] = []
        if with_log:
            while sent_log < len(log):
                text = log[sent_log:sent_log + LOG_CHUNK]
                sent_log += len(text)
                frames.append(("log", sent_key, sent_log,
                               {"offset": sent_log - len(text), "text": text}))
        for phase, key in _implied_phases(status, attempts):
            if key > sent_key:
                sent_key = key
                data = {**body, "status": phase, "current_status": status}
                frames.append(("state", key, sent_log, data))
        for event, key, offset, data in frames:
            yield _frame(event, f"{key[0]}.{key[1]}.{offset}", data)
            last_beat = time.monotonic()
        if status in TERMINAL_STATES:
            yield _frame("end", f"{sent_key[0]}.{sent_key[1]}.{sent_log}", {"status": status})
            return
        now = time.monotonic()
        if now - started > max_stream_s:
            return  # the client reconnects with Last-Event-ID
        if now - last_beat > KEEPALIVE_S:
            yield ": keepalive\n\n"
            last_beat = now
        time.sleep(poll_s)
