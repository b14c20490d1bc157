"""`studybridge worker` with real brokers: tasks flow, queue depth, a killed worker.

Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672, guest/guest) are the brokers
CI machines run; each test uses a queue (and Redis key prefix) of its own, so runs
never see each other's tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.archive import Archive
from gateway.archive.metadata import cache_key, series_marker
from gateway.config import Settings
from gateway.tasks.celery_app import make_celery, queue_depth
from gateway.tasks.derived import PREPARE_SERIES
from gateway.tasks.dispatch import CeleryDispatcher
from tests.factories import ct_series, uid
from tests.gateway.archive.helpers import SOURCE
from tests.servers import Worker, missing, running_worker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

BROKERS = {
    "redis": ("redis://127.0.0.1:6379/0", 6379),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", 5672),
}


def require_broker(kind: str) -> str:
    url, port = BROKERS[kind]
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", port)) != 0:
            missing(f"{kind} broker at 127.0.0.1:{port} is not running")
    return url


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def broker_settings(tmp_path: Path, url: str, **extra) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        task_broker_url=url,
        task_queue=f"sbtest-{uuid.uuid4().hex[:10]}",
        task_series_pause=0.3,
        task_visibility_timeout=3.0,
        **extra,
    )


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDYBRIDGE_")}
    env.update(
        STUDYBRIDGE_TASK_BROKER_URL=settings.task_broker_url,
        STUDYBRIDGE_TASK_QUEUE=settings.task_queue,
        STUDYBRIDGE_TASK_VISIBILITY_TIMEOUT=str(settings.task_visibility_timeout),
        PYTHONPATH=str(Path(__file__).resolve().parents[3]),
    )
    return env


def start_worker(settings: Settings, log_path: Path) -> Worker:
    return Worker(settings.data_dir, env_for(settings), log_path)


def worker(settings: Settings, log_path: Path):
    return running_worker(settings.data_dir, env_for(settings), log_path)


@contextlib.contextmanager
def cleanup_queue(settings: Settings) -> Iterator[None]:
    try:
        yield
    finally:
        app = make_celery(settings)
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(settings.task_queue)


def metadata_keys(archive: Archive, study_uid: str, series_uid: str) -> list[str]:
    return sorted(archive.store.iter_keys(f"metadata/{study_uid}/{series_uid}/"))


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_runs_post_ingest_work_and_depth_is_visible(broker: str, tmp_path: Path):
    settings = broker_settings(tmp_path, require_broker(broker))
    with cleanup_queue(settings):
        archive = Archive.open(settings, migrate_schema=True, post_ingest=True)
        try:
            # No worker yet: submitted tasks wait in the broker, visible as its depth.
            dispatcher = CeleryDispatcher(settings)
            for _ in range(3):
                dispatcher.submit("studybridge.sweep", grace=86400)
            assert dispatcher.flush(20) and dispatcher.failures == 0
            dispatcher.close()
            wait_for(lambda: queue_depth(make_celery(settings), settings.task_queue) == 3, 20)
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "tasks",
                    "--json",
                    "--data-dir",
                    str(settings.data_dir),
                ],
                capture_output=True,
                text=True,
                env=env_for(settings),
                timeout=60,
                check=True,
            )
            assert json.loads(cli.stdout)["queues"] == {settings.task_queue: 3}

            study = uid()
            paths = ct_series(tmp_path / "s", 5, study_uid=study)
            for path in paths:
                result = archive.ingest_file(path, SOURCE)
            series = result.series_uid
            with worker(settings, tmp_path / "worker.log") as w:
                marker = series_marker(archive.db, study, series)
                key = cache_key(study, series, marker)
                wait_for(lambda: archive.store.exists(key), 60, "series metadata from the worker")
                wait_for(lambda: w.succeeded("studybridge.sweep") == 3, 30, "the sweeps")
                wait_for(lambda: w.succeeded(PREPARE_SERIES) == 1, 30, "prepare task")
                assert queue_depth(make_celery(settings), settings.task_queue) == 0
                assert metadata_keys(archive, study, series) == [key]
                time.sleep(1.0)
                assert w.succeeded(PREPARE_SERIES) == 1  # coalesced: once for 5 instances
        finally:
            archive.close()


def test_killed_worker_task_is_redelivered_and_run_once(tmp_path: Path):
    """SIGKILL a worker holding a task: another worker runs it a visibility timeout later."""
    import redis

    settings = broker_settings(tmp_path, require_broker("redis"))
    client = redis.Redis.from_url(settings.task_broker_url)
    unacked = f"{settings.task_queue}:unacked"
    with cleanup_queue(settings):
        archive = Archive.open(settings, migrate_schema=True)
        try:
            study = uid()
            paths = ct_series(tmp_path / "s", 150, study_uid=study)
            for path in paths:
                result = archive.ingest_file(path, SOURCE)
            series = result.series_uid
            first = start_worker(settings, tmp_path / "worker-1.log")
            try:
                dispatcher = CeleryDispatcher(settings)
                dispatcher.submit(PREPARE_SERIES, study_uid=study, series_uid=series)
                assert dispatcher.flush(20) and dispatcher.failures == 0
                dispatcher.close()
                # The worker took it (held unacknowledged): kill it on the spot.
                wait_for(lambda: client.hlen(unacked) == 1, 30, "the worker to take the task")
                first.kill()
            finally:
                first.stop()
            assert first.succeeded(PREPARE_SERIES) == 0, "the task finished before the kill"
            # Whatever the dead worker wrote is thrown away: only a rerun can make it.
            for key in metadata_keys(archive, study, series):
                archive.store.delete(key)
            assert client.hlen(unacked) == 1  # still held for the dead worker
            started = time.monotonic()
            with worker(settings, tmp_path / "worker-2.log") as second:
                wait_for(lambda: second.succeeded(PREPARE_SERIES) == 1, 60, "the redelivery")
                redelivered_after = time.monotonic() - started
                time.sleep(2 * settings.task_visibility_timeout)
                assert second.succeeded(PREPARE_SERIES) == 1  # once, not again
            assert redelivered_after < 30
            key = cache_key(study, series, series_marker(archive.db, study, series))
            assert metadata_keys(archive, study, series) == [key]
            assert client.hlen(unacked) == 0
            assert queue_depth(make_celery(settings), settings.task_queue) == 0
        finally:
            archive.close()
            with contextlib.suppress(Exception):
                client.delete(unacked, f"{settings.task_queue}:unacked_index")


def test_killed_worker_task_goes_back_to_rabbitmq_at_once(tmp_path: Path):
    """RabbitMQ puts a killed worker's unacknowledged task back when its connection
    closes; the next worker runs it once."""
    settings = broker_settings(tmp_path, require_broker("rabbitmq"))
    app = make_celery(settings)
    with cleanup_queue(settings):
        archive = Archive.open(settings, migrate_schema=True)
        try:
            study = uid()
            paths = ct_series(tmp_path / "s", 150, study_uid=study)
            for path in paths:
                result = archive.ingest_file(path, SOURCE)
            series = result.series_uid
            dispatcher = CeleryDispatcher(settings)
            dispatcher.submit(PREPARE_SERIES, study_uid=study, series_uid=series)
            assert dispatcher.flush(20) and dispatcher.failures == 0
            dispatcher.close()
            wait_for(lambda: queue_depth(app, settings.task_queue) == 1, 20, "the task queued")
            first = start_worker(settings, tmp_path / "worker-1.log")
            try:
                # Delivered to the worker (no longer ready in the queue): kill it.
                wait_for(lambda: queue_depth(app, settings.task_queue) == 0, 30, "delivery")
                first.kill()
            finally:
                first.stop()
            assert first.succeeded(PREPARE_SERIES) == 0, "the task finished before the kill"
            for key in metadata_keys(archive, study, series):
                archive.store.delete(key)
            # Back in the queue as soon as the dead worker's connection closed.
            wait_for(lambda: queue_depth(app, settings.task_queue) == 1, 15, "the requeue")
            with worker(settings, tmp_path / "worker-2.log") as second:
                wait_for(lambda: second.succeeded(PREPARE_SERIES) == 1, 60, "the redelivery")
                time.sleep(3)
                assert second.succeeded(PREPARE_SERIES) == 1
            key = cache_key(study, series, series_marker(archive.db, study, series))
            assert metadata_keys(archive, study, series) == [key]
            assert queue_depth(app, settings.task_queue) == 0
        finally:
            archive.close()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_killed_pool_process_task_is_requeued_and_run_once(tmp_path: Path):
    """SIGKILL the pool process running a task: the worker rejects it back to the
    queue (reject_on_worker_lost) and runs it again in a new pool process, once."""
    import redis

    settings = broker_settings(tmp_path, require_broker("redis"))
    client = redis.Redis.from_url(settings.task_broker_url)
    unacked = f"{settings.task_queue}:unacked"
    with cleanup_queue(settings):
        archive = Archive.open(settings, migrate_schema=True)
        try:
            study = uid()
            for path in ct_series(tmp_path / "s", 150, study_uid=study):
                result = archive.ingest_file(path, SOURCE)
            series = result.series_uid
            with worker(settings, tmp_path / "worker.log") as w:
                pool = _children(w.proc.pid)
                assert pool, "the worker has no pool process"
                dispatcher = CeleryDispatcher(settings)
                dispatcher.submit(PREPARE_SERIES, study_uid=study, series_uid=series)
                assert dispatcher.flush(20) and dispatcher.failures == 0
                dispatcher.close()
                wait_for(lambda: client.hlen(unacked) == 1, 30, "the worker to take the task")
                for pid in pool:
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: "WorkerLostError" in w.log(), 30, "the pool process loss")
                before_loss = w.log().split("WorkerLostError", 1)[0]
                assert "succeeded" not in before_loss, "the task finished before the kill"
                wait_for(lambda: w.succeeded(PREPARE_SERIES) == 1, 60, "the rerun")
                time.sleep(2 * settings.task_visibility_timeout)
                assert w.succeeded(PREPARE_SERIES) == 1
                assert w.proc.poll() is None
            key = cache_key(study, series, series_marker(archive.db, study, series))
            assert metadata_keys(archive, study, series) == [key]
            assert client.hlen(unacked) == 0
        finally:
            archive.close()
            with contextlib.suppress(Exception):
                client.delete(unacked, f"{settings.task_queue}:unacked_index")
