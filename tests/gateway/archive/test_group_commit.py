"""Database.write_grouped: concurrent writers of one process share a commit, not errors."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.exc import IntegrityError

from gateway.archive import Archive
from gateway.archive.db import Database, Prerequisite, migrate
from gateway.archive.errors import IndexUnavailable
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
    # (Grouped writes on SQLite have an engine of their own: see test_grouped_commit_*.)
    event.listen(db._grouped_engine.engine, "commit", lambda _conn: commits.append(1))
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
def test_prerequisites_of_writes_arriving_during_a_transaction_are_settled_while_it_runs(
    archive: Archive,
) -> None:
    db = archive.db
    started, release = threading.Event(), threading.Event()
    settled: list[int] = []
    fail: set[int] = set()

    def settle(items: list[int]) -> None:
        settled.extend(items)
        if fail & set(items):
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

    def behind_a_running_write(idents: list[int]) -> list[threading.Thread]:
        started.clear()
        release.clear()
        settled.clear()
        threads = [threading.Thread(target=call, args=("first", first))]
        threads[0].start()
        assert started.wait(10)
        for i in idents:
            before = Prerequisite(settle, i)
            threads.append(threading.Thread(target=call, args=(f"w{i}", _write(i, "q"), before)))
            threads[-1].start()
        deadline = time.monotonic() + 10
        while len(settled) < len(idents) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Settled (each by its own thread) before the running transaction ended.
        assert sorted(settled) == idents
        assert not release.is_set()
        release.set()
        for thread in threads:
            thread.join(10)
        return threads

    behind_a_running_write([31, 32, 33])
    assert [results[f"w{i}"] for i in (31, 32, 33)] == [31, 32, 33]

    fail.add(35)
    behind_a_running_write([34, 35, 36])
    # The failed flush fails its own write, which is not written; the others commit.
    assert isinstance(results["w35"], RuntimeError)
    assert (results["w34"], results["w36"], results["first"]) == (34, 36, 37)
    with db.read_conn() as conn:
        ids = sorted(conn.execute(select(EVENTS.c.id)).scalars())
    assert ids == [30, 31, 32, 33, 34, 36, 37]


def _sqlite_db(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    migrate(url)
    return Database(url)


@pytest.mark.fast
def test_grouped_commits_on_sqlite_are_answered_after_the_log_is_fsynced_outside_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _sqlite_db(tmp_path)
    wal = tmp_path / "index.db-wal"
    fsynced: list[str] = []
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    seen: dict[str, Any] = {}
    real_durable = db.make_commits_durable

    def durable() -> None:
        # The write lock is free again (another process could write meanwhile) ...
        probe = os.open(tmp_path / "index.db.writelock", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe, fcntl.LOCK_UN)
            seen["lock free"] = True
        finally:
            os.close(probe)
        # ... the transaction is committed, but not yet fsynced by SQLite itself.
        with db.read_conn() as conn:
            seen["visible"] = conn.execute(select(EVENTS.c.id)).scalars().all()
        seen["fsynced before"] = list(fsynced)
        real_durable()

    monkeypatch.setattr(db, "make_commits_durable", durable)
    try:
        assert db.write_grouped(_write(1, "grouped")) == 1
        assert seen == {"lock free": True, "visible": [1], "fsynced before": []}
        assert fsynced == [str(wal)]
        # Grouped connections leave the fsync to the caller; every other writer's
        # commit is fsynced by SQLite (synchronous: 1 = NORMAL, 2 = FULL).
        with db.write_conn(grouped=True) as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        with db.write_conn() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        with db.writing() as session:
            assert session.execute(text("PRAGMA synchronous")).scalar() == 2
    finally:
        db.dispose()


@pytest.mark.fast
def test_a_failed_log_fsync_fails_the_grouped_writes_with_a_retryable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _sqlite_db(tmp_path)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("-wal"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    try:
        with pytest.raises(IndexUnavailable, match="Input/output error") as info:
            db.write_grouped(_write(1, "not durable"))
        assert info.value.retryable
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert db.write_grouped(_write(2, "durable")) == 2
    finally:
        db.dispose()


@pytest.mark.fast
def test_no_log_file_means_nothing_to_fsync(tmp_path: Path) -> None:
    db = _sqlite_db(tmp_path)
    try:
        assert not (tmp_path / "index.db-wal").exists()
        db.make_commits_durable()  # SQLite folded the log into the file and removed it
    finally:
        db.dispose()
