"""The Celery application: every registered task, configured from ``Settings``.

Delivery is at least once, never at most once:

- ``task_acks_late``: a task is acknowledged when it finished, not when a worker
  took it; ``task_reject_on_worker_lost``: a pool process that dies mid-task puts
  the task back at once;
- ``worker_prefetch_multiplier=1``: a worker holds no more tasks than it runs, so a
  killed worker strands at most one per pool process;
- Redis: the broker hands an unacknowledged task to another worker after
  ``task_visibility_timeout`` seconds (the default of the transport is an hour);
  RabbitMQ redelivers as soon as the dead worker's connection closes.

So a task may run twice and must be idempotent (see ``registry``). Transient
failures (a backend down) are retried with a growing delay. Results are not kept:
tasks write what they produce into the archive.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from amqp.exceptions import NotFound as AMQPNotFound
from celery import Celery
from kombu.exceptions import ChannelError

from gateway.tasks.registry import TRANSIENT, TaskContext, TaskDef, all_tasks, retry_delay

if TYPE_CHECKING:
    from gateway.config import Settings

log = logging.getLogger(__name__)

# The context of a worker process, opened on its first task (after the pool forked:
# database connections must not be shared across fork).
_context: TaskContext | None = None
_settings: Settings | None = None


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings.task_broker_url`` with every task registered."""
    global _settings
    _settings = settings
    app = Celery("studybridge", broker=settings.task_broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.task_queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        broker_heartbeat=30,
        beat_schedule={
            "sweep": {
                "task": "studybridge.sweep",
                "schedule": settings.sweep_interval,
                "options": {"queue": settings.task_queue},
            },
            **_resume_schedule(settings),
            **_audit_schedule(settings),
        },
    )
    for definition in all_tasks().values():
        _register(app, definition)
    return app


def _resume_schedule(settings: Settings) -> dict[str, Any]:
    """Due transfer pulls and forwarding jobs, resumed every ``resume_interval``."""
    if settings.resume_interval <= 0:
        return {}
    return {
        name: {
            "task": task_name,
            "schedule": settings.resume_interval,
            "options": {"queue": settings.task_queue},
        }
        for name, task_name in (
            ("transfer-pulls", "studybridge.transfer_pull"),
            ("forwards", "studybridge.forward"),
        )
    }


def _audit_schedule(settings: Settings) -> dict[str, Any]:
    """Signed audit checkpoints (and syslog shipping) every ``audit_checkpoint_interval``."""
    if settings.audit_checkpoint_interval <= 0:
        return {}
    return {
        "audit-checkpoint": {
            "task": "studybridge.audit_checkpoint",
            "schedule": settings.audit_checkpoint_interval,
            "options": {"queue": settings.task_queue},
        }
    }


def _transport_options(settings: Settings) -> dict[str, Any]:
    visibility = settings.task_visibility_timeout
    options: dict[str, Any] = {
        "visibility_timeout": visibility,
        # Publishing must fail fast when the broker is away (the sender retries).
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
    }
    if settings.task_broker_url.startswith(("redis://", "rediss://")):
        options.update(
            # Look for expired unacknowledged tasks often enough that one is handed on
            # about a visibility timeout after its worker died (kombu's default scan
            # runs every 100 s).
            unacked_restore_interval=max(1.0, min(10.0, visibility / 3)),
            unacked_restore_throttle=1,
            # Keys of several installations (or test runs) sharing a Redis stay apart.
            global_keyprefix=f"{settings.task_queue}:",
        )
    return options


def _register(app: Celery, definition: TaskDef) -> None:
    def run(self: Any, **kwargs: Any) -> None:
        try:
            definition.func(worker_context(), **kwargs)
        except TRANSIENT as exc:
            attempt = self.request.retries + 1
            raise self.retry(exc=exc, countdown=retry_delay(attempt)) from exc

    run.__name__ = definition.name.rsplit(".", 1)[-1]
    run.__doc__ = definition.func.__doc__
    app.task(
        name=definition.name,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=definition.max_retries,
    )(run)


def worker_context() -> TaskContext:
    """The archive of this worker process, opened once."""
    global _context
    if _context is None:
        from gateway.archive import Archive

        if _settings is None:
            raise RuntimeError("the Celery app was not made from settings")
        _context = TaskContext(Archive.open(_settings), _settings)
    return _context


def queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` (not counting those a worker holds)."""
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        channel = conn.default_channel
        if conn.transport.driver_type == "redis":
            # kombu's passive declare checks the queue with an EXISTS that ignores the
            # key prefix; its size function (LLEN over the priority lists) does not.
            return int(channel._size(queue))
        try:
            ok = channel.queue_declare(queue=queue, passive=True)
        except (ChannelError, AMQPNotFound):
            return 0  # nothing was ever submitted to it
        return int(ok.message_count)
