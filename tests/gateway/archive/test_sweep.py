"""Sweeps: staging leftovers and orphan blobs go once old enough; nothing else does."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from gateway.archive import Archive
from gateway.archive.sweep import find_orphans, sweep_orphans, sweep_staging
from tests.factories import ct_slice, write
from tests.gateway.archive.helpers import SOURCE, blob_keys, instances

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.production]
DAY = 24 * 3600.0


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def put(archive: Archive, key: str, tmp_path: Path, old: bool) -> Path:
    src = tmp_path / key.replace("/", "_")
    src.write_bytes(b"orphan")
    archive.store.put_file(key, src, move=True)
    path = archive.settings.resolved_blob_dir / key
    if old:
        age(path, 2 * DAY)
    return path


@pytest.mark.fast
@pytest.mark.file_store  # ages blobs with os.utime: an S3 object's time cannot be set
def test_sweep_removes_old_orphan_blobs_only(archive: Archive, tmp_path: Path):
    stored = write(ct_slice(), tmp_path / "in.dcm")
    archive.ingest_file(stored, SOURCE)
    indexed = instances(archive)[0].blob_key
    age(archive.settings.resolved_blob_dir / indexed, 2 * DAY)  # old but indexed: kept
    put(archive, "studies/1.2/1.3/1.4.0123456789abcdef.dcm", tmp_path, old=True)
    put(archive, "studies/1.2/1.3/1.5.0123456789abcdef.dcm", tmp_path, old=False)
    put(archive, "quarantine/1.6.0123456789abcdef.dcm", tmp_path, old=True)

    assert find_orphans(archive.db, archive.store, DAY) == [
        "studies/1.2/1.3/1.4.0123456789abcdef.dcm"
    ]
    report = sweep_orphans(archive.db, archive.store, DAY)
    assert (report.orphans_removed, report.orphan_bytes) == (1, len(b"orphan"))
    assert blob_keys(archive) == sorted(
        [indexed, "studies/1.2/1.3/1.5.0123456789abcdef.dcm", "quarantine/1.6.0123456789abcdef.dcm"]
    )
    # Idempotent: a second sweep finds nothing more.
    assert sweep_orphans(archive.db, archive.store, DAY).orphans_removed == 0
    # With no grace, the young orphan goes too, the indexed blob never.
    assert sweep_orphans(archive.db, archive.store, 0).orphans_removed == 1
    assert indexed in blob_keys(archive)


@pytest.mark.fast
def test_sweep_goes_by_the_stores_own_write_times(archive: Archive, tmp_path: Path):
    """Through the BlobStore interface only (files, or S3's Last-Modified): a fresh
    orphan is kept within the grace period and found once it is over; the indexed
    and the quarantined blob are never swept."""
    archive.ingest_file(write(ct_slice(), tmp_path / "in.dcm"), SOURCE)
    indexed = instances(archive)[0].blob_key
    orphan = "studies/1.2/1.3/1.4.0123456789abcdef.dcm"
    quarantined = "quarantine/1.6.0123456789abcdef.dcm"
    for key in (orphan, quarantined):
        src = tmp_path / key.replace("/", "_")
        src.write_bytes(b"orphan")
        archive.store.put_file(key, src, move=True)

    assert find_orphans(archive.db, archive.store, DAY) == []
    assert sweep_orphans(archive.db, archive.store, DAY).orphans_removed == 0
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert find_orphans(archive.db, archive.store, DAY, now=later) == [orphan]
    report = sweep_orphans(archive.db, archive.store, 0)
    assert (report.orphans_removed, report.orphan_bytes) == (1, len(b"orphan"))
    assert blob_keys(archive) == sorted([indexed, quarantined])


@pytest.mark.fast
def test_sweep_staging_removes_old_leftovers(tmp_path: Path):
    staging = tmp_path / "staging"
    staging.mkdir()
    old = staging / "stow-old.dcm"
    new = staging / "recv-new.dcm"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    age(old, 2 * DAY)
    assert sweep_staging(staging, DAY) == 1
    assert sorted(p.name for p in staging.iterdir()) == ["recv-new.dcm"]
    assert sweep_staging(tmp_path / "missing", DAY) == 0
