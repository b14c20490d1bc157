"""The audit trail: every access attempt, allowed or denied, append-only and hash-chained.

Design:

- **Chains per writer.** Each ``Auditor`` (one per process) appends to a chain of its
  own, named for host, process and a random suffix, numbering its records 1, 2, 3...
  Record n's hash is SHA-256 over record n-1's hash and every column of record n, so
  gateways and workers never wait for one global "last hash" row or lock; within a
  process a lock is held over one short INSERT.
- **Aggregation.** The first attempt of a (principal, session token, door, operation,
  study, outcome, client) within the window (default 5 minutes) is written at once;
  repeats (a viewer's hundreds of frame requests) are counted in memory and written
  as one record with their count when the window closes (``flush``). Nothing an
  attacker does is ever invisible: at least its first attempt is on disk before it
  is answered.
- **Fail closed.** If a record cannot be written the exception reaches the door,
  which refuses the request.
- **Verification.** ``verify`` walks every chain and reports altered records (hash),
  deleted or reordered ones (sequence and link), and, given signed checkpoints kept
  outside the database, a truncated tail or a vanished chain. Checkpoints
  (``write_checkpoint``) list every chain's head (seq, hash) signed with Ed25519;
  ship the file somewhere the database's administrators cannot rewrite.
- **Escaping.** Values may come from DICOM headers or request parameters: in line
  oriented renderings (logs, text export, syslog) control characters and backslashes
  are escaped, so a PatientName holding CR/LF cannot forge a record; XML and JSON
  exports escape by construction (control characters included).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import func, insert, inspect, select

from consent.models import AuditRecord
from consent.principals import Principal
from gateway.archive.db import Database
from gateway.archive.models import utcnow
from gateway.ops import national_ids

log = logging.getLogger("studybridge.audit")

# The columns a record's hash covers, in this order.
HASHED = (
    "chain",
    "seq",
    "prev_hash",
    "at",
    "last_at",
    "count",
    "principal_kind",
    "principal_id",
    "principal_name",
    "institution",
    "door",
    "operation",
    "study_uid",
    "purpose",
    "outcome",
    "client",
    "break_glass",
    "detail",
)
_LIMITS = {
    "principal_name": 200,
    "institution": 64,
    "client": 64,
    "study_uid": 64,
    "purpose": 16,
    "door": 16,
    "operation": 32,
    "outcome": 16,
    "detail": 2000,
}


def genesis_hash(chain: str) -> str:
    return hashlib.sha256(b"studybridge audit chain\x00" + chain.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


def record_hash(values: dict[str, Any]) -> str:
    payload = json.dumps(
        [_canonical(values[name]) for name in HASHED], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def escape_text(value: str) -> str:
    """``value`` safe for one line of a log: control characters and backslash escaped."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0 or ch in "\u2028\u2029\u0085":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class Attempt:
    """One access attempt as a door reports it."""

    principal: Principal
    door: str
    operation: str
    outcome: str  # allowed | denied | error
    study_uid: str = ""
    purpose: str = ""
    client: str = ""
    break_glass: bool = False
    detail: str = ""

    def key(self) -> tuple[Any, ...]:
        p = self.principal
        return (
            p.kind,
            p.id,
            p.token_id,
            self.door,
            self.operation,
            self.study_uid,
            self.outcome,
            self.client,
            self.purpose,
            self.break_glass,
            self.detail,
        )


@dataclass
class _Window:
    attempt: Attempt
    ends: dt.datetime
    repeats: int = 0
    first: dt.datetime | None = None
    last: dt.datetime | None = None


