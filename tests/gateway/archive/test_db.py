"""Index engines: the PostgreSQL pool as configured; migrations of gateways starting at once."""

from __future__ import annotations

import os
import resource
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, inspect, text

from gateway.archive import Archive
from gateway.archive import db as db_module
from gateway.archive.db import migrate
from gateway.config import Settings
from tests.conftest import PG_ADMIN_URL
from tests.servers import missing

pytestmark = [pytest.mark.postgres]


def test_pool_follows_the_settings(pg_url: str, tmp_path, monkeypatch):
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=pg_url,
        db_pool_size=3,
        db_max_overflow=2,
        db_pool_timeout=7,
        db_pool_recycle=120,
        db_pool_ping_after=0,
    )
    archive = Archive.open(settings)
    try:
        pool = archive.db.engine.pool
        assert (pool.size(), pool._max_overflow, pool._timeout, pool._recycle) == (3, 2, 7, 120)
        pings = _count_pings(monkeypatch)
        with archive.db.read_conn() as conn:
            conn.execute(text("SELECT 2"))
        with archive.db.read_conn() as conn:
            conn.execute(text("SELECT 2"))
        # ping_after=0: every checkout but a new connection's is tested with a round trip.
        assert len(pings) == 1
        with archive.db.read_conn() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        archive.close()


def _count_pings(monkeypatch) -> list[int]:
    pings: list[int] = []
    real = db_module._ping

    def counted(dbapi_conn):
        pings.append(1)
        real(dbapi_conn)

    monkeypatch.setattr(db_module, "_ping", counted)
    return pings


def test_a_busy_connection_is_reused_without_a_round_trip(pg_url: str, tmp_path, monkeypatch):
    archive = Archive.open(Settings(data_dir=tmp_path / "var", database_url=pg_url))
    try:
        with archive.db.read_conn() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        pings = _count_pings(monkeypatch)
        for _ in range(3):
            with archive.db.read_conn() as conn:
                assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == first
        assert pings == []
    finally:
        archive.close()


def test_liveness_check_works_for_descriptors_above_1023(pg_url: str, tmp_path, monkeypatch):
    # A busy gateway holds many sockets and files: select() would refuse the pooled
    # connection's descriptor there, and every checkout would count as a dead
    # connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 2048, "needs 2048 descriptors"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    archive = Archive.open(Settings(data_dir=tmp_path / "var", database_url=pg_url))
    try:
        with archive.db.read_conn() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            assert conn.connection.dbapi_connection.fileno() > 1023
        pings = _count_pings(monkeypatch)
        with archive.db.read_conn() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == first
        assert pings == []
    finally:
        archive.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_reads_run_in_autocommit(pg_url: str, tmp_path):
    archive = Archive.open(Settings(data_dir=tmp_path / "var", database_url=pg_url))
    try:
        with archive.db.reading() as session:
            session.execute(text("SELECT 1"))
            # No transaction was opened for the read (no BEGIN/ROLLBACK round trips).
            status = session.connection().connection.dbapi_connection.info.transaction_status
            assert status.name == "IDLE"
        with archive.db.writing() as session:
            session.execute(text("SELECT 1"))
            status = session.connection().connection.dbapi_connection.info.transaction_status
            assert status.name == "INTRANS"
    finally:
        archive.close()


def test_pooled_connections_survive_a_server_side_disconnect(pg_url: str, tmp_path, monkeypatch):
    archive = Archive.open(Settings(data_dir=tmp_path / "var", database_url=pg_url))
    try:
        with archive.db.read_conn() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            # pg_terminate_backend only signals the backend; wait until it has gone
            # (it sends its FATAL message to the client before leaving
            # pg_stat_activity), or the checkout below may race its exit.
            deadline = time.monotonic() + 10
            gone = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            while conn.execute(gone, {"pid": pid}).scalar() and time.monotonic() < deadline:
                time.sleep(0.01)
        admin.dispose()
        # The pooled connection is dead (the server closed it, so its socket is
        # readable): the checkout replaces it instead of failing, at once (well
        # within ping_after).
        pings = _count_pings(monkeypatch)
        with archive.db.read_conn() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        assert len(pings) == 1
    finally:
        archive.close()


@pytest.mark.slow
def test_gateways_starting_together_migrate_once():
    name = f"sb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # the pg_url fixture decides skip/fail; here: same rule
        missing(f"PostgreSQL not reachable: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        start.wait()
        try:
            migrate(url)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        engine = create_engine(url)
        assert "instances" in inspect(engine).get_table_names()
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
