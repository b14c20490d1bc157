"""Retention dates per record type, legal holds and the report (both index backends)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from consent.audit import Auditor, verify
from consent.models import AuditRecord
from consent.principals import Kind, Principal
from gateway.archive import Archive, Level, RetrieveRequest, Source
from gateway.archive.errors import StorageUnavailable
from gateway.archive.models import Patient
from gateway.archive.sweep import find_orphans
from gateway.cli import app
from gateway.transfers import retention
from gateway.transfers.expected import ExpectedLine, store_expected
from gateway.transfers.finalize import finalize
from gateway.transfers.records import create_transfer
from gateway.transfers.retention import (
    RetentionError,
    apply_retention,
    delete_due,
    policy_for,
    retention_lines,
    set_hold,
)
from tests.factories import ct_slice, uid, write

pytestmark = [pytest.mark.fast, pytest.mark.production]


def _study(archive: Archive, tmp: Path, modality: str, date: str, patient: str = "PAT001") -> str:
    study = uid()
    ds = ct_slice(study_uid=study, modality=modality, study_date=date, patient_id=patient)
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
    deleted = runner.invoke(app, ["retention", "delete", "--as", "nobody", "--yes", *data])
    assert deleted.exit_code == 2 and "no enabled user account" in deleted.output
    listed = runner.invoke(app, ["retention", "delete", *data])
    assert listed.exit_code == 0 and "1 studies due" in listed.output
    deleted = runner.invoke(app, ["retention", "delete", "--yes", "--json", *data])
    assert deleted.exit_code == 0, deleted.output
    [done] = __import__("json").loads(deleted.output)
    assert done["outcome"] == "deleted" and done["instances"] == 1
    verified = runner.invoke(app, ["audit", "verify", *data])
    assert verified.exit_code == 0, verified.output


OPERATOR = Principal(kind=Kind.OPERATOR, id=0, name="local:tester")


def _audit(archive: Archive) -> list[tuple[str, str, str]]:
    with archive.db.reading() as session:
        rows = session.scalars(
            select(AuditRecord)
            .where(AuditRecord.operation == retention.DELETE_OPERATION)
            .order_by(AuditRecord.id)
        )
        return [(r.study_uid, r.outcome, r.detail) for r in rows]


def _blob_keys(archive: Archive, study: str) -> list[str]:
    return [
        i.blob_key for i in archive.find_instances(RetrieveRequest(Level.STUDY, study_uids=[study]))
    ]


def test_delete_due_is_audited_spares_holds_and_removes_rows_then_blobs(
    archive: Archive, tmp_path: Path
) -> None:
    archive.settings.retention_default_years = 10
    due = _study(archive, tmp_path, "CR", "20000101", patient="GONE-1")
    held = _study(archive, tmp_path, "CT", "20010101")
    recent = _study(archive, tmp_path, "CT", "20240101")
    apply_retention(archive.db, archive.settings)
    set_hold(archive.db, held, hold=True, reason="court order")
    keys = _blob_keys(archive, due)
    derived = tmp_path / "meta.json.gz"
    derived.write_bytes(b"x")
    archive.store.put_file(f"metadata/{due}/1.2.3/1-1.json.gz", derived, move=False)

    auditor = Auditor(archive.db)
    done = delete_due(
        archive, OPERATOR, auditor, due_on=dt.date(2030, 1, 1), study_uids=[due, held, recent]
    )
    auditor.close()
    assert [(d.study_uid, d.outcome) for d in done] == [
        (due, "deleted"),
        (held, "refused"),
        (recent, "refused"),
    ]
    assert done[0].instances == 1 and done[0].blobs_left == 0
    assert _blob_keys(archive, due) == []
    assert not any(archive.store.exists(k) for k in keys)
    assert list(archive.store.iter_keys(f"metadata/{due}/")) == []
    with archive.db.reading() as session:
        assert session.scalar(select(Patient).where(Patient.patient_id == "GONE-1")) is None
    assert _blob_keys(archive, held) and _blob_keys(archive, recent)
    audit = _audit(archive)
    assert [(a[0], a[1]) for a in audit] == [
        (due, "allowed"),
        (held, "denied"),
        (recent, "denied"),
    ]
    assert "instances=1" in audit[0][2] and "retain_until=2010-01-01" in audit[0][2]
    assert verify(archive.db).ok
    # Nothing due is left; a second run deletes nothing.
    assert delete_due(archive, OPERATOR, Auditor(archive.db), due_on=dt.date(2030, 1, 1)) == []


def test_a_hold_placed_meanwhile_wins_and_a_dead_store_leaves_orphans(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive.settings.retention_default_years = 5
    first = _study(archive, tmp_path, "CT", "20000101")
    second = _study(archive, tmp_path, "CT", "20000102")
    apply_retention(archive.db, archive.settings)
    extent = retention._extent

    def hold_first_meanwhile(db, study_uid):  # type: ignore[no-untyped-def]
        if study_uid == first:
            set_hold(db, first, hold=True, reason="late order")
        return extent(db, study_uid)

    monkeypatch.setattr(retention, "_extent", hold_first_meanwhile)

    def dead(key: str) -> None:
        raise StorageUnavailable("blob store down")

    monkeypatch.setattr(archive.store, "delete", dead)
    keys = _blob_keys(archive, second)
    done = delete_due(archive, OPERATOR, Auditor(archive.db), due_on=dt.date(2030, 1, 1))
    outcomes = {d.study_uid: (d.outcome, d.reason, d.blobs_left) for d in done}
    assert outcomes[first] == ("refused", "placed on legal hold meanwhile", 0)
    assert outcomes[second][0] == "deleted" and outcomes[second][2] == 1
    assert _blob_keys(archive, first)
    # The index let go first: the blob that stayed is an orphan for the sweep.
    assert _blob_keys(archive, second) == []
    assert find_orphans(archive.db, archive.store, 0, now=dt.datetime.now(dt.UTC)) == keys
