"""Prometheus metrics, correct across the several processes ``serve`` runs.

``studybridge serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before
it starts its children (``prepare_multiprocess``); each process then writes its
samples to files there, and ``/metrics`` (any HTTP process) adds them up. Without
that folder (tests, one-off commands) metrics live in the process's own registry.

The metrics: instances and bytes received (by door and outcome), ingest and query
latency histograms, DIMSE associations (by result), failures by cause (the archive
error's reason), and, when a broker is configured, the task queue depth read at
scrape time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from gateway.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

INSTANCES = Counter(
    "studybridge_instances_received",
    "Instances that reached ingest, by door and outcome.",
    ["door", "outcome"],
)
BYTES = Counter(
    "studybridge_bytes_received", "Bytes of data sets stored or matched, by door.", ["door"]
)
INGEST_SECONDS = Histogram(
    "studybridge_ingest_seconds",
    "Time to ingest one instance (parse, store durably, index), by door.",
    ["door"],
    buckets=_LATENCY_BUCKETS,
)
QUERY_SECONDS = Histogram(
    "studybridge_query_seconds",
    "Time to answer one query (C-FIND or QIDO-RS), by level.",
    ["level"],
    buckets=_LATENCY_BUCKETS,
)
ASSOCIATIONS = Counter(
    "studybridge_dimse_associations",
    "DIMSE association requests, by result (accepted, rejected).",
    ["result"],
)
FAILURES = Counter(
    "studybridge_failures",
    "Refused or failed operations by cause (the archive error's reason), by door.",
    ["door", "reason"],
)


def prepare_multiprocess(folder: Path) -> None:
    """Before starting children: an empty folder for their samples, named in the env.

    The environment variable is how prometheus_client's multiprocess mode is chosen
    (it reads it itself, when it is imported); spawned children inherit it.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)


def process_exited(pid: int) -> None:
    """Forget a dead child's live gauges (counters and histograms are kept)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


class _QueueDepth:
    """Read at scrape time: tasks waiting in the broker's queue, and whether it answered."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Any = None

    def collect(self) -> Iterator[Metric]:
        from gateway.tasks.celery_app import make_celery, queue_depth

        up = GaugeMetricFamily(
            "studybridge_task_broker_up", "1 when the task broker answered this scrape."
        )
        depth = GaugeMetricFamily(
            "studybridge_task_queue_depth", "Tasks waiting in the broker queue.", labels=["queue"]
        )
        try:
            if self._app is None:
                self._app = make_celery(self.settings)
            waiting = queue_depth(self._app, self.settings.task_queue)
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        depth.add_metric([self.settings.task_queue], waiting)
        yield up
        yield depth


def task_registry(settings: Settings) -> CollectorRegistry | None:
    """The queue-depth collector when a broker is configured (else tasks run in-process)."""
    if not settings.task_broker_url:
        return None
    registry = CollectorRegistry()
    registry.register(_QueueDepth(settings))  # type: ignore[arg-type]
    return registry


def exposition(extra: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The text exposition of every process's metrics (and ``extra``'s)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    body = generate_latest(registry)
    if extra is not None:
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST


def observe_ingest(door: str, outcome: str, size: int, seconds: float) -> None:
    INSTANCES.labels(door, outcome).inc()
    BYTES.labels(door).inc(size)
    INGEST_SECONDS.labels(door).observe(seconds)


def observe_failure(door: str, reason: str) -> None:
    INSTANCES.labels(door, "refused").inc()
    FAILURES.labels(door, reason).inc()
