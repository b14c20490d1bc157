"""``studybridge worker``: a Celery worker running the registered tasks.

It consumes ``settings.task_queue`` from ``settings.task_broker_url`` with a pool of
processes (prefork), acknowledging each task only when it finished (see
``celery_app``). With ``beat`` it also sends the periodic sweep; several workers
with beat send it several times, which the idempotent sweep absorbs.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from gateway.ops.logs import setup_logging
from gateway.tasks.celery_app import make_celery

if TYPE_CHECKING:
    from gateway.config import Settings


def run_worker(
    settings: Settings, *, concurrency: int = 0, beat: bool = True, loglevel: str = "INFO"
) -> int:
    if not settings.task_broker_url:
        raise SystemExit(
            "no task broker configured (task_broker_url): on the embedded default, tasks "
            "run inside `studybridge serve`; set STUDYBRIDGE_TASK_BROKER_URL to run workers"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Our loggers (tasks, archive) write like the serving processes' (text or JSON).
    setup_logging(settings.log_level, settings.log_format)
    app = make_celery(settings)
    worker = app.Worker(
        hostname=f"studybridge-{os.getpid()}@{socket.gethostname()}",
        queues=[settings.task_queue],
        concurrency=concurrency or max(2, os.cpu_count() or 2),
        pool="prefork",
        loglevel=loglevel,
        beat=beat,
        schedule_filename=str((settings.data_dir / "celerybeat-schedule").resolve()),
        # No worker-to-worker chatter at start; tasks need none of it.
        without_gossip=True,
        without_mingle=True,
    )
    worker.start()
    return int(worker.exitcode or 0)
