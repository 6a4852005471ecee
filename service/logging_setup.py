"""Logging for Kiln's processes: plain text by default, one JSON object a line with
``KILN_LOG_FORMAT=json``; the id of the job being worked on is on every line about it.

The job id travels in a context variable that the worker sets around each build
(:func:`job_context`), so every line logged while a build runs carries it, Celery's own lines
included, without each call passing it. Two noise sources are filtered: the development
server's access line for every successful GET (clients poll jobs every second), and Celery's
"Task ... succeeded" line, which it prints for every build that returns, failed or not; the
worker logs the build's real outcome instead.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_job",
                                                                         default=None)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class JobIdFilter(logging.Filter):
    """Put ``job_id`` on every record: an explicit ``extra={"job_id": ...}`` or the current."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = current_job.get()
        return True


class QuietPolling(logging.Filter):
    """Drop the werkzeug access line of successful GET/HEAD requests; keep writes and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) >= 2 and isinstance(args[0], str):
            method = args[0].split(" ", 1)[0]
            if method in ("GET", "HEAD") and str(args[1])[:1] in ("1", "2", "3"):
                return False
        return True


class NoFalseSuccess(logging.Filter):
    """Drop Celery's "Task kiln.build[...] succeeded" line: a build that failed also returns."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery.app import trace

        if record.msg is trace.LOG_SUCCESS or record.msg == trace.LOG_SUCCESS:
            data = record.args if isinstance(record.args, dict) else {}
            return not str(data.get("name", "")).startswith("kiln.")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id:
            out["job_id"] = job_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{line} [job {job_id}]" if job_id and job_id not in record.getMessage() else line


def configure(log_format: str = "text", level: str | int = "INFO") -> None:
    """Configure the root logger of this process (call once, at process start)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("werkzeug").addFilter(QuietPolling())
    logging.getLogger("celery.app.trace").addFilter(NoFalseSuccess())


def outcome_level(outcome: str) -> int:
    """The log level of a build's outcome string (``succeeded: ...``, ``cancelled``, ...)."""
    if outcome.startswith(("succeeded", "cancelled", "skipped", "fenced")):
        return logging.INFO
    return logging.WARNING
