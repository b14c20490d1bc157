"""Background tasks: derived work after ingest, sweeps, forwarding (Celery or in-process).

How to use (see docs/architecture.md, "Tasks"):

- define: ``@task("studybridge.name")`` on ``func(ctx, **json_kwargs)`` in a module
  listed in ``registry.TASK_MODULES``; the function calls archive (or consent,
  transfer) functions and is idempotent;
- submit: ``archive.tasks.submit("studybridge.name", key=value)``: returns at once,
  runs in a ``studybridge worker`` when ``task_broker_url`` names a broker, else in
  a thread of the submitting process;
- see the backlog: ``archive.tasks.pending()`` or ``studybridge tasks``.
"""

from gateway.tasks.dispatch import Coalescer, Dispatcher, open_dispatcher
from gateway.tasks.registry import TaskContext, task

__all__ = ["Coalescer", "Dispatcher", "TaskContext", "open_dispatcher", "task"]
