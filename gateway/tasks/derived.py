"""Derived work after ingest: what viewers ask for first, prepared before they ask.

``studybridge.prepare_series`` runs once a series' arrivals pause (the ingest hook
in ``gateway.tasks.hooks`` coalesces per series). It builds

- the series' DICOM JSON metadata cache (``gateway.archive.metadata``), unless a
  copy for the series' current content exists already;
- the default thumbnails (``gateway.archive.rendering``: JPEG, 128 px box) of the
  series and, when its representative image lies in this series, of the study:
  the images ``GET .../thumbnail`` serves, from the same cache.

Both are keyed by content, so running the task twice, or for a series that changed
meanwhile, does no harm. An image no installed decoder reads gets no thumbnail
(the door answers 406 for it anyway).

``studybridge.backfill_frame_offsets`` records the frame byte ranges of images indexed
before ingest recorded them (``gateway.archive.frame_backfill``); run it once after
upgrading such an archive (``studybridge tasks run`` or ``tasks submit``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.archive import Archive, frame_backfill, metadata
from gateway.archive.errors import InvalidDataset, NotFound
from gateway.archive.frames import FrameReader, can_decode
from gateway.archive.query import Level
from gateway.archive.rendering import cached_thumbnail, representative, thumbnail_options
from gateway.archive.retrieve import RetrieveRequest, StoredInstance, find_instances
from gateway.tasks.registry import TaskContext, task

log = logging.getLogger(__name__)

PREPARE_SERIES = "studybridge.prepare_series"
BACKFILL_FRAME_OFFSETS = "studybridge.backfill_frame_offsets"


@task(PREPARE_SERIES)
def prepare_series(ctx: TaskContext, study_uid: str, series_uid: str) -> None:
    """Build the series metadata cache and the series (and study) thumbnails."""
    archive = ctx.archive
    scratch = ctx.settings.staging_dir
    try:
        metadata.series_metadata(archive.db, archive.store, scratch, study_uid, series_uid)
    except NotFound:
        return  # the series is gone (deleted, or never committed): nothing to prepare
    series = find_instances(
        archive.db, RetrieveRequest(Level.SERIES, study_uids=[study_uid], series_uids=[series_uid])
    )
    study = find_instances(archive.db, RetrieveRequest(Level.STUDY, study_uids=[study_uid]))
    chosen = {i.sop_uid: i for i in (representative(series), representative(study)) if i}
    for inst in chosen.values():
        if inst.series_uid == series_uid:
            _thumbnail(archive, scratch, inst)


@task(BACKFILL_FRAME_OFFSETS)
def backfill_frame_offsets(ctx: TaskContext, batch: int = 200) -> dict[str, int]:
    """Record frame byte ranges of images indexed before they were recorded."""
    report = frame_backfill.backfill_frame_offsets(
        ctx.archive.db, ctx.archive.store, batch=int(batch)
    )
    return report.as_dict()


def _thumbnail(archive: Archive, scratch: Path, inst: StoredInstance) -> None:
    if not can_decode(inst.transfer_syntax_uid):
        return
    reader = FrameReader(archive.store, inst)
    if reader.number_of_frames == 0:
        return
    try:
        cached_thumbnail(archive.store, scratch, reader, 1, thumbnail_options())
    except (InvalidDataset, ValueError, TypeError, NotImplementedError) as exc:
        # The image cannot be rendered here; a request would fail the same way.
        log.warning("no thumbnail for %s: %s", inst.sop_uid, exc)
