"""Frame byte ranges recorded afterwards for instances indexed without them."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import update

from gateway.archive import Archive
from gateway.archive.frames import FrameReader
from gateway.archive.models import Instance
from gateway.archive.query import Level
from gateway.archive.retrieve import RetrieveRequest, find_instances
from gateway.tasks.derived import BACKFILL_FRAME_OFFSETS
from gateway.tasks.registry import TaskContext, get_task
from tests.factories import ct_slice, uid, write
from tests.gateway.archive.helpers import SOURCE, instances

pytestmark = [pytest.mark.production, pytest.mark.filterwarnings("ignore::UserWarning")]

SAMPLES = (
    "emri_small.dcm",  # native, 10 frames
    "emri_small_jpeg_2k_lossless.dcm",  # encapsulated, 10 frames, no Basic Offset Table
    "emri_small_RLE.dcm",  # encapsulated with a Basic Offset Table
)


def test_backfill_records_what_ingest_would_have(archive: Archive, tmp_path: Path):
    for i, name in enumerate(SAMPLES):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
        ds.SeriesInstanceUID = uid()  # the samples share their UIDs
        ds.save_as(tmp_path / f"{i}.dcm")
        archive.ingest_file(tmp_path / f"{i}.dcm", SOURCE)
    ct = ct_slice(study_uid=uid(), series_uid=uid(), rows=8, columns=8)
    archive.ingest_file(write(ct, tmp_path / "ct.dcm"), SOURCE)
    recorded = {i.sop_uid: i.frame_offsets for i in instances(archive)}
    assert all(recorded.values())  # ingest records them today
    with archive.db.writing() as session:
        session.execute(update(Instance).values(frame_offsets=None))  # an older archive

    task = get_task(BACKFILL_FRAME_OFFSETS)
    ctx = TaskContext(archive, archive.settings)
    assert task.func(ctx, batch=2) == {"recorded": 4, "no_frames": 0, "failed": 0}
    assert {i.sop_uid: i.frame_offsets for i in instances(archive)} == recorded
    # Done once: a second run finds nothing left to do.
    assert task.func(ctx) == {"recorded": 0, "no_frames": 0, "failed": 0}
    request = RetrieveRequest(Level.IMAGE, sop_uids=list(recorded))
    for stored in find_instances(archive.db, request):
        reader = FrameReader(archive.store, stored)  # reads the recorded ranges
        assert reader.ranges == [tuple(r) for r in json.loads(recorded[stored.sop_uid])]
        assert reader.stored(reader.number_of_frames)


def test_missing_blob_is_counted_and_left(archive: Archive, tmp_path: Path):
    ct = ct_slice(study_uid=uid(), series_uid=uid(), rows=8, columns=8)
    archive.ingest_file(write(ct, tmp_path / "ct.dcm"), SOURCE)
    [inst] = instances(archive)
    with archive.db.writing() as session:
        session.execute(update(Instance).values(frame_offsets=None))
    archive.store.delete(inst.blob_key)
    report = get_task(BACKFILL_FRAME_OFFSETS).func(TaskContext(archive, archive.settings))
    assert report == {"recorded": 0, "no_frames": 0, "failed": 1}
    assert instances(archive)[0].frame_offsets is None