class Auditor:
    """Appends this process's records to its own chain, aggregating repeats."""

    def __init__(
        self, db: Database, *, window_seconds: float = 300.0, chain: str | None = None
    ) -> None:
        self.db = db
        self.window = dt.timedelta(seconds=window_seconds)
        host = socket.gethostname()[:24]
        self.chain = chain or f"{host}-{os.getpid()}-{secrets.token_hex(6)}"
        self._seq = 0
        self._prev = genesis_hash(self.chain)
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[Any, ...], _Window] = OrderedDict()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def record(self, attempt: Attempt, now: dt.datetime | None = None) -> None:
        now = now or utcnow()
        key = attempt.key()
        with self._lock:
            self._flush_expired(now)
            window = self._windows.get(key)
            if window is not None and now < window.ends:
                window.repeats += 1
                window.first = window.first or now
                window.last = now
                return
            self._append(attempt, now, now, 1)
            self._windows[key] = _Window(attempt, now + self.window)

    def flush(self, now: dt.datetime | None = None, *, everything: bool = True) -> None:
        """Write the repeat counts of closed windows (all windows with ``everything``)."""
        with self._lock:
            if everything:
                while self._windows:
                    _key, window = self._windows.popitem(last=False)
                    self._write_repeats(window)
            else:
                self._flush_expired(now or utcnow())

    def start_flusher(self, interval: float = 30.0) -> None:
        """Flush closed windows every ``interval`` seconds in a daemon thread."""

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.flush(everything=False)
                except Exception:
                    log.exception("audit flush failed; will retry")

        self._flusher = threading.Thread(target=run, name="audit-flush", daemon=True)
        self._flusher.start()

    def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
        self.flush()

    # -- internals (lock held) ----------------------------------------------------------
    def _flush_expired(self, now: dt.datetime) -> None:
        # Windows have one length, so they close in the order they opened.
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.ends > now:
                break
            del self._windows[key]
            self._write_repeats(window)

    def _write_repeats(self, window: _Window) -> None:
        if window.repeats and window.first and window.last:
            self._append(window.attempt, window.first, window.last, window.repeats)

    def _append(self, attempt: Attempt, at: dt.datetime, last: dt.datetime, count: int) -> None:
        p = attempt.principal
        values: dict[str, Any] = {
            "chain": self.chain,
            "seq": self._seq + 1,
            "prev_hash": self._prev,
            "at": at,
            "last_at": last,
            "count": count,
            "principal_kind": p.kind.value,
            "principal_id": p.audit_id,
            "principal_name": p.name,
            "institution": p.institution,
            "door": attempt.door,
            "operation": attempt.operation,
            "study_uid": attempt.study_uid,
            "purpose": attempt.purpose,
            "outcome": attempt.outcome,
            "client": attempt.client,
            "break_glass": attempt.break_glass,
            "detail": attempt.detail,
        }
        for name, limit in _LIMITS.items():
            # PostgreSQL text cannot hold NUL: keep it visible as the escape text uses.
            values[name] = values[name].replace("\x00", "\\x00")[:limit]
        values["hash"] = record_hash(values)
        with self.db.write_conn() as conn:
            conn.execute(insert(AuditRecord), [values])
        self._seq += 1
        self._prev = values["hash"]
        log.info("%s", render_line(values))


def render_line(values: dict[str, Any]) -> str:
    """One record as one log line (every free-text value escaped)."""
    fields = [
        _canonical(values["at"]),
        f"chain={values['chain']}#{values['seq']}",
        f"{values['principal_kind']}:{values['principal_id']}",
        f"name={escape_text(values['principal_name'])!s}",
        f"institution={escape_text(values['institution'])}",
        f"door={escape_text(values['door'])}",
        f"op={escape_text(values['operation'])}",
        f"study={escape_text(values['study_uid'])}",
        f"outcome={escape_text(values['outcome'])}",
        f"client={escape_text(values['client'])}",
        f"count={values['count']}",
    ]
    if values["purpose"]:
        fields.append(f"purpose={escape_text(values['purpose'])}")
    if values["break_glass"]:
        fields.append("BREAK-GLASS")
    if values["detail"]:
        fields.append(f"detail={escape_text(values['detail'])}")
    return "audit " + " ".join(fields)


def row_values(row: AuditRecord) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in HASHED}
    values["hash"] = row.hash
    return values


# -- verification ----------------------------------------------------------------------
@dataclass
class VerifyReport:
    chains: int = 0
    records: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    db: Database,
    checkpoint_file: Path | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> VerifyReport:
    """Check every chain; with checkpoints, also that no signed head has gone."""
    report = VerifyReport()
    heads: dict[str, tuple[int, str]] = {}
    hashes_at: dict[tuple[str, int], str] = {}
    wanted: set[tuple[str, int]] = set()
    checkpoints = []
    if checkpoint_file is not None:
        if public_key is None:
            raise ValueError("verifying checkpoints needs the public key")
        checkpoints = list(_read_checkpoints(checkpoint_file, public_key, report))
        wanted = {(c, h[0]) for cp in checkpoints for c, h in cp["heads"].items()}
    chain = None
    expected = 1
    prev = ""
    for row in _rows(db):
        values = row_values(row)
        if row.chain != chain:
            chain = row.chain
            report.chains += 1
            expected, prev = 1, genesis_hash(chain)
        report.records += 1
        where = f"chain {chain} record {row.seq}"
        if row.seq != expected:
            if row.seq > expected:
                gone = f"{expected}" if row.seq == expected + 1 else f"{expected}-{row.seq - 1}"
                report.problems.append(f"chain {chain}: record(s) {gone} missing (deleted)")
            else:
                report.problems.append(f"{where}: out of order")
        if row.prev_hash != prev:
            report.problems.append(f"{where}: does not follow the previous record")
        if record_hash(values) != row.hash:
            report.problems.append(f"{where}: altered (hash mismatch)")
        if (chain, row.seq) in wanted:
            hashes_at[(chain, row.seq)] = row.hash
        heads[chain] = (row.seq, row.hash)
        expected = row.seq + 1
        prev = row.hash
    for cp in checkpoints:
        for cname, (seq, digest) in cp["heads"].items():
            found = hashes_at.get((cname, seq))
            if found is None:
                report.problems.append(
                    f"chain {cname}: record {seq} signed in the checkpoint of {cp['at']} "
                    "is missing (truncated or deleted)"
                )
            elif found != digest:
                report.problems.append(
                    f"chain {cname}: record {seq} differs from the checkpoint of {cp['at']}"
                )
    return report


