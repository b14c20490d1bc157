"""Derived work after ingest: what viewers ask for first, prepared before they ask.

``studybridge.prepare_series`` runs once a series' arrivals pause (the ingest hook
in ``gateway.tasks.hooks`` coalesces per series). It builds the series' DICOM JSON
metadata cache (``gateway.archive.metadata``), unless a copy for the series' current
content exists already: running it twice, or for a series that changed meanwhile,
does no harm.
"""

from __future__ import annotations

from gateway.archive import metadata
from gateway.archive.errors import NotFound
from gateway.tasks.registry import TaskContext, task

PREPARE_SERIES = "studybridge.prepare_series"


@task(PREPARE_SERIES)
def prepare_series(ctx: TaskContext, study_uid: str, series_uid: str) -> None:
    """Build the series metadata cache for the series' current content."""
    archive = ctx.archive
    try:
        metadata.series_metadata(
            archive.db, archive.store, ctx.settings.staging_dir, study_uid, series_uid
        )
    except NotFound:
        return  # the series is gone (deleted, or never committed): nothing to prepare
