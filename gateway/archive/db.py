"""Index database: engine creation for SQLite and PostgreSQL, sessions, and migrations.

SQLite (the embedded default) runs in WAL mode so several receiving processes and
readers share it; commits are fsynced because a success answer promises durability:
by SQLite itself (``synchronous=FULL``), except for the grouped writes of ingest,
which fsync the write-ahead log themselves once the write lock is released (see
``_GroupCommit``). Writers open with ``BEGIN IMMEDIATE`` so two processes never
deadlock upgrading a read transaction. PostgreSQL uses a connection pool per
process (``PoolSettings``: size, overflow, wait, recycle, liveness check), so several
gateway processes share one server; reads run in autocommit (at PostgreSQL's READ
COMMITTED each statement takes its own snapshot anyway, and BEGIN and ROLLBACK
cost a round trip each); migrations take an advisory lock so gateways
starting together migrate once.
Schema changes are Alembic migrations, run by ``migrate`` (once, by the parent
process of ``serve``, or by ``studybridge db upgrade``).
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as exc_module
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gateway.archive.errors import IndexUnavailable

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock key serialising migrations ("sbridge" in ASCII).
_MIGRATION_LOCK = 0x736272696467


@dataclass(frozen=True)
class PoolSettings:
    """PostgreSQL connection pool of one process (``Settings.db_pool_*``)."""

    # Connections kept open, and how many more may open under load.
    size: int = 5
    max_overflow: int = 10
    # Seconds a caller waits for a free connection before the index counts as busy.
    timeout: float = 30.0
    # Seconds after which a connection is replaced (servers and proxies drop idle ones).
    recycle: float = 1800.0
    # Seconds to wait for a TCP connection to the server: a server that is away must
    # give a sender a retryable failure soon, not after the kernel's minutes.
    connect_timeout: int = 10
    # Seconds a pooled connection may sit unused before its next checkout tests it
    # with a round trip; a busier one is tested only if the server has written to it
    # (see ``_check_liveness``).
    ping_after: float = 5.0


def make_engine(
    url: str, *, pool: PoolSettings | None = None, sqlite_synchronous: str = "FULL"
) -> Engine:
    """An engine for ``url``. ``sqlite_synchronous``: SQLite's ``synchronous`` setting of
    its connections (``NORMAL`` only where the caller fsyncs the log itself)."""
    pool = pool or PoolSettings()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine, sqlite_synchronous)
        return engine
    kwargs: dict[str, Any] = {
        "pool_size": pool.size,
        "max_overflow": pool.max_overflow,
        "pool_timeout": pool.timeout,
        "pool_recycle": pool.recycle,
    }
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {
            "connect_timeout": pool.connect_timeout,
            # JIT compiling a plan costs tens of milliseconds, and the planner picks it
            # by estimated cost, which after a bulk load (before VACUUM) can pass the
            # threshold for small indexed queries: a 0.1 ms QIDO query took 50-170 ms.
            "options": "-c jit=off",
        }
    engine = create_engine(url, **kwargs)
    _check_liveness(engine, pool.ping_after)
    return engine


def _check_liveness(engine: Engine, ping_after: float) -> None:
    """Replace a dead pooled connection at checkout instead of failing a request.

    SQLAlchemy's pre-ping costs a round trip on every checkout (two or three per
    DICOMweb request). A server that ends a session (restart, shutdown,
    ``pg_terminate_backend``) writes an error to it and closes it, which makes the
    idle socket readable: a zero-timeout poll sees that without a round trip. Only a
    readable socket, or one unused for ``ping_after`` seconds (a peer or a network
    that dropped it silently), is pinged; a failed ping makes the pool connect anew.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("checked_in")
        if since is None:
            return  # just connected
        # poll, not select: select refuses descriptors above 1023, which a busy
        # gateway's connections reach. A hang-up or error counts as readable too.
        poller = select.poll()
        try:
            poller.register(dbapi_conn.fileno(), select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError) as exc:
            raise exc_module.DisconnectionError(str(exc)) from exc
        if not readable and time.monotonic() - since < ping_after:
            return
        try:
            _ping(dbapi_conn)
        except Exception as exc:
            raise exc_module.DisconnectionError(f"pooled connection is dead: {exc}") from exc


