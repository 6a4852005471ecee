"""The Celery app, configured from settings. The API only publishes tasks by name.

Delivery settings follow from the database being the source of truth: a task is acknowledged
after it ran (``acks_late``) and requeued if its worker dies, a worker takes one task at a time,
and results are not stored in Celery (the job row holds them).
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from service.settings import Settings

BUILD_TASK = "kiln.build"
log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("kiln", broker=settings.broker_url, set_as_current=False)
    transport: dict[str, object] = {}
    if settings.broker_url.startswith("sqla+"):
        # The embedded broker polls its SQLite table, once a second by default. Its transport
        # hands every option to create_engine, so the interval can only be set on the class.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.2
    else:
        # Redis redelivers an unacknowledged task after this long; fencing in the job row makes
        # a redelivery harmless, and it must not come before a long build can finish.
        transport["visibility_timeout"] = settings.build_timeout_s + 600
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        task_default_queue="kiln.default",
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return celery


def publish_build(celery: Celery, job_id: str, queue: str, attempts: int = 3) -> bool:
    """Publish a build; False if the broker would not take it.

    The job row is already committed, so a failed publish loses nothing: the sweeper
    publishes jobs left queued too long. The embedded broker can refuse the first message to
    a new queue when a worker declares that queue at the same moment (both insert its row);
    a retry then finds the row. (Workers declare their queues before they register, so a
    job is normally published to a queue that already exists.)
    """
    for attempt in range(1, attempts + 1):
        try:
            celery.send_task(BUILD_TASK, args=[job_id], queue=queue)
            return True
        except Exception:
            log.warning("publishing job %s to %s failed (try %d of %d)", job_id, queue,
                        attempt, attempts, exc_info=True)
            # kombu reconnects on its own; closing its pools here would break every later
            # publish from this process ("Acquire on closed pool"), found by the fault suite.
            time.sleep(0.2 * attempt)
    return False


def declare_queues(celery: Celery, queues: list[str]) -> None:
    """Create the broker's queues now, before anyone publishes to them."""
    from kombu import Queue

    with celery.connection_for_write() as conn:
        channel = conn.default_channel
        for name in queues:
            Queue(name, routing_key=name).bind(channel).declare()
