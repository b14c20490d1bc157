"""Shared fixtures: settings and archives on SQLite and on PostgreSQL.

The archive fixture runs each test on both index backends. PostgreSQL is the one at
127.0.0.1:5432 (trust auth); each test session creates its own database and drops
it afterwards. Without CI=true a missing PostgreSQL skips those cases; in CI it fails.

Modules marked ``production`` also run on the production combination: PostgreSQL
and an S3 blob store (a SeaweedFS server started once per session, one key prefix
per test). Only some modules take it, to keep the suite's time in bounds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.archive import Archive
from gateway.archive.db import migrate
from gateway.config import Settings
from tests.s3server import SeaweedFS, seaweedfs

PG_ADMIN_URL = os.environ.get(
    "STUDYBRIDGE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session, migrated to head."""
    if not _pg_available():
        if IN_CI:
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI but not reachable")
        pytest.skip("PostgreSQL at 127.0.0.1:5432 not reachable")
    name = f"sb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    yield url
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def truncate_pg(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version'"
                )
            )
        ]
        if tables:
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    engine.dispose()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    chosen = any(
        "backend" in str(mark.args[0]) for mark in metafunc.definition.iter_markers("parametrize")
    )
    if "backend" in metafunc.fixturenames and not chosen:
        # Marks given here (not at setup) are what `-m` selects on: `-m "fast and not
        # postgres"` is the quickest subset, with no server at all.
        backends = [
            pytest.param("sqlite"),
            pytest.param("postgres", marks=pytest.mark.postgres),
        ]
        marks = metafunc.definition
        if marks.get_closest_marker("production") and not marks.get_closest_marker("file_store"):
            backends.append(pytest.param("production", marks=pytest.mark.postgres))
        metafunc.parametrize("backend", backends)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the test session."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    """Settings on a temporary data folder with the parametrized index backend."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
        truncate_pg(url)
        request.node.add_marker(pytest.mark.postgres)
        return Settings(data_dir=tmp_path / "var", database_url=url)
    if backend == "production":
        url = request.getfixturevalue("pg_url")
        truncate_pg(url)
        s3: SeaweedFS = request.getfixturevalue("s3_server")
        request.node.add_marker(pytest.mark.postgres)
        return Settings(
            data_dir=tmp_path / "var",
            database_url=url,
            **s3.settings(prefix=f"t-{uuid.uuid4().hex[:12]}"),  # type: ignore[arg-type]
        )
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    arch = Archive.open(settings, migrate_schema=True)
    yield arch
    arch.close()
