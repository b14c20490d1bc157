"""Index backup and restore, on SQLite (online backup API) and PostgreSQL (pg_dump)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.archive import Archive
from gateway.ops.backup import BackupError, backup, restore
from gateway.ops.scrub import scrub
from tests.factories import ct_slice, write
from tests.gateway.archive.helpers import SOURCE, instances

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_backup_while_writing_then_restore(archive: Archive, tmp_path: Path, backend: str):
    url = archive.settings.resolved_database_url
    for i in range(5):
        archive.ingest_file(write(ct_slice(), tmp_path / f"a{i}.dcm"), SOURCE)
    # Receivers keep writing while the backup runs.
    files = [write(ct_slice(), tmp_path / f"b{i}.dcm") for i in range(5)]
    writer = threading.Thread(target=lambda: [archive.ingest_file(f, SOURCE) for f in files])
    writer.start()
    target = tmp_path / "backups" / "index.backup"
    backup(url, target)
    writer.join()
    assert target.exists() and not target.with_name("index.backup.partial").exists()
    with pytest.raises(BackupError, match="exists"):
        backup(url, target)
    assert len(instances(archive)) == 10

    # A disaster: the index loses everything; the blobs stay.
    with archive.db.write_conn() as conn:
        conn.execute(text("DELETE FROM instances"))
    assert instances(archive) == []
    archive.db.dispose()
    restore(url, target)
    restored = instances(archive)
    assert 5 <= len(restored) <= 10  # the backup is consistent: whole instances only
    report = scrub(archive.db, archive.store, orphan_grace=0)
    assert report.healthy and report.checked == len(restored)
    # Instances received after the backup have blobs but no rows: scrub lists them.
    assert len(report.orphans) == 10 - len(restored)


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path):
    junk = tmp_path / "junk.backup"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(BackupError):
        restore(f"sqlite:///{tmp_path / 'index.sqlite3'}", junk)
    with pytest.raises(BackupError, match="no backup"):
        restore(f"sqlite:///{tmp_path / 'index.sqlite3'}", tmp_path / "none")


@pytest.mark.postgres
def test_pg_backup_error_is_plain_and_has_no_password(tmp_path: Path):
    from tests.servers import free_port

    url = f"postgresql+psycopg://sb:pw-secret-1@127.0.0.1:{free_port()}/x{uuid.uuid4().hex[:6]}"
    with pytest.raises(BackupError) as info:
        backup(url, tmp_path / "x.backup")
    assert "pg_dump failed" in str(info.value) and "pw-secret-1" not in str(info.value)
