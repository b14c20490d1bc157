"""The dispatch layer without a broker: coalescing, the in-process runner, retries."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gateway.archive import Archive
from gateway.archive.errors import IndexUnavailable
from gateway.config import Settings
from gateway.tasks.dispatch import Coalescer, InProcessDispatcher
from gateway.tasks.registry import TaskContext, get_task, retry_delay, task

# Tasks of this test module (registered in the process-wide registry like any other).
CALLS: list[tuple[str, dict]] = []
FAILURES: dict[str, int] = {}
GATE = threading.Event()


@task("tests.record")
def record(ctx: TaskContext, **kwargs) -> None:
    assert isinstance(ctx.archive, Archive)
    CALLS.append(("record", kwargs))


@task("tests.flaky", max_retries=3)
def flaky(ctx: TaskContext, key: str, fail_times: int) -> None:
    FAILURES[key] = FAILURES.get(key, 0) + 1
    if FAILURES[key] <= fail_times:
        raise IndexUnavailable("index down for a moment")
    CALLS.append(("flaky", {"key": key}))


@task("tests.broken")
def broken(ctx: TaskContext) -> None:
    raise ValueError("a bug, not a passing outage")


@task("tests.blocked")
def blocked(ctx: TaskContext) -> None:
    GATE.wait(10)
    CALLS.append(("blocked", {}))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dispatcher(tmp_path: Path):
    CALLS.clear()
    FAILURES.clear()
    settings = Settings(data_dir=tmp_path / "var")
    archive = Archive.open(settings, migrate_schema=True)
    disp = InProcessDispatcher(TaskContext(archive, settings), threads=2)
    yield disp
    GATE.set()
    disp.close()
    archive.close()


@pytest.mark.fast
def test_coalescer_submits_once_per_key_when_arrivals_pause():
    clock = FakeClock()
    submitted: list[tuple[str, dict]] = []
    co = Coalescer(lambda name, **kw: submitted.append((name, kw)), 3.0, 60.0, clock=clock)
    try:
        for i in range(50):
            co.touch("series-a", "t", n=i)
            co.touch("series-b", "t", n=i)
            clock.now += 0.5
        # Arrivals still come every half second: nothing is due.
        assert co.due() == []
        clock.now += 3.0
        due = co.due()
        assert sorted((b.kwargs["n"]) for b in due) == [49, 49]  # latest arguments win
        assert co.due() == []  # taken once
        co.touch("series-a", "t", n=50)
        assert co.due() == []
    finally:
        co.close(flush=False)
    assert submitted == []  # the fake clock never let the loop see a due burst


@pytest.mark.fast
def test_coalescer_fires_at_max_wait_during_a_long_stream():
    clock = FakeClock()
    co = Coalescer(lambda *a, **k: None, 3.0, 10.0, clock=clock)
    try:
        co.touch("s", "t")
        for _ in range(19):  # a new arrival every half second for 9.5 s
            clock.now += 0.5
            co.touch("s", "t")
            assert co.due() == []
        clock.now += 0.5
        assert len(co.due()) == 1
    finally:
        co.close(flush=False)


@pytest.mark.fast
def test_coalescer_thread_submits_and_flush_hands_over_the_rest():
    submitted: list[tuple[str, dict]] = []
    done = threading.Event()

    def submit(name, **kw):
        submitted.append((name, kw))
        done.set()

    co = Coalescer(submit, 0.1, 5.0)
    co.touch("a", "task.a", x=1)
    assert done.wait(5)
    co.touch("b", "task.b", x=2)
    co.close(flush=True)
    assert submitted == [("task.a", {"x": 1}), ("task.b", {"x": 2})]


@pytest.mark.fast
def test_in_process_submit_returns_at_once_and_runs_the_task(dispatcher):
    GATE.clear()
    started = time.monotonic()
    dispatcher.submit("tests.blocked")
    dispatcher.submit("tests.record", a=1)
    assert time.monotonic() - started < 0.5  # the caller never waits for the work
    assert not dispatcher.drain(0.5)  # the blocked task still holds a thread
    assert CALLS == [("record", {"a": 1})]
    GATE.set()
    assert dispatcher.drain(10)
    assert sorted(name for name, _ in CALLS) == ["blocked", "record"]
    assert dispatcher.pending() == {"in-process": 0}


@pytest.mark.fast
def test_in_process_counts_waiting_tasks(dispatcher):
    GATE.clear()
    for _ in range(4):
        dispatcher.submit("tests.blocked")
    time.sleep(0.2)
    # Two threads run two tasks; two wait.
    assert dispatcher.pending() == {"in-process": 2}
    GATE.set()
    assert dispatcher.drain(10)
    assert dispatcher.pending() == {"in-process": 0}


@pytest.mark.fast
def test_in_process_retries_transient_failures(dispatcher, monkeypatch):
    monkeypatch.setattr("gateway.tasks.dispatch.retry_delay", lambda attempt: 0.05)
    dispatcher.submit("tests.flaky", key="k", fail_times=2)
    deadline = time.monotonic() + 10
    while ("flaky", {"key": "k"}) not in CALLS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert FAILURES["k"] == 3
    assert CALLS == [("flaky", {"key": "k"})]


@pytest.mark.fast
def test_in_process_gives_up_after_max_retries_and_never_retries_bugs(dispatcher, monkeypatch):
    monkeypatch.setattr("gateway.tasks.dispatch.retry_delay", lambda attempt: 0.01)
    dispatcher.submit("tests.flaky", key="never", fail_times=100)
    dispatcher.submit("tests.broken")
    time.sleep(0.5)
    assert dispatcher.drain(10)
    assert FAILURES["never"] == 4  # first attempt + max_retries (3)
    assert CALLS == []


@pytest.mark.fast
def test_unknown_task_name_is_refused_at_submit(dispatcher):
    with pytest.raises(KeyError, match="no task named"):
        dispatcher.submit("tests.nope")


@pytest.mark.fast
def test_registry_knows_the_shipped_tasks_and_backs_off():
    assert get_task("studybridge.prepare_series").func.__name__ == "prepare_series"
    assert get_task("studybridge.sweep").func.__name__ == "sweep"
    assert [retry_delay(n) for n in (1, 2, 3, 7, 20)] == [1, 2, 4, 60, 60]
