"""Shared fixtures: settings and archives on SQLite, PostgreSQL and the production combination.

The ``backend`` parameter runs each test that uses ``settings`` or ``archive`` on
two backends:

- ``sqlite``: the embedded default, SQLite and the filesystem blob store;
- ``postgres``: PostgreSQL with the filesystem blob store, for modules not marked
  ``production`` (and for ``file_store`` tests, which look at the store's files);
- ``production``, for modules marked ``production``: PostgreSQL and an S3 blob store
  (a SeaweedFS server started once per session, one key prefix per test). Such a
  module skips the plain ``postgres`` variant: production runs the same PostgreSQL
  index code, and the sqlite variant covers the filesystem store.

PostgreSQL is the one at 127.0.0.1:5432 (trust auth); each test session creates its
own database and drops it afterwards. A missing PostgreSQL, SeaweedFS or Redis skips
those cases locally and fails them in CI (``tests.servers.missing``). Both server
variants carry the ``postgres`` mark, so ``-m "fast and not postgres"`` needs no server.

Tasks: an ``archive`` fixture is an Archive in the test process without a
``task_broker_url``: what it submits (``archive.tasks``) runs on its in-process
dispatcher, which is what production code does without a broker, and it has no
post-ingest hook (series metadata and thumbnails are then built on demand, as for any
reader). No Celery is faked for it, on any backend.
Where a test runs real ``studybridge serve`` processes, ``serve_stack`` (or
``open_stack`` for a module's gateway) gives their settings: embedded (SQLite, files,
tasks in process) or production (PostgreSQL, SeaweedFS S3, Celery over the Redis at
127.0.0.1:6379 with a running ``studybridge worker`` taking the tasks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, text

from gateway.archive import Archive
from gateway.archive.db import migrate
from gateway.config import Settings
from tests.s3server import SeaweedFS, seaweedfs
from tests.servers import Worker, missing, production_env, running_worker

PG_ADMIN_URL = os.environ.get(
    "STUDYBRIDGE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


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
        missing("PostgreSQL at 127.0.0.1:5432 is not reachable")
    name = f"sb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    yield url
    engine = _reset_engines.pop(url, None)
    if engine is not None:
        engine.dispose()
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


# Tables holding more rows than this are truncated, the others emptied by DELETE.
_DELETE_UP_TO = 1000
_reset_engines: dict[str, Engine] = {}


def truncate_pg(url: str) -> None:
    """Empty every table of the test database (not alembic_version) and restart its
    identities, as before each test that uses it.

    TRUNCATE makes new files for each table and index (about 0.7 s for the whole
    schema, paid by each of some 800 tests), so the few rows a test leaves go by
    DELETE, with foreign keys not enforced for the moment (superuser's
    session_replication_role), in one transaction. A table with more rows than
    ``_DELETE_UP_TO`` is truncated still, so a bulk load leaves no dead pages that
    the next test's query plans would count.
    """
    engine = _reset_engines.get(url)
    if engine is None:
        engine = _reset_engines[url] = create_engine(url)
    with engine.begin() as conn:
        tables = list(
            conn.scalars(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version' ORDER BY tablename"
                )
            )
        )
        if not tables:
            return
        counted = " UNION ALL ".join(
            f"SELECT '{t}', (SELECT count(*) FROM (SELECT 1 FROM \"{t}\" "
            f"LIMIT {_DELETE_UP_TO + 1}) AS x)"
            for t in tables
        )
        rows = {t: n for t, n in conn.execute(text(counted))}
        large = [t for t in tables if rows[t] > _DELETE_UP_TO]
        small = [t for t in tables if 0 < rows[t] <= _DELETE_UP_TO]
        if large:
            conn.execute(text(f"TRUNCATE {', '.join(large)} CASCADE"))
        if small:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            for table in small:
                conn.execute(text(f'DELETE FROM "{table}"'))
        # As TRUNCATE ... RESTART IDENTITY: ids start again at 1.
        conn.execute(
            text(
                "SELECT setval(format('%I.%I', schemaname, sequencename)::regclass, "
                "start_value, false) FROM pg_sequences WHERE schemaname = 'public'"
            )
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    chosen = any(
        "backend" in str(mark.args[0]) for mark in metafunc.definition.iter_markers("parametrize")
    )
    if "backend" in metafunc.fixturenames and not chosen:
        # Marks given here (not at setup) are what `-m` selects on: `-m "fast and not
        # postgres"` is the quickest subset, with no server at all.
        node = metafunc.definition
        if node.get_closest_marker("production") and not node.get_closest_marker("file_store"):
            server = pytest.param("production", marks=pytest.mark.postgres)
        else:
            server = pytest.param("postgres", marks=pytest.mark.postgres)
        metafunc.parametrize("backend", [pytest.param("sqlite"), server])


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


def backend_env(settings: Settings) -> dict[str, str]:
    """The index and blob store of ``settings`` as STUDYBRIDGE_* variables: a CLI call
    or a process given them works on the same backend as the test's archive."""
    env = {}
    for name, value in settings.model_dump(exclude_defaults=True).items():
        if name in ("database_url", "blob_store") or name.startswith("s3_"):
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            text_value = str(value).lower() if isinstance(value, bool) else str(value)
            env[f"STUDYBRIDGE_{name.upper()}"] = text_value
    return env


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite index migrated to head once per session (each test's copy of it is
    what migrating a fresh file gives, without the 0.3-0.5 s of running every
    migration again for each of some 800 tests)."""
    folder = tmp_path_factory.mktemp("sqlite-template")
    url = Settings(data_dir=folder).resolved_database_url
    migrate(url)
    path = Path(url.removeprefix("sqlite:///"))
    # Closed: SQLite folded its write-ahead log into the file and removed it.
    assert path.is_file() and not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture
def archive(settings: Settings, request: pytest.FixtureRequest) -> Iterator[Archive]:
    if not settings.database_url:  # SQLite in data_dir: start from the migrated copy
        template: Path = request.getfixturevalue("sqlite_template")
        index = Path(settings.resolved_database_url.removeprefix("sqlite:///"))
        if not index.exists():
            index.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, index)
    arch = Archive.open(settings, migrate_schema=True)  # a no-op check on the copy
    yield arch
    arch.close()


# -- real `studybridge serve` processes --------------------------------------------------

# The two stacks a test of running gateways is run on (``serve_stack``'s parameters,
# also for module-scoped fixtures built with ``open_stack``).
STACKS = ["embedded", pytest.param("production", marks=pytest.mark.postgres)]
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeStack:
    """What the ``studybridge serve`` processes and CLI calls of a test run on."""

    kind: str  # "embedded" or "production"
    env: dict[str, str]  # STUDYBRIDGE_* variables: pass to running_gateway
    worker: Worker | None = None  # production: the `studybridge worker` taking the tasks

    def settings(self, data_dir: Path) -> Settings:
        """What a process of this stack with ``data_dir`` reads (for checks in the test)."""
        fields = {
            k.removeprefix("STUDYBRIDGE_").lower(): v
            for k, v in self.env.items()
            if k.startswith("STUDYBRIDGE_")
        }
        return Settings(data_dir=data_dir, **fields)  # type: ignore[arg-type]

    def wait_for_task(self, name: str, at_least: int = 1) -> None:
        """Production: until the worker has run task ``name`` ``at_least`` times
        (it takes them from Redis after the gateway queued them); embedded: nothing."""
        if self.worker is not None:
            self.worker.wait_succeeded(name, at_least)


@contextlib.contextmanager
def open_stack(
    kind: str, tmp: Path, request: pytest.FixtureRequest, env: dict[str, str] | None = None
) -> Iterator[ServeStack]:
    """The settings of ``kind`` for gateways of one test or module, plus ``env``.

    Production: this session's PostgreSQL database (emptied first: one stack at a time
    uses it), a key prefix of its own on the session's SeaweedFS, a Celery queue of its
    own on Redis, and a ``studybridge worker`` running until the end. At the end no
    task may have failed in the worker.
    """
    env = dict(env or {})
    if kind == "embedded":
        yield ServeStack(kind, env)
        return
    pg_url = request.getfixturevalue("pg_url")
    truncate_pg(pg_url)
    s3: SeaweedFS = request.getfixturevalue("s3_server")
    env.update(production_env(pg_url, s3.env(prefix=f"stack-{uuid.uuid4().hex[:10]}")))
    worker_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}
    worker_env.pop("STUDYBRIDGE_CONFIG", None)
    tmp.mkdir(parents=True, exist_ok=True)
    with running_worker(tmp / "worker" / "var", worker_env, tmp / "worker.log") as worker:
        yield ServeStack(kind, env, worker)
        assert worker.failures() == [], worker.log()[-3000:]


@pytest.fixture(params=STACKS)
def serve_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServeStack]:
    """The stack for the running gateways of one test: embedded, then production."""
    with open_stack(request.param, tmp_path / "stack", request) as stack:
        yield stack
