"""``studybridge scrub``: does every indexed instance still have its blob, intact?

For each index row the blob is read from ``dataset_offset`` to its end and hashed;
the size and SHA-256 must equal what ingest recorded. A blob that is gone, shorter
or different is reported by SOP Instance UID and key. Orphan blobs (instance blobs
no row names, older than the grace period) are listed through the sweep's own
``find_orphans`` and removed only when asked. Works on every ``BlobStore``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database
from gateway.archive.errors import NotFound, StorageUnavailable
from gateway.archive.models import Instance
from gateway.archive.sweep import find_orphans, sweep_orphans

_CHUNK = 1024 * 1024
_BATCH = 500


@dataclass
class Problem:
    kind: str  # "missing", "corrupt" or "unreadable"
    sop_uid: str
    blob_key: str
    detail: str


@dataclass
class ScrubReport:
    checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    orphans_removed: int = 0

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "bytes_checked": self.bytes_checked,
            "problems": [p.__dict__ for p in self.problems],
            "orphans": self.orphans,
            "orphans_removed": self.orphans_removed,
        }


def check_blob(store: BlobStore, key: str, offset: int, size: int, sha256: str) -> str | None:
    """Why the blob does not hold the recorded data set, or None when it does."""
    digest = hashlib.sha256()
    count = 0
    with store.open(key) as fh:
        fh.seek(offset)
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            count += len(chunk)
    if count != size:
        return f"data set is {count} bytes, index says {size}"
    if digest.hexdigest() != sha256:
        return "SHA-256 differs from the one recorded at ingest"
    return None


def scrub(
    db: Database,
    store: BlobStore,
    *,
    orphan_grace: float,
    delete_orphans: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ScrubReport:
    """Check every indexed instance's blob; list (or delete) old orphans."""
    report = ScrubReport()
    last_id = 0
    while True:
        with db.reading() as session:
            rows = session.execute(
                select(
                    Instance.id,
                    Instance.sop_uid,
                    Instance.blob_key,
                    Instance.dataset_offset,
                    Instance.size,
                    Instance.sha256,
                )
                .where(Instance.id > last_id)
                .order_by(Instance.id)
                .limit(_BATCH)
            ).all()
        if not rows:
            break
        for row in rows:
            last_id = row.id
            report.checked += 1
            try:
                why = check_blob(store, row.blob_key, row.dataset_offset, row.size, row.sha256)
            except NotFound:
                report.problems.append(
                    Problem("missing", row.sop_uid, row.blob_key, "blob is missing")
                )
                continue
            except StorageUnavailable as exc:
                report.problems.append(Problem("unreadable", row.sop_uid, row.blob_key, str(exc)))
                continue
            if why is not None:
                report.problems.append(Problem("corrupt", row.sop_uid, row.blob_key, why))
            else:
                report.bytes_checked += row.size
        if progress is not None:
            progress(report.checked)
    report.orphans = find_orphans(db, store, orphan_grace)
    if delete_orphans and report.orphans:
        report.orphans_removed = sweep_orphans(db, store, orphan_grace).orphans_removed
    return report
