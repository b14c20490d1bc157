"""Audit records to a syslog collector over TLS (RFC 5425), as DICOM audit messages.

IHE ATNA's transport: each record becomes a DICOM audit message (PS3.15 A.5, the XML
of ``consent.audit.to_dicom_xml``) carried as the MSG of an RFC 5424 syslog message
(facility 10 security/authorization, severity 5 notice, MSGID ``DICOM+RFC3881``,
UTF-8 with a BOM), framed by octet counting (``MSG-LEN SP SYSLOG-MSG``) on a TLS
connection that verifies the collector's certificate (and presents ours if it
asks).

``ship`` sends every record not sent yet and remembers, per audit chain, the last
``seq`` sent (a small JSON file beside the checkpoints, replaced atomically), so a
record is sent at least once: a failure leaves the cursor where it was, and the next
run sends again from there. Chains are append-only, so ``seq`` order is write order.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, not_, or_, select

from consent.audit import masked, to_dicom_xml
from consent.models import AuditRecord
from gateway.archive.db import Database

PRI = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice)
MSGID = "DICOM+RFC3881"
APP_NAME = "studybridge"
BOM = b"\xef\xbb\xbf"
BATCH = 500


@dataclass(frozen=True)
class SyslogTLS:
    """Where to send, and how to trust the collector (RFC 5425 section 5)."""

    host: str
    port: int = 6514
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout: float = 10.0

    def context(self) -> ssl.SSLContext:
        # The collector is verified (hostname and chain): audit trails must not go to
        # whoever answers. With no CA file, the system's trust store.
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(
                str(self.cert_file), str(self.key_file) if self.key_file else None
            )
        return context

    def send(self, frames: Iterable[bytes]) -> int:
        """Open one connection, send every frame, close; the number sent."""
        sent = 0
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        with raw, self.context().wrap_socket(raw, server_hostname=self.host) as tls:
            for data in frames:
                tls.sendall(data)
                sent += 1
            # Close the TLS session properly (close_notify), reading what the collector
            # sent meanwhile (TLS 1.3 session tickets): closing a socket with unread
            # data resets the connection, and the collector may lose the last frames.
            with contextlib.suppress(ssl.SSLError, OSError):
                tls.unwrap()
        return sent


def frame(message: str, at: dt.datetime, hostname: str | None = None) -> bytes:
    """One RFC 5424 message in RFC 5425 octet-counting framing."""
    host = (hostname or socket.gethostname() or "-")[:255].replace(" ", "-")
    stamp = at.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = f"<{PRI}>1 {stamp} {host} {APP_NAME} {os.getpid()} {MSGID} - "
    payload = header.encode("ascii", "replace") + BOM + message.encode("utf-8")
    return f"{len(payload)} ".encode() + payload


def ship(db: Database, target: SyslogTLS, cursor_file: Path) -> int:
    """Send the records not sent yet; the number sent."""
    cursor: dict[str, int] = {}
    if cursor_file.exists():
        cursor = {str(k): int(v) for k, v in json.loads(cursor_file.read_text()).items()}
    total = 0
    while True:
        rows = _unsent(db, cursor)
        if not rows:
            return total
        # The messages leave the host: national identification numbers never do.
        target.send(frame(to_dicom_xml(masked(row)), row.at) for row in rows)
        for row in rows:
            cursor[row.chain] = max(cursor.get(row.chain, 0), row.seq)
        _save(cursor_file, cursor)
        total += len(rows)


def _unsent(db: Database, cursor: dict[str, int]) -> list[AuditRecord]:
    sent = [and_(AuditRecord.chain == c, AuditRecord.seq <= s) for c, s in cursor.items()]
    with db.reading() as session:
        stmt = select(AuditRecord).order_by(AuditRecord.chain, AuditRecord.seq).limit(BATCH)
        if sent:
            stmt = stmt.where(not_(or_(*sent)))
        rows = list(session.scalars(stmt))
        session.expunge_all()
        return rows


def _save(path: Path, cursor: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cursor, sort_keys=True))
    os.replace(tmp, path)
