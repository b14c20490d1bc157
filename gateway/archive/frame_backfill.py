"""Frame byte ranges for instances indexed before ingest recorded them.

Ingest records each image's frame ranges (``instances.frame_offsets``, see
``gateway.archive.frames``) so WADO-RS reads a frame with one ranged read. Instances
indexed by an older version, or whose ranges could not be found at ingest, have none:
``FrameReader`` then parses the blob on every frame request. ``backfill_frame_offsets``
computes them once, the same way, and records them; an image found to hold no frames
is recorded as ``[]`` so it is not looked at again. Deflated instances keep none
(their frames are read after inflating, not by byte range). It runs as the task
``studybridge.backfill_frame_offsets`` (``gateway.tasks.derived``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pydicom.uid import UID
from sqlalchemy import select, update

from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database
from gateway.archive.errors import ArchiveError, StorageUnavailable
from gateway.archive.frames import FrameReader, encode_ranges
from gateway.archive.models import Instance, Series, Study
from gateway.archive.retrieve import stored

log = logging.getLogger(__name__)


@dataclass
class BackfillReport:
    recorded: int = 0  # instances that got their frame ranges
    no_frames: int = 0  # images whose pixel data holds no locatable frame
    failed: int = 0  # unreadable blobs or data sets (left as they were)

    def as_dict(self) -> dict[str, int]:
        return {"recorded": self.recorded, "no_frames": self.no_frames, "failed": self.failed}


def backfill_frame_offsets(db: Database, store: BlobStore, batch: int = 200) -> BackfillReport:
    """Record the frame ranges of every image instance that has none (one pass)."""
    report = BackfillReport()
    after = 0
    while True:
        stmt = (
            select(Instance, Series.series_uid, Study.study_uid)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Instance.frame_offsets.is_(None), Instance.rows.is_not(None))
            .where(Instance.id > after)
            .order_by(Instance.id)
            .limit(batch)
        )
        with db.reading() as session:
            rows = [stored(*row) for row in session.execute(stmt).all()]
        if not rows:
            return report
        after = rows[-1].instance_id
        found: dict[int, str] = {}
        for inst in rows:
            uid = UID(inst.transfer_syntax_uid)
            if uid.is_transfer_syntax and uid.is_deflated:
                continue
            try:
                ranges = FrameReader(store, inst).ranges
            except StorageUnavailable:
                raise  # the store is away: the task is retried later
            except (ArchiveError, OSError, ValueError) as exc:
                log.warning("frame ranges of %s not found: %s", inst.sop_uid, exc)
                report.failed += 1
                continue
            if ranges:
                found[inst.instance_id] = encode_ranges(ranges) or ""
                report.recorded += 1
            else:
                found[inst.instance_id] = json.dumps([])
                report.no_frames += 1
        if found:
            with db.writing() as session:
                for instance_id, text in found.items():
                    # Only where still empty: a concurrent re-ingest wins.
                    session.execute(
                        update(Instance)
                        .where(Instance.id == instance_id, Instance.frame_offsets.is_(None))
                        .values(frame_offsets=text)
                    )
