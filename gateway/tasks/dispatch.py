"""Submitting tasks: the one API the rest of the code calls, with or without a broker.

``archive.tasks.submit("studybridge.prepare_series", study_uid=..., series_uid=...)``
returns at once, on every configuration:

- ``InProcessDispatcher`` (embedded default, no ``task_broker_url``): a small thread
  pool of the calling process runs the task function; transient failures are
  retried with a growing delay. Nothing survives the process: only derived work
  (rebuildable on demand) and nudges whose state lives in the index go this way.
- ``CeleryDispatcher`` (Redis or RabbitMQ): a sender thread publishes the task to
  the broker, so a slow or unreachable broker never holds up a C-STORE or a STOW
  request; ``studybridge worker`` processes run it.

A submitted task is a nudge, not a promise: work that must not be lost (a transfer)
keeps its state in the index, and a periodic task picks up what a lost nudge missed.

``Coalescer`` turns many submissions for one key (a series) into one task, started
when the submissions pause (``task_series_pause``) or at the latest
``task_series_max_wait`` after the first. It coalesces per process; several
processes may each submit once, which the idempotent tasks absorb.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.tasks.registry import TRANSIENT, TaskContext, get_task, retry_delay

if TYPE_CHECKING:
    from gateway.archive import Archive
    from gateway.config import Settings

log = logging.getLogger(__name__)


class Dispatcher:
    """Submit tasks by name; see the module docstring."""

    def submit(self, name: str, /, **kwargs: Any) -> None:
        raise NotImplementedError

    def pending(self) -> dict[str, int]:
        """Tasks waiting to run, per queue (the queue depth)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop; submissions not yet handed over are dropped (derived work only)."""


class InProcessDispatcher(Dispatcher):
    """Runs tasks in a thread pool of this process (embedded default)."""

    def __init__(self, context: TaskContext, threads: int = 2) -> None:
        self.context = context
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="task")
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._timers: set[threading.Timer] = set()

    def submit(self, name: str, /, **kwargs: Any) -> None:
        get_task(name)  # an unknown name is the caller's bug: say so now
        self._enqueue(name, kwargs, attempt=0)

    def _enqueue(self, name: str, kwargs: dict[str, Any], attempt: int) -> None:
        with self._lock:
            if self._closed:
                return
            self._waiting += 1
        try:
            self._pool.submit(self._run, name, kwargs, attempt)
        except RuntimeError:  # the pool shut down meanwhile
            with self._lock:
                self._waiting -= 1

    def _run(self, name: str, kwargs: dict[str, Any], attempt: int) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1
        try:
            self._attempt(name, kwargs, attempt)
        finally:
            with self._lock:
                self._running -= 1

    def _attempt(self, name: str, kwargs: dict[str, Any], attempt: int) -> None:
        definition = get_task(name)
        try:
            definition.func(self.context, **kwargs)
        except TRANSIENT as exc:
            if attempt >= definition.max_retries:
                log.error("task %s failed %d times, giving up: %s", name, attempt + 1, exc)
                return
            delay = retry_delay(attempt + 1)
            log.warning("task %s failed (%s); retrying in %.0f s", name, exc, delay)
            self._later(delay, name, kwargs, attempt + 1)
        except Exception:
            log.exception("task %s failed", name)

    def _later(self, delay: float, name: str, kwargs: dict[str, Any], attempt: int) -> None:
        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
            self._enqueue(name, kwargs, attempt)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers.add(timer)
        timer.start()

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {"in-process": self._waiting + len(self._timers)}

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no task is waiting, running or due for a retry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._waiting == 0 and self._running == 0 and not self._timers:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers = list(self._timers)
            self._timers.clear()
        for timer in timers:
            timer.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class CeleryDispatcher(Dispatcher):
    """Publishes tasks to the broker from a sender thread (never blocks the caller)."""

    _STOP = object()

    def __init__(self, settings: Settings) -> None:
        from gateway.tasks.celery_app import make_celery

        self.settings = settings
        self.app = make_celery(settings)
        self._outbox: queue.Queue[Any] = queue.Queue(maxsize=100_000)
        # Tasks that could not be handed to the broker (it stayed unreachable).
        self.failures = 0
        self._sender = threading.Thread(target=self._send_loop, name="task-sender", daemon=True)
        self._sender.start()

    def submit(self, name: str, /, **kwargs: Any) -> None:
        get_task(name)
        try:
            self._outbox.put_nowait((name, kwargs))
        except queue.Full:
            log.error("task outbox full (broker unreachable?): %s dropped", name)

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is self._STOP:
                self._outbox.task_done()
                return
            name, kwargs = item
            try:
                self.app.send_task(
                    name,
                    kwargs=kwargs,
                    queue=self.settings.task_queue,
                    retry=True,
                    retry_policy={
                        "max_retries": 5,
                        "interval_start": 0.2,
                        "interval_step": 0.5,
                        "interval_max": 2,
                    },
                )
            except Exception as exc:  # the broker is down: derived work waits for demand
                self.failures += 1
                log.warning("task %s not submitted: broker unreachable (%s)", name, exc)
            finally:
                self._outbox.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted was handed to the broker (or given up)."""
        deadline = time.monotonic() + timeout
        while self._outbox.unfinished_tasks > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def pending(self) -> dict[str, int]:
        from gateway.tasks.celery_app import queue_depth

        return {self.settings.task_queue: queue_depth(self.app, self.settings.task_queue)}

    def close(self) -> None:
        self.flush(5)
        self._outbox.put(self._STOP)
        self._sender.join(5)