def _ping(dbapi_conn: Any) -> None:
    with dbapi_conn.cursor() as cur:
        cur.execute("SELECT 1")
    dbapi_conn.rollback()


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    assert synchronous in ("FULL", "NORMAL")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so we can say BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        # DICOM matching is case-sensitive except where we fold explicitly; this
        # also lets LIKE 'prefix%' use an index.
        cur.execute("PRAGMA case_sensitive_like=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("sqlite_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


class _WriterLock:
    """Serialises SQLite writers of all processes, handing over without delay.

    SQLite lets one writer in at a time and makes the others retry with sleeps that
    grow to tens of milliseconds, so under concurrent ingest most time is spent
    asleep. An exclusive ``flock`` (and a thread lock, since flock is per open file)
    queues writers instead and wakes the next one as soon as the lock is released.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


T = TypeVar("T")


@dataclass(frozen=True)
class Prerequisite:
    """What a grouped write's rows depend on and must be durable before the transaction
    holding them commits (an instance's blob, placed but not yet flushed).

    ``settle`` makes items durable; it is called ONCE with the items of all the writes
    of a transaction that share it (one round of flushes for the batch instead of one
    per write), before their work runs. Should it raise, every one of those writes
    fails with its error and none of them runs: nothing is written that points at
    something not durable.
    """

    settle: Callable[[list[Any]], None]
    item: Any


class _Write:
    """One caller's part of a grouped write transaction."""

    __slots__ = ("before", "done", "error", "ran", "result", "work")

    def __init__(
        self, work: Callable[[Connection], Any], before: Prerequisite | None = None
    ) -> None:
        self.work = work
        self.before = before
        self.ran = False  # run in a transaction that committed, not yet answered
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class _GroupCommit:
    """Writes of concurrent threads committed together: one transaction, one flush.

    A thread that finds no transaction running opens one. It first settles the
    prerequisites of every write queued by then (its own included: their blobs are
    flushed in one pass), before it asks for the write lock (SQLite writers of all
    processes queue for it, and are not held up by those flushes); once it holds the
    lock it runs those writes, then settles and runs those queued meanwhile (in one
    more pass), and commits. A thread arriving while a transaction runs settles its
    write's prerequisite at once, in its own thread (the flushes overlap the running
    transaction instead of following it), then queues the write for the next
    transaction. The first write of a transaction runs as it is; the others each in a
    savepoint, so one write's error (a duplicate key) undoes that write alone. A
    write whose prerequisite could not be settled fails without running, as does
    every other write settled in the same pass.

    Every write is answered only once the transaction holding it is durable (or
    failed). On SQLite the commit does not fsync the log (``synchronous=NORMAL``):
    the leader fsyncs it after releasing the write lock, so the next transaction, of
    this process or another, runs while the log goes to disk, and one fsync covers
    every transaction committed before it (``Database.make_commits_durable``).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cond = threading.Condition()
        self._queue: list[_Write] = []
        self._busy = False

    def run(self, work: Callable[[Connection], T], before: Prerequisite | None = None) -> T:
        mine = _Write(work, before)
        if before is not None and self._busy:
            # Its leader would settle this prerequisite only after the running
            # transaction ends: settle it now, while it runs (a failure fails this
            # write alone, before it is queued).
            before.settle([before.item])
            mine.before = None
        with self._cond:
            self._queue.append(mine)
        while True:
            with self._cond:
                # A write that ran waits for its transaction's log flush, whoever leads.
                while not mine.done and (self._busy or mine.ran):
                    self._cond.wait()
                if mine.done:
                    break
                self._busy = True
            ran: list[_Write] = []
            try:
                ran = self._commit(mine)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            self._make_durable(ran)
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[no-any-return]

    def _make_durable(self, ran: list[_Write]) -> None:
        """Answer the writes of a committed transaction once it is durable."""
        if not ran:
            return
        try:
            if any(w.error is None for w in ran):
                self.db.make_commits_durable()
        except Exception as exc:
            for write in ran:
                if write.error is None:
                    write.error = exc
                    write.result = None
        finally:
            with self._cond:
                for write in ran:
                    write.done = True
                self._cond.notify_all()

    def _take(self) -> list[_Write]:
        with self._cond:
            batch, self._queue = self._queue, []
        return batch

    def _settled(self, batch: list[_Write]) -> list[_Write]:
        """The writes of ``batch`` whose prerequisites are now durable: one ``settle``
        call for all those sharing it. The others are answered with its error."""
        groups: dict[Callable[[list[Any]], None], list[_Write]] = {}
        for write in batch:
            if write.before is not None:
                groups.setdefault(write.before.settle, []).append(write)
        failed: list[_Write] = []
        for settle, writes in groups.items():
            try:
                settle([w.before.item for w in writes if w.before is not None])
            except Exception as exc:
                for write in writes:
                    write.error = exc
                failed += writes
        if not failed:
            return batch
        with self._cond:
            for write in failed:
                write.done = True
            self._cond.notify_all()
        return [w for w in batch if not w.done]

    def _commit(self, mine: _Write) -> list[_Write]:
        """Run and commit the queued writes: those that ran in the committed transaction
        (answered by ``_make_durable``). Writes of a failed transaction are answered
        here, with its error."""
        ran: list[_Write] = []
        batch: list[_Write] = self._take()
        committed = False
        try:
            batch = self._settled(batch)
            if not batch:
                return []
            with self.db.write_conn(grouped=True) as conn:
                while batch:
                    while batch:
                        write = batch.pop(0)
                        ran.append(write)
                        if len(ran) == 1 and not batch:
                            # Alone so far: no savepoint needed (its error undoes nothing
                            # else, and no other write has run).
                            write.result = write.work(conn)
                            continue
                        savepoint = conn.begin_nested()
                        try:
                            write.result = write.work(conn)
                        except Exception as exc:
                            savepoint.rollback()
                            write.error = exc
                        else:
                            savepoint.commit()
                    # Writes queued meanwhile join this transaction.
                    batch = self._settled(self._take())
            committed = True
            with self._cond:
                for write in ran:
                    write.ran = True
            return ran
        except BaseException as exc:
            # The transaction failed: none of the writes it ran holds; those it had not
            # run yet go back to the queue for the next transaction. If it failed before
            # running any (no connection, no lock), the leader's own write fails.
            with self._cond:
                if not ran and mine in batch:
                    batch.remove(mine)
                    ran.append(mine)
                self._queue[:0] = batch
            for write in ran:
                if write.error is None:
                    write.error = exc
                    write.result = None
            if not isinstance(exc, Exception):
                raise
            return []
        finally:
            if not committed:
                with self._cond:
                    for write in ran:
                        write.done = True
                    self._cond.notify_all()


class Database:
    """An engine plus session factories for reading and for writing."""

    def __init__(self, url: str, *, pool: PoolSettings | None = None) -> None:
        self.url = url
        self.engine = make_engine(url, pool=pool)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        database = make_url(url).database
        self._writer_lock = (
            _WriterLock(Path(database + ".writelock"))
            if self.is_sqlite and database and database != ":memory:"
            else None
        )
        # Reads on PostgreSQL in autocommit: no BEGIN and ROLLBACK round trips.
        self._read_engine = (
            self.engine
            if self.is_sqlite
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._read = sessionmaker(self._read_engine, expire_on_commit=False)
        self._stream = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(sqlite_write=True)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        # Grouped writes on a SQLite file: connections whose commits leave the fsync of
        # the write-ahead log to ``make_commits_durable``, called outside the write lock.
        self._wal: Path | None = None
        self._grouped_engine = self._write_engine
        if self._writer_lock is not None:
            self._wal = Path(database + "-wal")
            self._grouped_engine = make_engine(
                url, pool=pool, sqlite_synchronous="NORMAL"
            ).execution_options(sqlite_write=True)
        self._group = _GroupCommit(self)

    @contextmanager
    def reading(self, *, stream: bool = False) -> Iterator[Session]:
        """A session for reads. ``stream``: inside a transaction, which PostgreSQL's
        server-side cursors (``yield_per``) need; other reads run in autocommit."""
        with (self._stream if stream else self._read)() as session:
            yield session

    @contextmanager
    def _writer(self) -> Iterator[None]:
        if self._writer_lock is None:
            yield
        else:
            with self._writer_lock.hold():
                yield

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on error."""
        with self._writer(), self._write() as session, session.begin():
            yield session

    @contextmanager
    def read_conn(self) -> Iterator[Connection]:
        """A plain (Core) connection for short reads on hot paths."""
        with self._read_engine.connect() as conn:
            yield conn

    @contextmanager
    def write_conn(self, *, grouped: bool = False) -> Iterator[Connection]:
        """A Core connection in a write transaction, committed (durably) on success.
        ``grouped`` (``_GroupCommit`` only): on SQLite the commit is durable only once
        ``make_commits_durable`` has returned."""
        engine = self._grouped_engine if grouped else self._write_engine
        with self._writer(), engine.begin() as conn:
            yield conn

    def make_commits_durable(self) -> None:
        """Make every transaction committed so far through ``write_conn(grouped=True)``
        durable: on a SQLite file, fsync its write-ahead log (which holds them in
        order, so one fsync covers all committed before it); nothing elsewhere.

        Called after the write lock is released. No log file means none is needed:
        SQLite removes it only after copying it into the database and syncing that
        (a checkpoint), as it syncs the log before each checkpoint and when it starts
        reusing it, so committed transactions are never only in an unsynced log that
        is gone. Raises IndexUnavailable if the fsync fails.
        """
        if self._wal is None:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise IndexUnavailable(f"index log not durable: {exc.strerror}") from exc

    def analyze(self) -> bool:
        """Refresh PostgreSQL's planner statistics and visibility map of the index
        (False: SQLite, nothing done).

        The query engine relies on them: without statistics PostgreSQL guesses that a
        modality matches 0.5% of series and a date range 0.5% of studies, and picks
        plans ten times slower (see gateway/archive/query.py); and until rows of a bulk
        load are vacuumed, every index-only probe (the access scope's study_sources,
        a study's modalities) visits the table too, and the first readers of each row
        write its hint bits. Autovacuum does both on its own schedule, competing with
        the first queries; after a bulk import or a restore, do it at once. VACUUM runs
        outside a transaction block (it must), as ANALYZE should: run inside one that
        is then rolled back, its statistics would be discarded.
        """
        if self.is_sqlite:
            return False
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")
        return True

    def write_grouped(
        self, work: Callable[[Connection], T], *, before: Prerequisite | None = None
    ) -> T:
        """Run ``work(conn)`` in a write transaction shared with the concurrent callers
        of this method in this process (committed once for all of them: one flush
        instead of one each); returns once that transaction committed. ``before``:
        made durable (settled together with those of the other writes) before
        ``work`` runs. Raises what settling or ``work`` raised (its own writes undone)
        or what the commit raised."""
        return self._group.run(work, before)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._grouped_engine.engine is not self.engine:
            self._grouped_engine.engine.dispose()
        if self._writer_lock is not None:
            self._writer_lock.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (default: the newest)."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Gateways starting together must not run the same migration twice at
                # once: the first holds this lock until its transaction commits, the
                # others then find the schema current.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
