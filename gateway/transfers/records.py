"""Transfer records: register, find, list, and move through their statuses.

Statuses: ``open`` (registered, nothing arrived yet), ``receiving`` (instances
arrive), ``verifying`` (being finalized), then ``complete`` (everything expected is
held) or ``incomplete`` (something is missing; more may still arrive, and the
transfer can be finalized again). Arrivals are tagged to transfers in these
statuses except ``complete``.

Who may do this: for now only the operator, through the CLI. When the consent
layer lands, every function here that changes a transfer is an operator action to
check and audit (see docs/transfers.md).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from gateway.archive.db import Database
from gateway.archive.errors import IndexUnavailable
from gateway.archive.models import utcnow
from gateway.peers import PeerError, validate_ae_title
from gateway.transfers.models import Transfer

REASONS = ("closure", "suspension")
STATUSES = ("open", "receiving", "verifying", "complete", "incomplete")
# Statuses in which arrivals are still tagged to the transfer.
ACCEPTING = ("open", "receiving", "verifying", "incomplete")


class TransferError(ValueError):
    """A transfer cannot be created, found or changed as asked."""


@dataclass(frozen=True)
class TransferInfo:
    id: int
    institution: str
    reason: str
    effective_on: dt.date | None
    ends_on: dt.date | None
    source_ae: str
    issuer: str
    custodian_name: str
    custodian_contact: str
    notes: str
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime
    finalized_at: dt.datetime | None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "institution": self.institution,
            "reason": self.reason,
            "effective_on": self.effective_on.isoformat() if self.effective_on else None,
            "ends_on": self.ends_on.isoformat() if self.ends_on else None,
            "source_ae": self.source_ae,
            "issuer": self.issuer,
            "custodian_name": self.custodian_name,
            "custodian_contact": self.custodian_contact,
            "notes": self.notes,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finalized_at": self.finalized_at.isoformat() if self.finalized_at else None,
        }


def _info(row: Transfer) -> TransferInfo:
    return TransferInfo(
        id=row.id,
        institution=row.institution,
        reason=row.reason,
        effective_on=row.effective_on,
        ends_on=row.ends_on,
        source_ae=row.source_ae,
        issuer=row.issuer,
        custodian_name=row.custodian_name,
        custodian_contact=row.custodian_contact,
        notes=row.notes,
        status=row.status,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finalized_at=row.finalized_at,
    )


def create_transfer(
    db: Database,
    *,
    institution: str,
    reason: str,
    issuer: str,
    source_ae: str = "",
    effective_on: dt.date | None = None,
    ends_on: dt.date | None = None,
    custodian_name: str = "",
    custodian_contact: str = "",
    notes: str = "",
) -> TransferInfo:
    """Register a transfer. One open transfer per source AE title at a time."""
    institution = institution.strip()
    if not institution:
        raise TransferError("a transfer needs the institution's name")
    if reason not in REASONS:
        raise TransferError(f"reason must be one of {', '.join(REASONS)}")
    issuer = issuer.strip()
    if not issuer or len(issuer) > 64:
        raise TransferError("a transfer needs one Issuer of Patient ID (1-64 characters)")
    if ends_on is not None and reason != "suspension":
        raise TransferError("only a suspension has an end date")
    if ends_on is not None and effective_on is not None and ends_on < effective_on:
        raise TransferError("the suspension ends before it starts")
    if source_ae:
        try:
            source_ae = validate_ae_title(source_ae)
        except PeerError as exc:
            raise TransferError(str(exc)) from exc
    now = utcnow()
    with db.writing() as session:
        if source_ae:
            clash = session.scalar(
                select(Transfer.id).where(
                    Transfer.source_ae == source_ae, Transfer.status.in_(ACCEPTING)
                )
            )
            if clash is not None:
                raise TransferError(
                    f"transfer {clash} is still open for AE {source_ae}; finalize it first"
                )
        row = Transfer(
            institution=institution,
            reason=reason,
            effective_on=effective_on,
            ends_on=ends_on,
            source_ae=source_ae,
            issuer=issuer,
            custodian_name=custodian_name,
            custodian_contact=custodian_contact,
            notes=notes,
            status="open",
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        return _info(row)


def get_transfer(db: Database, transfer_id: int) -> TransferInfo:
    with db.reading() as session:
        row = session.get(Transfer, transfer_id)
        if row is None:
            raise TransferError(f"no transfer {transfer_id}")
        return _info(row)


def list_transfers(db: Database) -> list[TransferInfo]:
    with db.reading() as session:
        return [_info(r) for r in session.scalars(select(Transfer).order_by(Transfer.id))]


def set_status(
    db: Database, transfer_id: int, status: str, *, finalized: bool = False
) -> TransferInfo:
    if status not in STATUSES:
        raise TransferError(f"unknown status {status!r}")
    now = utcnow()
    with db.writing() as session:
        row = session.get(Transfer, transfer_id)
        if row is None:
            raise TransferError(f"no transfer {transfer_id}")
        row.status = status
        row.updated_at = now
        if finalized:
            row.finalized_at = now
        session.flush()
        return _info(row)


def mark_receiving(db: Database, transfer_id: int) -> None:
    """First arrival: ``open`` becomes ``receiving`` (other statuses stay)."""
    with db.writing() as session:
        session.execute(
            update(Transfer)
            .where(Transfer.id == transfer_id, Transfer.status == "open")
            .values(status="receiving", updated_at=utcnow())
        )


def accepting_transfer(db: Database, transfer_id: int) -> TransferInfo:
    """The transfer, if instances may still be tagged to it; else TransferError."""
    info = get_transfer(db, transfer_id)
    if info.status not in ACCEPTING:
        raise TransferError(f"transfer {transfer_id} is {info.status}: it takes no more instances")
    return info


class TransferBindings:
    """Which open transfer a calling AE title delivers to, cached for a few seconds.

    The DICOM door asks this for every C-STORE; the answer changes rarely (a
    transfer opened or finalized), so a lookup per AE every few seconds is enough.
    """

    def __init__(self, db: Database, cache_seconds: float = 5.0) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, TransferInfo | None]] = {}
        self._lock = threading.Lock()

    def for_ae(self, ae_title: str) -> TransferInfo | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ae_title)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        try:
            with self.db.reading() as session:
                row = session.scalar(
                    select(Transfer)
                    .where(Transfer.source_ae == ae_title, Transfer.status.in_(ACCEPTING))
                    .order_by(Transfer.id.desc())
                )
                info = _info(row) if row is not None else None
        except (OperationalError, InterfaceError) as exc:
            # The index is away: the C-STORE gets a retryable failure (0xA701).
            raise IndexUnavailable(f"index unavailable: {exc.__class__.__name__}") from exc
        if info is not None and info.status == "open":
            mark_receiving(self.db, info.id)
        with self._lock:
            self._cache[ae_title] = (now, info)
        return info