@dataclass
class _Burst:
    name: str
    kwargs: dict[str, Any]
    first: float
    last: float = field(default=0.0)


class Coalescer:
    """One submission per key once its submissions pause (see the module docstring)."""

    def __init__(
        self,
        submit: Callable[..., None],
        pause: float,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._submit = submit
        self.pause = pause
        self.max_wait = max_wait
        self._clock = clock
        self._bursts: dict[str, _Burst] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="task-coalescer", daemon=True)
        self._thread.start()

    def touch(self, key: str, name: str, /, **kwargs: Any) -> None:
        now = self._clock()
        with self._lock:
            burst = self._bursts.get(key)
            if burst is None:
                self._bursts[key] = _Burst(name, kwargs, now, now)
                self._wake.set()
            else:
                burst.last = now
                burst.kwargs = kwargs

    def due(self) -> list[_Burst]:
        """Take the bursts that are due now (their submissions paused or waited long)."""
        now = self._clock()
        ready: list[_Burst] = []
        with self._lock:
            for key, burst in list(self._bursts.items()):
                if now - burst.last >= self.pause or now - burst.first >= self.max_wait:
                    ready.append(self._bursts.pop(key))
        return ready

    def _loop(self) -> None:
        tick = max(0.05, min(0.5, self.pause / 4))
        while not self._stopped:
            self._wake.wait(tick)
            self._wake.clear()
            for burst in self.due():
                self._fire(burst)

    def _fire(self, burst: _Burst) -> None:
        try:
            self._submit(burst.name, **burst.kwargs)
        except Exception:
            log.exception("coalesced task %s not submitted", burst.name)

    def flush(self) -> None:
        """Submit every waiting burst now (a process about to exit)."""
        with self._lock:
            bursts = list(self._bursts.values())
            self._bursts.clear()
        for burst in bursts:
            self._fire(burst)

    def close(self, *, flush: bool) -> None:
        if flush:
            self.flush()
        self._stopped = True
        self._wake.set()
        self._thread.join(5)


def open_dispatcher(settings: Settings, archive: Archive) -> Dispatcher:
    """The dispatcher ``settings`` ask for: a broker's, or this process's threads."""
    if settings.task_broker_url:
        return CeleryDispatcher(settings)
    return InProcessDispatcher(TaskContext(archive, settings), settings.task_threads)
