"""Retention dates per record type, legal holds and the report (both index backends)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.archive import Archive, Source
from gateway.cli import app
from gateway.transfers.expected import ExpectedLine, store_expected
from gateway.transfers.finalize import finalize
from gateway.transfers.records import create_transfer
from gateway.transfers.retention import (
    RetentionError,
    apply_retention,
    policy_for,
    retention_lines,
    set_hold,
)
from tests.factories import ct_slice, uid, write

pytestmark = pytest.mark.fast


def _study(archive: Archive, tmp: Path, modality: str, date: str) -> str:
    study = uid()
    ds = ct_slice(study_uid=study, modality=modality, study_date=date)
    archive.ingest_file(write(ds, tmp / f"{study}.dcm"), Source(door="import"))
    return study


def test_policy_by_record_type(archive: Archive, tmp_path: Path) -> None:
    settings = archive.settings.model_copy(
        update={"retention_years": {"CR": 5, "MG": 20}, "retention_default_years": 10}
    )
    assert policy_for(settings, ["CR"]) == ("CR", 5)
    assert policy_for(settings, ["CR", "MG"]) == ("MG", 20)
    assert policy_for(settings, ["CT"]) == ("default", 10)
    cr = _study(archive, tmp_path, "CR", "20200229")
    ct = _study(archive, tmp_path, "CT", "20190115")
    undated = _study(archive, tmp_path, "CT", "")
    assert apply_retention(archive.db, settings) == 3
    assert apply_retention(archive.db, settings) == 0  # kept unless recomputed
    early = retention_lines(archive.db, due_on=dt.date(2026, 1, 1))
    assert [line.study_uid for line in early] == [cr]
    due = {
        line.study_uid: line for line in retention_lines(archive.db, due_on=dt.date(2029, 12, 31))
    }
    assert set(due) == {cr, ct}
    assert due[ct].retain_until == dt.date(2029, 1, 15)
    later = {
        line.study_uid: line for line in retention_lines(archive.db, due_on=dt.date(2100, 1, 1))
    }
    assert later[cr].retain_until == dt.date(2025, 2, 28) and later[cr].record_type == "CR"
    assert later[undated].retain_until.year == dt.date.today().year + 10

    set_hold(archive.db, ct, hold=True, reason="court order 12/2026")
    assert ct not in {
        line.study_uid for line in retention_lines(archive.db, due_on=dt.date(2100, 1, 1))
    }
    assert [line.study_uid for line in retention_lines(archive.db, holds=True)] == [ct]
    with pytest.raises(RetentionError, match="needs a reason"):
        set_hold(archive.db, cr, hold=True, reason=" ")
    set_hold(archive.db, ct, hold=False)
    assert retention_lines(archive.db, holds=True) == []


def test_finalize_sets_retention_for_the_transfer(archive: Archive, tmp_path: Path) -> None:
    tid = create_transfer(archive.db, institution="Lac", reason="closure", issuer="LAC").id
    study = uid()
    ds = ct_slice(study_uid=study, modality="DX", study_date="20100101")
    archive.ingest_file(write(ds, tmp_path / "a.dcm"), Source(door="import", transfer_id=tid))
    store_expected(archive.db, tid, [ExpectedLine(study, "", 1)], origin="manifest")
    finalize(archive.db, archive.settings, tid)
    [line] = retention_lines(archive.db, due_on=dt.date(2100, 1, 1))
    assert line.study_uid == study and line.retain_until == dt.date(2020, 1, 1)


def test_retention_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "var")]
    write(ct_slice(study_date="20000101"), tmp_path / "in" / "a.dcm")
    assert runner.invoke(app, ["import", str(tmp_path / "in"), *data]).exit_code == 0
    result = runner.invoke(app, ["retention", "apply", *data])
    assert "1 studies" in result.output
    result = runner.invoke(app, ["retention", "report", "--json", *data])
    assert len(__import__("json").loads(result.output)) == 1
    result = runner.invoke(app, ["retention", "hold", "1.2.3", "--reason", "x", *data])
    assert result.exit_code == 2 and "no retention date" in result.output
