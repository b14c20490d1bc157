"""Post-ingest work on the embedded default: one prepare task per series, run in-process."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from gateway.archive import Archive
from gateway.archive.metadata import cache_key, series_marker
from gateway.archive.query import Level
from gateway.archive.rendering import representative, thumbnail_key, thumbnail_options
from gateway.archive.retrieve import RetrieveRequest, find_instances
from gateway.config import Settings
from gateway.tasks.derived import PREPARE_SERIES
from tests.factories import ct_series, uid
from tests.gateway.archive.helpers import SOURCE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.fast
def test_each_series_is_prepared_once_after_its_arrivals_pause(settings: Settings, tmp_path: Path):
    settings = settings.model_copy(update={"task_series_pause": 0.4})
    archive = Archive.open(settings, migrate_schema=True, post_ingest=True)
    submitted: list[tuple[str, dict]] = []
    real_submit = archive.tasks.submit

    def spy(name, **kwargs):
        submitted.append((name, kwargs))
        real_submit(name, **kwargs)

    archive._post_ingest.coalescer._submit = spy  # count what the coalescer hands over
    try:
        study = uid()
        a = ct_series(tmp_path / "a", 6, study_uid=study)
        b = ct_series(tmp_path / "b", 3, study_uid=study)
        for path in a + b:
            archive.ingest_file(path, SOURCE)
        sa = {"study_uid": study, "series_uid": _series(a[0])}
        sb = {"study_uid": study, "series_uid": _series(b[0])}
        assert wait_for(lambda: len(submitted) >= 2)
        assert archive.tasks.drain(20)
        # Again: the same instances (duplicates) start no new work.
        for path in a:
            archive.ingest_file(path, SOURCE)
        time.sleep(1.0)
        assert sorted(submitted, key=lambda s: s[1]["series_uid"]) == sorted(
            [(PREPARE_SERIES, sa), (PREPARE_SERIES, sb)], key=lambda s: s[1]["series_uid"]
        )
        for series, count in ((sa, 6), (sb, 3)):
            marker = series_marker(archive.db, series["study_uid"], series["series_uid"])
            assert marker[0] == count
            key = cache_key(series["study_uid"], series["series_uid"], marker)
            folder = key.rsplit("/", 1)[0] + "/"
            assert list(archive.store.iter_keys(folder)) == [key]  # one current copy
            with archive.store.open(key) as fh:
                objects = json.loads(gzip.decompress(fh.read()))
            assert len(objects) == count
            # The default thumbnail of the series, under the key the HTTP door reads.
            listed = find_instances(
                archive.db,
                RetrieveRequest(
                    Level.SERIES,
                    study_uids=[series["study_uid"]],
                    series_uids=[series["series_uid"]],
                ),
            )
            thumb = thumbnail_key(representative(listed), 1, thumbnail_options())
            assert archive.store.exists(thumb)
            with archive.store.open(thumb) as fh:
                assert fh.read(3) == b"\xff\xd8\xff"  # JPEG
        # The study's thumbnail is its first series' one: two in all.
        assert len(list(archive.store.iter_keys(f"thumbnails/{study}/"))) == 2
    finally:
        archive.close()


@pytest.mark.fast
def test_archives_opened_without_post_ingest_submit_nothing(sqlite_settings: Settings, tmp_path):
    archive = Archive.open(sqlite_settings, migrate_schema=True)
    try:
        for path in ct_series(tmp_path / "s", 2):
            archive.ingest_file(path, SOURCE)
        assert archive.ingestor.after_store == []
        assert archive._tasks is None
        assert list(archive.store.iter_keys("metadata/")) == []
    finally:
        archive.close()


def _series(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
