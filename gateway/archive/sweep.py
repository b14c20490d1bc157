"""Sweeps: removing what interrupted work left behind, once it is old enough.

- Staging leftovers: files in the staging folder (receives cut off mid-stream,
  a process killed between staging and storing) older than the grace period.
- Orphan blobs: instance blobs (``studies/...``) that no index row names, older
  than the grace period. They are what the durability order leaves when a process
  dies between the blob write and the index commit, or when the index refused the
  row (it was down). The grace period is what keeps a blob whose index commit is
  still under way: it must be far longer than any ingest (default a day).

Quarantined copies (``quarantine/``) are kept on purpose and never swept. Derived
artifacts (``metadata/``, ``thumbnails/``) are rebuilt on demand and not swept here.
Both sweeps are idempotent: running one twice, or two at once, removes the same
files once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database
from gateway.archive.errors import NotFound
from gateway.archive.models import Instance

log = logging.getLogger(__name__)

INSTANCE_PREFIX = "studies/"
# Keys checked against the index per query.
_BATCH = 500


@dataclass
class SweepReport:
    staging_removed: int = 0
    orphans_removed: int = 0
    orphan_bytes: int = 0


def sweep_staging(staging_dir: Path, older_than: float) -> int:
    """Delete staging files last written more than ``older_than`` seconds ago."""
    if not staging_dir.is_dir():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for entry in os.scandir(staging_dir):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue  # taken by its ingest, or by another sweep
    if removed:
        log.info("sweep: %d staging leftovers removed from %s", removed, staging_dir)
    return removed


def find_orphans(
    db: Database, store: BlobStore, older_than: float, *, now: dt.datetime | None = None
) -> list[str]:
    """Instance blobs no index row names, written more than ``older_than`` seconds ago."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=older_than)
    orphans: list[str] = []
    batch: list[str] = []

    def check(keys: list[str]) -> None:
        with db.reading() as session:
            stmt = select(Instance.blob_key).where(Instance.blob_key.in_(keys))
            known = set(session.scalars(stmt))
        for key in keys:
            if key in known:
                continue
            try:
                if store.modified(key) < cutoff:
                    orphans.append(key)
            except NotFound:
                continue

    for key in store.iter_keys(INSTANCE_PREFIX):
        batch.append(key)
        if len(batch) >= _BATCH:
            check(batch)
            batch = []
    if batch:
        check(batch)
    return orphans


def sweep_orphans(db: Database, store: BlobStore, older_than: float) -> SweepReport:
    """Delete the orphan blobs ``find_orphans`` lists (checked again just before)."""
    report = SweepReport()
    for key in find_orphans(db, store, older_than):
        with db.reading() as session:
            if session.scalar(select(Instance.id).where(Instance.blob_key == key)) is not None:
                continue  # indexed since the listing
        try:
            size = store.size(key)
        except NotFound:
            continue
        store.delete(key)
        report.orphans_removed += 1
        report.orphan_bytes += size
    if report.orphans_removed:
        log.info(
            "sweep: %d orphan blobs (%d bytes) removed",
            report.orphans_removed,
            report.orphan_bytes,
        )
    return report
