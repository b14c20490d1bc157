"""The audit trail: aggregation, hash chains, tampering, checkpoints, exports, escaping."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from sqlalchemy import delete, func, select, update

from consent.audit import (
    Attempt,
    Auditor,
    escape_text,
    iter_records,
    load_or_create_signing_key,
    load_public_key,
    public_key_pem,
    render_line,
    to_dicom_xml,
    to_fhir,
    verify,
    write_checkpoint,
)
from consent.models import AuditRecord
from consent.principals import Kind, Principal
from gateway.archive import Archive
from gateway.archive.models import utcnow

pytestmark = pytest.mark.fast

RAD = Principal(kind=Kind.STAFF, id=7, name="dr who", institution="East", token_id=3)
EVIL = "DOE^JOHN\r\naudit 2026-01-01 staff:1 outcome=allowed\x00\x1b[2J"


def attempt(study: str = "1.2.3", **kw) -> Attempt:
    values = dict(principal=RAD, door="dicomweb", operation="view", outcome="allowed")
    values.update(kw)
    return Attempt(study_uid=study, **values)


def records(archive: Archive) -> list[AuditRecord]:
    return list(iter_records(archive.db))


def filled(archive: Archive, n: int = 6, chain: str | None = None) -> Auditor:
    aud = Auditor(archive.db, window_seconds=300, chain=chain)
    for i in range(n):
        aud.record(attempt(f"1.2.3.{i}"))
    return aud


def test_repeats_in_a_window_make_one_record_plus_their_count(archive: Archive):
    aud = Auditor(archive.db, window_seconds=60)
    t0 = utcnow()
    for i in range(300):  # a viewer's frame requests
        aud.record(attempt(), t0 + dt.timedelta(milliseconds=10 * i))
    aud.record(attempt(outcome="denied"), t0)
    assert [(r.count, r.outcome) for r in records(archive)] == [(1, "allowed"), (1, "denied")]
    aud.flush()
    rows = records(archive)
    assert sorted((r.count, r.outcome) for r in rows) == [
        (1, "allowed"),
        (1, "denied"),
        (299, "allowed"),
    ]
    # A new window starts a new first record.
    aud.record(attempt(), t0 + dt.timedelta(seconds=61))
    aud.close()
    assert len(records(archive)) == 4
    assert verify(archive.db).ok


def test_closed_windows_are_flushed_when_the_next_record_arrives(archive: Archive):
    aud = Auditor(archive.db, window_seconds=1)
    t0 = utcnow()
    aud.record(attempt(), t0)
    aud.record(attempt(), t0 + dt.timedelta(milliseconds=500))
    aud.record(attempt("9.9"), t0 + dt.timedelta(seconds=2))
    # The repeat of the closed window is written before the new record.
    assert [(r.study_uid, r.count, r.last_at > r.at) for r in records(archive)] == [
        ("1.2.3", 1, False),
        ("1.2.3", 1, False),
        ("9.9", 1, False),
    ]
    assert verify(archive.db).ok


def test_every_session_is_aggregated_apart(archive: Archive):
    aud = Auditor(archive.db)
    other_session = Principal(kind=Kind.STAFF, id=7, name="dr who", token_id=4)
    aud.record(attempt())
    aud.record(attempt(principal=other_session))
    assert len(records(archive)) == 2


def test_an_untouched_trail_verifies(archive: Archive):
    filled(archive).close()
    filled(archive).close()  # a second process: a second chain
    report = verify(archive.db)
    assert report.ok, report.problems
    assert report.chains == 2 and report.records == 12


def test_concurrent_writers_keep_their_chains_whole(archive: Archive):
    auditors = [Auditor(archive.db) for _ in range(3)]

    def work(aud: Auditor, k: int) -> None:
        for i in range(15):
            aud.record(attempt(f"1.{k}.{i}"))

    threads = [
        threading.Thread(target=work, args=(aud, k * 10 + t))
        for k, aud in enumerate(auditors)
        for t in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(archive.db)
    assert report.ok, report.problems
    assert report.records == 90 and report.chains == 3


def _tamper(archive: Archive, stmt) -> None:
    with archive.db.write_conn() as conn:
        conn.execute(stmt)


def _seq(archive: Archive, chain: str, seq: int):
    return (AuditRecord.chain == chain) & (AuditRecord.seq == seq)


def test_an_altered_record_is_detected(archive: Archive):
    aud = filled(archive)
    _tamper(
        archive,
        update(AuditRecord).where(_seq(archive, aud.chain, 3)).values(outcome="denied"),
    )
    report = verify(archive.db)
    assert not report.ok
    assert any("record 3: altered" in p for p in report.problems)


def test_an_altered_record_with_a_recomputed_hash_breaks_the_next_link(archive: Archive):
    from consent.audit import HASHED, record_hash

    aud = filled(archive)
    with archive.db.reading() as session:
        row = session.scalar(select(AuditRecord).where(_seq(archive, aud.chain, 2)))
        values = {name: getattr(row, name) for name in HASHED}
    values["principal_name"] = "someone else"
    _tamper(
        archive,
        update(AuditRecord)
        .where(_seq(archive, aud.chain, 2))
        .values(principal_name="someone else", hash=record_hash(values)),
    )
    problems = verify(archive.db).problems
    assert any("record 3: does not follow" in p for p in problems)


def test_a_deleted_record_is_detected(archive: Archive):
    aud = filled(archive)
    _tamper(archive, delete(AuditRecord).where(_seq(archive, aud.chain, 4)))
    problems = verify(archive.db).problems
    assert any("record(s) 4 missing" in p for p in problems)


def test_reordered_records_are_detected(archive: Archive):
    aud = filled(archive)
    # Swap the positions of records 2 and 5 (through a free seq to respect uniqueness).
    _tamper(archive, update(AuditRecord).where(_seq(archive, aud.chain, 2)).values(seq=-1))
    _tamper(archive, update(AuditRecord).where(_seq(archive, aud.chain, 5)).values(seq=2))
    _tamper(archive, update(AuditRecord).where(_seq(archive, aud.chain, -1)).values(seq=5))
    problems = verify(archive.db).problems
    assert problems
    assert any("record 2" in p for p in problems) and any("record 5" in p for p in problems)


def test_swapped_contents_are_detected(archive: Archive):
    aud = filled(archive)
    with archive.db.reading() as session:
        a = session.scalar(select(AuditRecord).where(_seq(archive, aud.chain, 2)))
        b = session.scalar(select(AuditRecord).where(_seq(archive, aud.chain, 3)))
    _tamper(
        archive,
        update(AuditRecord).where(AuditRecord.id == a.id).values(study_uid=b.study_uid),
    )
    _tamper(
        archive,
        update(AuditRecord).where(AuditRecord.id == b.id).values(study_uid=a.study_uid),
    )
    assert not verify(archive.db).ok


def test_a_truncated_tail_is_detected_only_with_signed_checkpoints(
    archive: Archive, tmp_path: Path
):
    key = load_or_create_signing_key(tmp_path / "keys" / "audit.pem")
    assert (tmp_path / "keys" / "audit.pem").stat().st_mode & 0o777 == 0o600
    public = load_public_key(public_key_pem(key).encode())
    checkpoints = tmp_path / "checkpoints.jsonl"
    aud = filled(archive)
    write_checkpoint(archive.db, key, checkpoints)
    aud.record(attempt("4.5.6"))
    write_checkpoint(archive.db, key, checkpoints)
    report = verify(archive.db, checkpoints, public)
    assert report.ok and report.checkpoints == 2
    # Cut the last two records: the chain alone still looks whole...
    _tamper(archive, delete(AuditRecord).where(AuditRecord.seq >= 6))
    assert verify(archive.db).ok
    # ...but the signed heads are gone.
    problems = verify(archive.db, checkpoints, public).problems
    assert any("record 7 signed in the checkpoint" in p for p in problems)
    # A whole chain deleted is caught the same way.
    _tamper(archive, delete(AuditRecord))
    assert not verify(archive.db, checkpoints, public).ok


def test_forged_checkpoints_are_rejected(archive: Archive, tmp_path: Path):
    key = load_or_create_signing_key(tmp_path / "a.pem")
    other = load_or_create_signing_key(tmp_path / "b.pem")
    checkpoints = tmp_path / "cp.jsonl"
    filled(archive)
    entry = write_checkpoint(archive.db, other, checkpoints)  # signed by another key
    problems = verify(archive.db, checkpoints, key.public_key()).problems
    assert problems == ["checkpoint line 1: bad signature or format"]
    checkpoints.write_text("")
    entry = write_checkpoint(archive.db, key, checkpoints)
    [chain] = entry["heads"]
    entry["heads"][chain][0] = 1
    checkpoints.write_text(json.dumps(entry) + "\n")
    assert not verify(archive.db, checkpoints, key.public_key()).ok


def test_header_values_cannot_forge_log_lines_or_exports(archive: Archive, caplog):
    caplog.set_level(logging.INFO, logger="studybridge.audit")
    evil_principal = Principal(kind=Kind.STAFF, id=1, name=EVIL, institution=EVIL)
    aud = Auditor(archive.db)
    aud.record(attempt(principal=evil_principal, detail=f"PatientName={EVIL}", purpose="TREAT"))
    lines = [r.getMessage() for r in caplog.records if r.name == "studybridge.audit"]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\r" not in lines[0] and "\x1b" not in lines[0]
    assert "\\x0d\\x0a" in lines[0]
    [row] = records(archive)
    # Stored as received (NUL, which PostgreSQL cannot hold, as the text \x00).
    assert row.principal_name == EVIL.replace("\x00", "\\x00")
    xml = to_dicom_xml(row)
    assert "\r" not in xml and "\n" not in xml and "\x00" not in xml
    parsed = ET.fromstring(xml)
    assert parsed.tag == "AuditMessage"
    assert len(parsed.findall("ActiveParticipant")) == 1
    query = parsed.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert base64.b64decode(query.text).decode() == f"PatientName={row.principal_name}"
    fhir = json.dumps(to_fhir(row))
    assert "\r" not in fhir and "\n" not in fhir
    assert verify(archive.db).ok


def test_escape_text():
    assert escape_text("a\\b\r\n\tc\u2028") == "a\\\\b\\x0d\\x0a\\x09c\\u2028"
    assert escape_text("홍^길동") == "홍^길동"


def test_dicom_and_fhir_exports(archive: Archive):
    aud = Auditor(archive.db)
    aud.record(attempt("1.2.840.1", operation="download", outcome="denied", client="10.0.0.1"))
    aud.record(attempt("", operation="search", detail="StudyDate=2024"))
    rows = records(archive)
    msg = ET.fromstring(to_dicom_xml(rows[0]))
    event = msg.find("EventIdentification")
    assert event.get("EventOutcomeIndicator") == "4" and event.get("EventActionCode") == "R"
    assert event.find("EventID").get("csd-code") == "110104"
    assert msg.find("ActiveParticipant").get("NetworkAccessPointID") == "10.0.0.1"
    obj = msg.find("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == "1.2.840.1"
    assert obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    fhir = to_fhir(rows[0])
    assert fhir["resourceType"] == "AuditEvent" and fhir["outcome"] == "4"
    assert fhir["entity"][0]["what"]["identifier"]["value"] == "urn:oid:1.2.840.1"
    search = ET.fromstring(to_dicom_xml(rows[1]))
    assert search.find("EventIdentification/EventID").get("csd-code") == "110112"
    assert to_fhir(rows[1])["action"] == "E"


def test_a_failing_write_refuses_instead_of_losing_the_record(archive: Archive):
    aud = Auditor(archive.db)
    aud.record(attempt())
    too_long = Principal(kind=Kind.STAFF, id=1, name="x", token_id=1)
    with archive.db.write_conn() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_records RENAME TO audit_records_gone")
    with pytest.raises(Exception):
        aud.record(attempt(principal=too_long))
    with archive.db.write_conn() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_records_gone RENAME TO audit_records")
    # The chain did not advance: the next record follows the last one written.
    aud.record(attempt(principal=too_long))
    assert verify(archive.db).ok
    with archive.db.reading() as session:
        assert session.scalar(select(func.count()).select_from(AuditRecord)) == 2


def test_render_line_is_one_line():
    values = {
        "at": utcnow(),
        "chain": "c",
        "seq": 1,
        "principal_kind": "staff",
        "principal_id": "1",
        "principal_name": "a\nb",
        "institution": "",
        "door": "d",
        "operation": "view",
        "study_uid": "1.2",
        "outcome": "allowed",
        "client": "",
        "count": 1,
        "purpose": "",
        "break_glass": True,
        "detail": "x\ry",
    }
    line = render_line(values)
    assert "\n" not in line and "\r" not in line and "BREAK-GLASS" in line
