"""Census splits by time of day when a single day (or a series) reaches the cap.

A small pynetdicom Query SCP that really caps its answers (the first N matches,
then success, as many PACS do) shows the split finds studies a capped day hides.

dcmtk's dcmqrscp plays the clinic's PACS for Study Time splitting (it matches
StudyTime ranges) and shows a source that does not match Content Time at IMAGE
level (the split stops and warns instead of asking 2,880 ranges); a running
studybridge, which matches Content Time ranges, plays a PACS whose series are
counted by Content Time ranges.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from gateway.config import Settings
from gateway.peers import Peer
from gateway.transfers.census import take_census
from tests.conftest import ServeStack
from tests.factories import ct_series, ct_slice, uid, write
from tests.servers import dcmqrscp, free_port, require_tool, run_tool, running_gateway

pytestmark = [pytest.mark.integration]

DAY = dt.date(2024, 3, 5)


def _busy_day(folder: Path) -> list[Path]:
    """Five one-image studies on DAY at different times, one the day after."""
    paths = []
    for n, time in enumerate(["080000", "093000", "120000", "163000", "235959"]):
        paths += ct_series(folder / f"s{n}", 1, study_date=f"{DAY:%Y%m%d}", study_time=time)
    paths += ct_series(folder / "next", 1, study_date=f"{DAY + dt.timedelta(days=1):%Y%m%d}")
    return paths


def _series_with_content_times(folder: Path, count: int) -> list[Path]:
    study, series = uid(), uid()
    paths = []
    for i in range(count):
        ds = ct_slice(
            study_uid=study, series_uid=series, instance_number=i + 1, study_date=f"{DAY:%Y%m%d}"
        )
        ds.ContentDate = f"{DAY:%Y%m%d}"
        ds.ContentTime = f"{(8 + i) % 24:02d}{(7 * i) % 60:02d}00"
        paths.append(write(ds, folder / f"{i:04d}.dcm"))
    return paths


def test_a_day_at_the_cap_is_split_by_study_time(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    files = _busy_day(tmp_path / "src") + ct_series(tmp_path / "three", 3, study_date="20240305")
    with dcmqrscp(tmp_path, "CLINIC") as (port, _store):
        sent = run_tool([storescu, "-aec", "CLINIC", "127.0.0.1", str(port), *map(str, files)])
        assert sent.returncode == 0, sent.stderr
        settings = Settings(data_dir=tmp_path / "gw", acse_timeout=10)
        peer = Peer("CLINIC", "127.0.0.1", port)
        census = take_census(settings, peer, DAY, DAY + dt.timedelta(days=1), cap=2)
        # Six studies on DAY (five at distinct times, the three-image one at 10:15)
        # and one the day after, though no answer may hold more than one.
        assert census.studies == 7
        assert census.instances == 9
        assert any("split by Study Time" in w for w in census.warnings)
        days = [w for w in census.warnings if w.startswith("2024-03-0")]
        assert not any("may hold more" in w for w in days), census.warnings

        # dcmqrscp does not match Content Time: the IMAGE-level split notices and stops.
        imaged = take_census(settings, peer, DAY, DAY, cap=2, image_level=True)
        assert imaged.instances == 8  # still every instance (dcmqrscp has no real cap)
        assert any("ignores ContentTime ranges" in w for w in imaged.warnings)
        assert imaged.queries < 60


def test_a_series_at_the_cap_is_counted_by_content_time(
    tmp_path: Path, serve_stack: ServeStack
) -> None:
    files = _series_with_content_times(tmp_path / "src", 7)
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    with running_gateway(tmp_path, serve_stack.env) as gw:
        gw.cli("import", str(tmp_path / "src"), "--institution", "Test Hospital")
        gw.cli(
            "peers", "add", "STUDYBRIDGE", "--host", "127.0.0.1", "--port", str(gw.dimse_port),
            "--institution", "Test Hospital",
        )  # fmt: skip
        gw.env["STUDYBRIDGE_PROFILE"] = "demo"  # the profile, without --demo's seeded studies
        gw.start("--dimse-workers", "1")
        settings = Settings(data_dir=tmp_path / "other", acse_timeout=10)
        peer = Peer("STUDYBRIDGE", "127.0.0.1", gw.dimse_port)
        census = take_census(settings, peer, DAY, DAY, cap=3, image_level=True)
    assert census.instances == 7 and census.series == 1
    assert any(f"series {series_uid}: split by Content Time" in w for w in census.warnings)
    assert not any("ignores" in w or "may hold more" in w for w in census.warnings)


def _in_range(value: str, key: str) -> bool:
    if not key:
        return True
    low, _, high = key.partition("-") if "-" in key else (key, "", key)
    return bool(value) and (low or "0") <= value <= (high or "99999999")


class _CappedPACS:
    """Answers STUDY-level C-FIND from a list, matching StudyDate and StudyTime
    ranges, with at most ``cap`` answers, then success."""

    def __init__(self, studies: list[tuple[str, str, str]], cap: int) -> None:
        self.studies, self.cap = studies, cap

    def on_find(self, event: evt.Event):  # type: ignore[no-untyped-def]
        q = event.identifier
        if q.QueryRetrieveLevel != "STUDY":
            yield 0x0000, None  # no series known: counted by the study's number
            return
        date, time = str(q.get("StudyDate", "")), str(q.get("StudyTime", ""))
        answered = 0
        for study_uid, study_date, study_time in self.studies:
            if _in_range(study_date, date) and _in_range(study_time, time):
                if answered == self.cap:
                    break
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, study_date, study_time
                ds.NumberOfStudyRelatedInstances = 1
                answered += 1
                yield 0xFF00, ds
        yield 0x0000, None


def test_a_capped_pacs_gives_up_every_study_of_a_busy_day(tmp_path: Path) -> None:
    times = [f"{h:02d}{m:02d}00" for h in range(7, 19) for m in (0, 20, 40)]  # 36 studies
    studies = [(uid(), f"{DAY:%Y%m%d}", t) for t in times]
    pacs = _CappedPACS(studies, cap=5)
    ae = AE(ae_title="CAPPED")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, pacs.on_find)]
    )
    try:
        settings = Settings(data_dir=tmp_path, acse_timeout=10)
        census = take_census(settings, Peer("CAPPED", "127.0.0.1", port), DAY, DAY, cap=5)
    finally:
        server.shutdown()
    assert census.studies == 36
    assert {line.study_uid for line in census.lines} == {s[0] for s in studies}
    assert not any("may hold more" in w for w in census.warnings), census.warnings
