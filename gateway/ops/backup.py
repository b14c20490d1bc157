"""Backups of the index: a consistent copy while the gateway keeps running.

- SQLite: the online backup API (``sqlite3.Connection.backup``) copies the database
  page by page under its own locks, so receivers may keep writing meanwhile.
- PostgreSQL: ``pg_dump --format=custom`` (one consistent snapshot); restore with
  ``pg_restore --clean --if-exists``. The password goes to the tools through the
  environment (PGPASSWORD), never on a command line other users could see.

The index names blobs; it does not hold them. A restore brings back the index as it
was: instances received after the backup keep their blobs but lose their rows
(``studybridge scrub`` lists them as orphans), so back up the index at least as
often as you can afford to re-send a day's data. See docs/operations.md.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy.engine import make_url


class BackupError(Exception):
    """The backup or restore could not be made; the message says why."""


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise BackupError("an in-memory SQLite index cannot be backed up")
    return Path(parsed.database)


def _pg_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} is not installed (PostgreSQL client tools)")
    return path


def _pg_args(url: str) -> tuple[list[str], dict[str, str]]:
    parsed = make_url(url)
    args = ["--host", parsed.host or "localhost", "--dbname", parsed.database or ""]
    if parsed.port:
        args += ["--port", str(parsed.port)]
    if parsed.username:
        args += ["--username", parsed.username]
    env = {**os.environ}
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    return args, env


def _run(args: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BackupError(f"{what} failed: {detail[-1] if detail else result.returncode}")


def backup(url: str, target: Path) -> None:
    """Write a consistent copy of the index at ``url`` to ``target``."""
    if target.exists():
        raise BackupError(f"{target} exists; choose a new file")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = _sqlite_path(url)
    if source is not None:
        if not source.exists():
            raise BackupError(f"no index at {source}")
        partial = target.with_name(target.name + ".partial")
        src = sqlite3.connect(source)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(partial, target)
        return
    args, env = _pg_args(url)
    partial = target.with_name(target.name + ".partial")
    _run(
        [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(partial), *args],
        env,
        "pg_dump",
    )
    os.replace(partial, target)


def restore(url: str, source: Path) -> None:
    """Replace the index at ``url`` with the backup in ``source`` (gateways stopped)."""
    if not source.is_file():
        raise BackupError(f"no backup at {source}")
    target = _sqlite_path(url)
    if target is not None:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            if src.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise BackupError(f"{source} is not an intact SQLite database")
            target.parent.mkdir(parents=True, exist_ok=True)
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{source} is not a SQLite backup: {exc}") from exc
        finally:
            src.close()
        return
    args, env = _pg_args(url)
    _run(
        [
            _pg_tool("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            "--exit-on-error",
            *args,
            str(source),
        ],
        env,
        "pg_restore",
    )
    # pg_restore brings back rows, not the planner's statistics: without them the
    # first queries of the restored index plan as if every table were tiny.
    from gateway.archive.db import Database

    db = Database(url)
    try:
        db.analyze()
    finally:
        db.dispose()
