"""``studybridge doctor``: check every configured backend and say what is wrong.

Each check gives a status (ok, warning, failure) and one sentence in plain words.
Nothing is changed: the schema is compared with the newest migration, not migrated;
the blob store gets a small probe written and removed. Secrets never appear (URLs
are shown without passwords).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from gateway.archive.db import Database, alembic_config
from gateway.config import Settings


class Status(Enum):
    OK = "ok"
    WARNING = "warning"
    FAILURE = "FAIL"


@dataclass
class Finding:
    check: str
    status: Status
    detail: str


def redact_url(url: str) -> str:
    """A database or broker URL fit to print: the password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.rsplit("@", 1)[-1]


def check_index(settings: Settings) -> list[Finding]:
    url = settings.resolved_database_url
    shown = redact_url(url)
    db = Database(url)
    try:
        with db.read_conn() as conn:
            conn.execute(text("SELECT 1"))
            current = MigrationContext.configure(conn).get_current_revision()
            statistics = None if db.is_sqlite else _statistics(conn)
    except Exception as exc:
        return [Finding("index", Status.FAILURE, f"cannot reach {shown}: {_why(exc)}")]
    finally:
        db.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    found = [Finding("index", Status.OK, f"{shown} answers")]
    if current is None:
        found.append(
            Finding("schema", Status.FAILURE, "no schema yet: run `studybridge db upgrade`")
        )
    elif current != head:
        found.append(
            Finding(
                "schema",
                Status.FAILURE,
                f"schema is at revision {current}, this version needs {head}: "
                "run `studybridge db upgrade`",
            )
        )
    else:
        found.append(Finding("schema", Status.OK, f"at the newest revision ({head})"))
    if statistics is not None:
        found.append(statistics)
    return found


def _statistics(conn: Connection) -> Finding:
    """PostgreSQL plans the index's queries well only with fresh planner statistics."""
    autovacuum = conn.execute(text("SHOW autovacuum")).scalar_one()
    never = (
        conn.execute(
            text(
                "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' "
                "AND c.relnamespace = current_schema()::regnamespace AND c.relname IN "
                "('patients', 'studies', 'series', 'instances') AND pg_relation_size(c.oid) > 0 "
                "AND NOT EXISTS (SELECT 1 FROM pg_stats s WHERE s.schemaname = current_schema() "
                "AND s.tablename = c.relname) ORDER BY c.relname"
            )
        )
        .scalars()
        .all()
    )
    if never:
        return Finding(
            "statistics",
            Status.WARNING,
            f"no planner statistics for {', '.join(never)}: queries may run ten times "
            "slower; run `studybridge db analyze` (and keep autovacuum on)",
        )
    if autovacuum != "on":
        return Finding(
            "statistics",
            Status.WARNING,
            "autovacuum is off: run `studybridge db analyze` after bulk loads, or turn it on",
        )
    return Finding("statistics", Status.OK, "planner statistics present; autovacuum on")


def check_blob_store(settings: Settings) -> list[Finding]:
    from gateway.archive import make_blob_store
    from gateway.archive.errors import ArchiveError

    where = (
        f"S3 bucket {settings.s3_bucket!r} at {settings.s3_endpoint}"
        if settings.blob_store == "s3"
        else f"folder {settings.resolved_blob_dir}"
    )
    try:
        make_blob_store(settings).check()
    except (ArchiveError, ValueError) as exc:
        return [Finding("blob store", Status.FAILURE, f"{where}: {exc}")]
    found = [Finding("blob store", Status.OK, f"{where} takes writes")]
    if settings.blob_store == "s3" and not settings.s3_secure:
        found.append(
            Finding(
                "blob store",
                Status.WARNING,
                "S3 is reached without TLS (s3_secure = false): only on a private network",
            )
        )
    return found


def check_staging(settings: Settings) -> list[Finding]:
    folder = settings.staging_dir
    probe = folder / ".doctor-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [Finding("staging", Status.FAILURE, f"{folder} is not writable: {exc.strerror}")]
    return [Finding("staging", Status.OK, f"{folder} is writable")]


def check_broker(settings: Settings) -> list[Finding]:
    if not settings.task_broker_url:
        return [Finding("tasks", Status.OK, "no broker: tasks run inside the serving processes")]
    shown = redact_url(settings.task_broker_url)
    try:
        from gateway.tasks.celery_app import make_celery, queue_depth

        depth = queue_depth(make_celery(settings), settings.task_queue)
    except Exception as exc:
        return [Finding("tasks", Status.FAILURE, f"broker {shown} unreachable: {_why(exc)}")]
    return [Finding("tasks", Status.OK, f"broker {shown} answers; {depth} tasks waiting")]


def check_ports(settings: Settings) -> list[Finding]:
    from gateway.serve import check_port_free

    found = []
    for what, host, port in (
        ("DIMSE port", settings.dimse_host, settings.dimse_port),
        ("HTTP port", settings.http_host, settings.http_port),
    ):
        try:
            check_port_free(host, port, what)
        except SystemExit as exc:
            found.append(
                Finding(
                    what,
                    Status.WARNING,
                    f"{exc}: fine if studybridge is running, otherwise another program holds it",
                )
            )
            continue
        found.append(Finding(what, Status.OK, f"{host}:{port} is free to listen on"))
    return found


def check_profile(settings: Settings) -> list[Finding]:
    if settings.profile != "production":
        return []
    found = []
    if settings.resolved_database_url.startswith("sqlite"):
        found.append(
            Finding("profile", Status.WARNING, "production profile on SQLite: use PostgreSQL")
        )
    if settings.blob_store == "file":
        found.append(
            Finding(
                "profile",
                Status.WARNING,
                "production profile on a local folder: only one gateway can use it",
            )
        )
    return found


CHECKS: list[Callable[[Settings], list[Finding]]] = [
    check_index,
    check_blob_store,
    check_staging,
    check_broker,
    check_ports,
    check_profile,
]


def diagnose(settings: Settings) -> list[Finding]:
    found: list[Finding] = []
    for check in CHECKS:
        try:
            found.extend(check(settings))
        except Exception as exc:  # a check itself must not hide the others
            found.append(Finding(check.__name__, Status.FAILURE, _why(exc)))
    return found


def _why(exc: BaseException) -> str:
    text_ = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text_[:300]}" if text_ else exc.__class__.__name__
