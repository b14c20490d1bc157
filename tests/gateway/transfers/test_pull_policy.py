"""Pull mode's policy (windows, backoff) and planning, without a PACS."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.archive import Archive, Source
from gateway.transfers.expected import ExpectedLine, store_expected
from gateway.transfers.models import TransferPull
from gateway.transfers.pull import PullError, PullPolicy, Window, plan_pull
from gateway.transfers.records import create_transfer
from tests.factories import ct_series

pytestmark = [pytest.mark.fast, pytest.mark.production]

UTC = dt.UTC


def test_windows_across_midnight_and_time_zones() -> None:
    night = PullPolicy(windows=(Window.parse("22:00-06:00"),), timezone="Europe/Zurich")
    # 21:30 UTC is 22:30 in Zurich in winter: inside.
    assert night.open_at(dt.datetime(2026, 1, 10, 21, 30, tzinfo=UTC))
    assert not night.open_at(dt.datetime(2026, 1, 10, 12, 0, tzinfo=UTC))
    assert night.next_opening(dt.datetime(2026, 1, 10, 12, 0, tzinfo=UTC)) == dt.datetime(
        2026, 1, 10, 21, 0, tzinfo=UTC
    )
    assert PullPolicy().open_at(dt.datetime(2026, 1, 10, 12, 0, tzinfo=UTC))
    for bad in ("22-6", "10:00-10:00"):
        with pytest.raises(PullError):
            Window.parse(bad)


def test_backoff_doubles_and_is_capped() -> None:
    policy = PullPolicy(backoff_seconds=10)
    assert [policy.backoff(n).total_seconds() for n in (1, 2, 3)] == [10, 20, 40]
    assert policy.backoff(30).total_seconds() == 3600


def test_plan_follows_what_is_missing(archive: Archive, tmp_path: Path) -> None:
    tid = create_transfer(archive.db, institution="Lac", reason="closure", issuer="LAC").id
    paths = ct_series(tmp_path / "a", 2)
    import pydicom

    ds = pydicom.dcmread(paths[0])
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    other_study = "1.2.3.4.5"
    store_expected(
        archive.db,
        tid,
        [ExpectedLine(study, series, 2), ExpectedLine(other_study, "", 3)],
        origin="manifest",
    )
    assert plan_pull(archive.db, tid) == 2
    for p in paths:
        archive.ingest_file(p, Source(door="import", transfer_id=tid))
    assert plan_pull(archive.db, tid) == 1
    with archive.db.reading() as session:
        items = {
            (i.study_uid, i.series_uid): i.status for i in session.scalars(select(TransferPull))
        }
    assert items == {(study, series): "done", (other_study, ""): "pending"}


def test_waiting_pull_retries_an_unreachable_source_then_gives_up(archive: Archive) -> None:
    from gateway.peers import Peer
    from gateway.transfers.pull import run_pull
    from tests.servers import free_port

    tid = create_transfer(archive.db, institution="Lac", reason="closure", issuer="LAC").id
    store_expected(archive.db, tid, [ExpectedLine("1.2.3.4.6", "", 1)], origin="manifest")
    plan_pull(archive.db, tid)
    nobody = Peer("GONE", "127.0.0.1", free_port())  # nothing listens there
    summary = run_pull(
        archive.db,
        archive.settings,
        nobody,
        tid,
        PullPolicy(max_attempts=3, backoff_seconds=0.05, rate_per_minute=6000),
        wait=True,
    )
    assert (summary.failed_attempts, summary.failed, summary.pending) == (3, 1, 0)
    assert "unreachable" in summary.errors[0]
    with archive.db.reading() as session:
        [item] = session.scalars(select(TransferPull)).all()
    assert item.attempts == 3 and item.status == "failed" and "unreachable" in item.last_error
