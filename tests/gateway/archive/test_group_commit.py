"""Database.write_grouped: concurrent writers of one process share a commit, not errors."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.exc import IntegrityError

from gateway.archive import Archive
from gateway.archive.db import Prerequisite
from gateway.archive.models import IngestEvent

pytestmark = pytest.mark.production
EVENTS = IngestEvent.__table__


def _write(ident: int, kind: str) -> Any:
    def work(conn: Any) -> int:
        conn.execute(insert(EVENTS), {"id": ident, "kind": kind})
        return ident

    return work


@pytest.mark.fast
def test_writes_queued_during_a_transaction_share_its_commit_and_keep_their_own_errors(
    archive: Archive,
) -> None:
    db = archive.db
    db.write_grouped(_write(1, "seed"))
    commits: list[int] = []
    event.listen(db.engine, "commit", lambda _conn: commits.append(1))
    started, release = threading.Event(), threading.Event()

    def first(conn: Any) -> int:
        started.set()
        release.wait(10)
        return _write(2, "first")(conn)

    results: dict[str, Any] = {}

    def call(name: str, work: Any) -> None:
        try:
            results[name] = db.write_grouped(work)
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=call, args=("first", first))]
    threads[0].start()
    assert started.wait(10)
    queued = {f"w{i}": _write(i, "queued") for i in range(3, 7)}
    queued["dup"] = _write(1, "duplicate key")  # fails alone, in its savepoint
    for name, work in queued.items():
        threads.append(threading.Thread(target=call, args=(name, work)))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while len(db._group._queue) < len(queued) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(10)

    assert results["first"] == 2
    assert [results[f"w{i}"] for i in range(3, 7)] == [3, 4, 5, 6]
    assert isinstance(results["dup"], IntegrityError)
    # Those queued while the first ran joined its transaction: one commit for all six.
    assert len(commits) == 1
    with db.read_conn() as conn:
        rows = conn.execute(select(EVENTS.c.id, EVENTS.c.kind).order_by(EVENTS.c.id)).all()
    assert [tuple(r) for r in rows] == [
        (1, "seed"),
        (2, "first"),
        *[(i, "queued") for i in range(3, 7)],
    ]


@pytest.mark.fast
def test_a_failed_write_alone_raises_and_leaves_nothing(archive: Archive) -> None:
    def failing(conn: Any) -> None:
        _write(10, "undone")(conn)
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        archive.db.write_grouped(failing)
    with archive.db.read_conn() as conn:
        assert conn.execute(select(EVENTS.c.id)).all() == []
    assert archive.db.write_grouped(_write(11, "after")) == 11


@pytest.mark.fast
def test_writes_queued_behind_a_failing_write_are_committed_without_it(archive: Archive) -> None:
    db = archive.db
    started, release = threading.Event(), threading.Event()

    def failing(conn: Any) -> None:
        _write(20, "undone")(conn)
        started.set()
        release.wait(10)
        raise RuntimeError("refused")

    results: dict[str, Any] = {}

    def call(name: str, work: Any) -> None:
        try:
            results[name] = db.write_grouped(work)
        except Exception as exc:
            results[name] = exc

    first = threading.Thread(target=call, args=("failing", failing))
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=call, args=(f"w{i}", _write(i, "queued"))) for i in (21, 22)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while len(db._group._queue) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert isinstance(results["failing"], RuntimeError)
    assert (results["w21"], results["w22"]) == (21, 22)
    with db.read_conn() as conn:
        assert sorted(conn.execute(select(EVENTS.c.id)).scalars()) == [21, 22]


@pytest.mark.fast
def test_prerequisites_queued_together_are_settled_in_one_call_and_a_failure_fails_them_all(
    archive: Archive,
) -> None:
    db = archive.db
    started, release = threading.Event(), threading.Event()
    settled: list[list[int]] = []
    fail = {"on": False}

    def settle(items: list[int]) -> None:
        settled.append(sorted(items))
        if fail["on"]:
            raise RuntimeError("flush failed")

    firsts = iter([30, 37])

    def first(conn: Any) -> int:
        started.set()
        release.wait(10)
        return _write(next(firsts), "first")(conn)

    results: dict[str, Any] = {}

    def call(name: str, work: Any, before: Any = None) -> None:
        try:
            results[name] = db.write_grouped(work, before=before)
        except Exception as exc:
            results[name] = exc

    def queue_behind_a_running_write(idents: list[int]) -> list[threading.Thread]:
        started.clear()
        release.clear()
        threads = [threading.Thread(target=call, args=("first", first))]
        threads[0].start()
        assert started.wait(10)
        for i in idents:
            before = Prerequisite(settle, i)
            threads.append(threading.Thread(target=call, args=(f"w{i}", _write(i, "q"), before)))
            threads[-1].start()
        deadline = time.monotonic() + 10
        while len(db._group._queue) < len(idents) and time.monotonic() < deadline:
            time.sleep(0.01)
        return threads

    threads = queue_behind_a_running_write([31, 32, 33])
    release.set()
    for thread in threads:
        thread.join(10)
    # One round for the three, before their rows were written; all committed.
    assert settled == [[31, 32, 33]]
    assert [results[f"w{i}"] for i in (31, 32, 33)] == [31, 32, 33]

    db.write_grouped(_write(39, "reset"))  # a fresh transaction for the next round
    settled.clear()
    fail["on"] = True
    threads = queue_behind_a_running_write([34, 35, 36])
    release.set()
    for thread in threads:
        thread.join(10)
    assert settled == [[34, 35, 36]]
    # The flush failed: each write of that round fails with its error, none is written;
    # the write without a prerequisite in the same transaction commits.
    assert all(isinstance(results[f"w{i}"], RuntimeError) for i in (34, 35, 36))
    assert results["first"] == 37
    with db.read_conn() as conn:
        ids = sorted(conn.execute(select(EVENTS.c.id)).scalars())
    assert ids == [30, 31, 32, 33, 37, 39]
