"""Transfers in process, on SQLite and PostgreSQL: manifest, arrivals through the one
ingest, reconciliation, finalize, signed receipts and their verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.archive import Archive, Source
from gateway.archive.errors import ArchiveError
from gateway.transfers.expected import ManifestError, parse_manifest, store_expected
from gateway.transfers.finalize import finalize, latest_receipt
from gateway.transfers.receipt import (
    check_against_held,
    instances_hash,
    load_or_create_key,
    load_public_key,
    verify,
)
from gateway.transfers.records import (
    TransferBindings,
    TransferError,
    create_transfer,
    get_transfer,
)
from gateway.transfers.report import held_instances, reconcile
from tests.factories import ct_series, uid

pytestmark = [pytest.mark.fast, pytest.mark.production]


def _transfer(archive: Archive, **kw: object) -> int:
    args = {"institution": "Clinique du Lac", "reason": "closure", "issuer": "LAC", **kw}
    return create_transfer(archive.db, **args).id  # type: ignore[arg-type]


def _ingest(archive: Archive, paths: list[Path], transfer_id: int) -> None:
    source = Source(door="import", issuer="LAC", transfer_id=transfer_id)
    for p in paths:
        archive.ingest_file(p, source)


def test_manifest_arrivals_report_and_signed_receipt(archive: Archive, tmp_path: Path) -> None:
    tid = _transfer(archive)
    a = ct_series(tmp_path / "a", 3, patient_id="P1")
    b = ct_series(tmp_path / "b", 2, patient_id="P2")
    c = ct_series(tmp_path / "c", 2, patient_id="P3")
    study = {k: _study_of(v) for k, v in {"a": a, "b": b, "c": c}.items()}
    series_a = _series_of(a)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "StudyInstanceUID,SeriesInstanceUID,NumberOfInstances,PatientID,StudyDate\n"
        f"{study['a']},{series_a},3,P1,20240115\n"
        f"{study['b']},,2,P2,20240115\n"
        f"{study['c']},,2,P3,20240115\n"
    )
    store_expected(archive.db, tid, parse_manifest(manifest), origin="manifest")

    _ingest(archive, a + b, tid)
    _ingest(archive, a[:1], tid)  # delivered twice
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(ArchiveError):
        _ingest(archive, [junk], tid)
    extra = ct_series(tmp_path / "x", 1, patient_id="P9")  # not in the manifest
    _ingest(archive, extra, tid)

    rec = reconcile(archive.db, tid)
    by_uid = {s.study_uid: s for s in rec.studies}
    assert by_uid[study["a"]].status == "complete"
    assert by_uid[study["a"]].series[0].received == 3
    assert by_uid[study["b"]].status == "complete"
    assert by_uid[study["c"]].status == "missing"
    assert by_uid[_study_of(extra)].status == "extra"
    assert [s.study_uid for s in rec.missing] == [study["c"]]
    assert rec.duplicates == 1
    assert len(rec.rejected) == 1 and "invalid-dataset" in rec.rejected[0].reason
    assert rec.counts()["instances"] == 6
    assert not rec.complete
    # The instances are filed under the transfer's one issuer.
    with archive.db.read_conn() as conn:
        from sqlalchemy import text

        issuers = {r[0] for r in conn.execute(text("SELECT issuer FROM patients"))}
    assert issuers == {"LAC"}

    done = finalize(archive.db, archive.settings, tid)
    assert done.transfer.status == "incomplete"
    receipt = done.document["receipt"]
    assert [m["study_uid"] for m in receipt["missing"]] == [study["c"]]
    assert receipt["counts"]["instances"] == 6
    assert receipt["counts"]["bytes"] == sum(h.size for h in rec.held)
    assert receipt["instances_hash"]["value"] == instances_hash(rec.held)

    # The rest arrives; finalizing again completes and issues a second receipt.
    _ingest(archive, c, tid)
    done = finalize(archive.db, archive.settings, tid)
    assert done.transfer.status == "complete"
    assert done.document["receipt"]["missing"] == []
    text_doc = latest_receipt(archive.db, tid)
    assert text_doc == done.text
    with pytest.raises(TransferError, match="already complete"):
        finalize(archive.db, archive.settings, tid)

    trusted = load_public_key(archive.settings.resolved_receipt_key_file)
    assert verify(text_doc, trusted).ok
    held, _d, _t = held_instances(archive.db, tid)
    assert check_against_held(done.document["receipt"], held) == []

    # Tampering with any value breaks the signature.
    doc = json.loads(text_doc)
    doc["receipt"]["counts"]["instances"] += 1
    bad = verify(json.dumps(doc), trusted)
    assert not bad.ok and "altered" in bad.problems[0]
    # A receipt re-signed with another key is not trusted.
    other = load_or_create_key(tmp_path / "other.pem")
    from gateway.transfers.receipt import sign

    forged = json.dumps(sign(doc["receipt"], other))
    assert not verify(forged, trusted).ok
    assert verify(forged, other.public_key()).ok


def test_finalize_without_expectation_is_refused(archive: Archive) -> None:
    tid = _transfer(archive)
    with pytest.raises(TransferError, match="no manifest or census"):
        finalize(archive.db, archive.settings, tid)
    assert get_transfer(archive.db, tid).status == "open"


def test_ae_binding_and_statuses(archive: Archive) -> None:
    tid = _transfer(archive, source_ae="CLINIC")
    with pytest.raises(TransferError, match="still open"):
        _transfer(archive, source_ae="CLINIC")
    bindings = TransferBindings(archive.db, cache_seconds=0)
    bound = bindings.for_ae("CLINIC")
    assert bound is not None and bound.id == tid and bound.issuer == "LAC"
    assert get_transfer(archive.db, tid).status == "receiving"
    assert bindings.for_ae("OTHER") is None


def test_refused_then_stored_is_not_listed_as_refused(archive: Archive, tmp_path: Path) -> None:
    tid = _transfer(archive)
    paths = ct_series(tmp_path / "s", 1)
    store_expected(
        archive.db,
        tid,
        parse_manifest(_csv(tmp_path, [(_study_of(paths), "", 1)])),
        origin="manifest",
    )
    # A transient refusal logged for this SOP (as a dead store would cause) ...
    with archive.db.write_conn() as conn:
        from gateway.archive.models import TransferArrival

        conn.execute(
            TransferArrival.__table__.insert(),
            {
                "transfer_id": tid,
                "outcome": "rejected",
                "sop_uid": _sop_of(paths[0]),
                "study_uid": _study_of(paths),
                "reason": "storage-unavailable: disk full",
            },
        )
    _ingest(archive, paths, tid)  # ... then the retry is stored.
    rec = reconcile(archive.db, tid)
    assert rec.rejected == [] and rec.complete


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("PatientID\nP1\n", "StudyInstanceUID column"),
        ("StudyInstanceUID\n1.2.abc\n", "line 2"),
        ("StudyInstanceUID,NumberOfInstances\n1.2.3,many\n", "not a number"),
        ("StudyInstanceUID\n1.2.3\n1.2.3\n", "listed twice"),
        ('{"studies": 3}', "list of studies"),
    ],
)
def test_bad_manifests_are_refused_whole(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(path)


def test_json_manifest(tmp_path: Path) -> None:
    s1, se1, se2 = uid(), uid(), uid()
    path = tmp_path / "m.json"
    path.write_text(
        json.dumps(
            [
                {
                    "StudyInstanceUID": s1,
                    "PatientID": "P1",
                    "series": [
                        {"SeriesInstanceUID": se1, "NumberOfInstances": 4, "Modality": "CT"},
                        {"SeriesInstanceUID": se2, "NumberOfInstances": 1},
                    ],
                },
                {"StudyInstanceUID": uid(), "NumberOfInstances": 7},
            ]
        )
    )
    lines = parse_manifest(path)
    assert [(x.series_uid, x.instances, x.patient_id) for x in lines[:2]] == [
        (se1, 4, "P1"),
        (se2, 1, "P1"),
    ]
    assert lines[2].instances == 7 and lines[2].series_uid == ""


def _csv(tmp: Path, rows: list[tuple[str, str, int]]) -> Path:
    path = tmp / "m.csv"
    path.write_text(
        "StudyInstanceUID,SeriesInstanceUID,NumberOfInstances\n"
        + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    )
    return path


def _read(path: Path):  # type: ignore[no-untyped-def]
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _study_of(paths: list[Path]) -> str:
    return str(_read(paths[0]).StudyInstanceUID)


def _series_of(paths: list[Path]) -> str:
    return str(_read(paths[0]).SeriesInstanceUID)


def _sop_of(path: Path) -> str:
    return str(_read(path).SOPInstanceUID)