def _rows(db: Database) -> Iterator[AuditRecord]:
    with db.reading(stream=True) as session:
        stmt = (
            select(AuditRecord)
            .order_by(AuditRecord.chain, AuditRecord.seq, AuditRecord.id)
            .execution_options(yield_per=2000)
        )
        yield from session.scalars(stmt)


# -- signed checkpoints ------------------------------------------------------------------
def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def public_key_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def chain_heads(db: Database) -> dict[str, tuple[int, str]]:
    with db.reading() as session:
        last = (
            select(AuditRecord.chain, func.max(AuditRecord.seq).label("seq"))
            .group_by(AuditRecord.chain)
            .subquery()
        )
        rows = session.execute(
            select(AuditRecord.chain, AuditRecord.seq, AuditRecord.hash).join(
                last, (AuditRecord.chain == last.c.chain) & (AuditRecord.seq == last.c.seq)
            )
        ).all()
    return {chain: (seq, digest) for chain, seq, digest in rows}


def _signed_payload(at: str, heads: dict[str, Any]) -> bytes:
    return json.dumps({"at": at, "heads": heads}, sort_keys=True, separators=(",", ":")).encode()


def write_checkpoint(db: Database, key: Ed25519PrivateKey, path: Path) -> dict[str, Any]:
    """Append one signed checkpoint (every chain's head) to ``path`` (JSON lines)."""
    heads = {c: [seq, digest] for c, (seq, digest) in sorted(chain_heads(db).items())}
    at = _canonical(utcnow())
    signature = key.sign(_signed_payload(at, heads))
    entry = {"at": at, "heads": heads, "sig": base64.b64encode(signature).decode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return entry


def _read_checkpoints(
    path: Path, public_key: Ed25519PublicKey, report: VerifyReport
) -> Iterator[dict[str, Any]]:
    if not path.exists():
        report.problems.append(f"checkpoint file {path} does not exist")
        return
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            signature = base64.b64decode(entry["sig"])
            public_key.verify(signature, _signed_payload(entry["at"], entry["heads"]))
        except (ValueError, KeyError, TypeError, InvalidSignature):
            report.problems.append(f"checkpoint line {number}: bad signature or format")
            continue
        report.checkpoints += 1
        entry["heads"] = {c: (int(h[0]), str(h[1])) for c, h in entry["heads"].items()}
        yield entry


# -- exports -------------------------------------------------------------------------------
def iter_records(
    db: Database,
    *,
    since: dt.datetime | None = None,
    study_uids: list[str] | None = None,
) -> Iterator[AuditRecord]:
    with db.reading(stream=True) as session:
        stmt = select(AuditRecord).order_by(AuditRecord.at, AuditRecord.id)
        if since is not None:
            stmt = stmt.where(AuditRecord.at >= since)
        if study_uids is not None:
            stmt = stmt.where(AuditRecord.study_uid.in_(study_uids))
        yield from session.scalars(stmt.execution_options(yield_per=1000))


# DICOM event (PS3.16 CID 400 codes) and action per operation.
_EVENTS = {
    "search": ("110112", "Query", "E"),
    "view": ("110103", "DICOM Instances Accessed", "R"),
    "download": ("110104", "DICOM Instances Transferred", "R"),
    "store": ("110104", "DICOM Instances Transferred", "C"),
}
_DEFAULT_EVENT = ("110113", "Security Alert", "E")
_OUTCOMES = {"allowed": "0", "denied": "4", "error": "8"}
_DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _xml_safe(value: str) -> str:
    # XML 1.0 cannot carry most control characters at all; escape them like logs do.
    return escape_text(value)


def masked(row: AuditRecord) -> AuditRecord:
    """A detached copy of ``row`` for export, with national identification numbers
    masked in every text value (before any encoding: base64 query details too). The
    stored record, and so its hash, stays as written."""
    values = {attr.key: getattr(row, attr.key) for attr in inspect(AuditRecord).column_attrs}
    return AuditRecord(
        **{k: national_ids.mask(v) if isinstance(v, str) else v for k, v in values.items()}
    )


def to_dicom_xml(row: AuditRecord, source_id: str = "studybridge") -> str:
    """One record as a DICOM audit message (PS3.15 A.5, RFC 3881 shaped)."""
    code, meaning, action = _EVENTS.get(row.operation, _DEFAULT_EVENT)
    msg = ET.Element("AuditMessage")
    event = ET.SubElement(
        msg,
        "EventIdentification",
        EventActionCode=action,
        EventDateTime=_canonical(row.at),
        EventOutcomeIndicator=_OUTCOMES.get(row.outcome, "8"),
    )
    ET.SubElement(event, "EventID", {"csd-code": code, "codeSystemName": "DCM"}).set(
        "originalText", meaning
    )
    # Which door and how many attempts this record stands for (aggregated repeats).
    ET.SubElement(
        event, "EventTypeCode", {"csd-code": _xml_safe(row.door), "codeSystemName": "studybridge"}
    ).set("originalText", _xml_safe(f"{row.door} {row.operation} x{row.count}"))
    if row.purpose:
        ET.SubElement(
            event,
            "PurposeOfUse",
            {"csd-code": _xml_safe(row.purpose), "codeSystemName": "v3-ActReason"},
        ).set("originalText", _xml_safe(row.purpose))
    requestor = ET.SubElement(
        msg,
        "ActiveParticipant",
        UserID=f"{row.principal_kind}:{row.principal_id}",
        AlternativeUserID=_xml_safe(row.institution),
        UserName=_xml_safe(row.principal_name),
        UserIsRequestor="true",
        NetworkAccessPointID=_xml_safe(row.client),
        NetworkAccessPointTypeCode="2",
    )
    ET.SubElement(requestor, "RoleIDCode", {"csd-code": "110153", "codeSystemName": "DCM"}).set(
        "originalText", "Source Role ID"
    )
    ET.SubElement(msg, "AuditSourceIdentification", AuditSourceID=_xml_safe(source_id))
    if row.study_uid:
        obj = ET.SubElement(
            msg,
            "ParticipantObjectIdentification",
            ParticipantObjectID=_xml_safe(row.study_uid),
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="3",
        )
        ET.SubElement(
            obj, "ParticipantObjectIDTypeCode", {"csd-code": "110180", "codeSystemName": "DCM"}
        ).set("originalText", "Study Instance UID")
    if row.detail:
        obj = ET.SubElement(
            msg,
            "ParticipantObjectIdentification",
            ParticipantObjectID=_xml_safe(row.door),
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="24",
        )
        ET.SubElement(
            obj, "ParticipantObjectIDTypeCode", {"csd-code": "110181", "codeSystemName": "DCM"}
        ).set("originalText", "SOP Class UID")
        # Base64 by definition (A.5.2.5): no character of it can break the message.
        ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(
            row.detail.encode("utf-8", "surrogatepass")
        ).decode()
    return ET.tostring(msg, encoding="unicode")


def to_fhir(row: AuditRecord, source_id: str = "studybridge") -> dict[str, Any]:
    """One record as a FHIR R4 AuditEvent resource."""
    code, meaning, action = _EVENTS.get(row.operation, _DEFAULT_EVENT)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"{row.chain}-{row.seq}",
        "type": {"system": _DCM, "code": code, "display": meaning},
        "subtype": [
            {"system": "urn:studybridge:operation", "code": row.operation},
            {"system": "urn:studybridge:door", "code": row.door},
        ],
        "action": action,
        "period": {"start": _canonical(row.at), "end": _canonical(row.last_at)},
        "recorded": _canonical(row.at),
        "outcome": _OUTCOMES.get(row.outcome, "8"),
        "outcomeDesc": row.outcome,
        "agent": [
            {
                "who": {
                    "identifier": {
                        "system": "urn:studybridge:principal",
                        "value": f"{row.principal_kind}:{row.principal_id}",
                    },
                    "display": row.principal_name,
                },
                "requestor": True,
                "network": {"address": row.client, "type": "2"},
            }
        ],
        "source": {"observer": {"display": source_id}},
        "extension": [
            {"url": "urn:studybridge:audit:count", "valueInteger": row.count},
            {"url": "urn:studybridge:audit:hash", "valueString": row.hash},
        ],
    }
    if row.institution:
        resource["agent"][0]["who"]["display"] = f"{row.principal_name} ({row.institution})"
    if row.purpose:
        resource["purposeOfEvent"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": row.purpose,
                    }
                ]
            }
        ]
    if row.break_glass:
        resource["extension"].append(
            {"url": "urn:studybridge:audit:break-glass", "valueBoolean": True}
        )
    if row.study_uid:
        resource["entity"] = [
            {
                "what": {
                    "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{row.study_uid}"}
                },
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "3",
                },
            }
        ]
    if row.detail:
        resource.setdefault("entity", []).append(
            {
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "24",
                },
                "query": base64.b64encode(row.detail.encode("utf-8", "surrogatepass")).decode(),
            }
        )
    return resource
