"""The task registry: names, the functions behind them, and what makes them retry.

A task is a plain function ``func(ctx, **kwargs)`` registered under a dotted name
with ``@task("studybridge.something")``. ``ctx`` (a ``TaskContext``) hands it the
process's ``Archive`` and ``Settings``; keyword arguments are JSON values (strings,
numbers, lists), because with a broker they travel as JSON. A task holds no
business logic: it calls archive (or consent, transfer) functions.

The same function runs in a Celery worker (``gateway.tasks.celery_app``) or in a
thread of a serving process on the embedded default (``gateway.tasks.dispatch``).
Either way it may run more than once (a worker killed mid-task, a redelivery after
the visibility timeout, two gateways coalescing the same series): every task must
be idempotent.

Modules that define tasks are listed in ``TASK_MODULES`` so a worker imports them
at start; a package adding tasks adds its module there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError, OperationalError

from gateway.archive.errors import IndexUnavailable, StorageUnavailable

if TYPE_CHECKING:
    from gateway.archive import Archive
    from gateway.config import Settings

# Modules holding @task definitions, imported by workers and dispatchers.
TASK_MODULES: list[str] = [
    "gateway.tasks.derived",
    "gateway.tasks.sweeps",
    "gateway.tasks.audit",
    "gateway.transfers.tasks",
    "gateway.forward.tasks",
]

# Failures that say "not now" (a backend is down), not "never": the task is retried
# later with a growing delay.
TRANSIENT: tuple[type[BaseException], ...] = (
    IndexUnavailable,
    StorageUnavailable,
    OperationalError,
    DBAPIError,
    ConnectionError,
    TimeoutError,
)


@dataclass
class TaskContext:
    """What a task function gets: this process's archive and settings."""

    archive: Archive
    settings: Settings


@dataclass(frozen=True)
class TaskDef:
    name: str
    func: Callable[..., Any]
    # Attempts after the first one when a transient failure occurs.
    max_retries: int = 5


_TASKS: dict[str, TaskDef] = {}


def task(name: str, *, max_retries: int = 5) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func(ctx, **kwargs)`` as the task ``name``."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        existing = _TASKS.get(name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"task {name} is registered twice")
        _TASKS[name] = TaskDef(name, func, max_retries)
        return func

    return register


def load_task_modules() -> None:
    for module in TASK_MODULES:
        importlib.import_module(module)


def all_tasks() -> dict[str, TaskDef]:
    load_task_modules()
    return dict(_TASKS)


def get_task(name: str) -> TaskDef:
    load_task_modules()
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"no task named {name!r}") from None


def retry_delay(attempt: int) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): 1, 2, 4 ... at most 60."""
    return float(min(60, 2 ** (attempt - 1)))
