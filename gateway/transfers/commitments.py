"""Storage Commitment results kept in the index: what was confirmed, when, to whom.

``gateway.dimse.commitment`` answers the requests; this module keeps each answer
(``commitment_requests``, one ``commitment_items`` row per instance: committed, or
failed with its Failure Reason) before the report is sent, then how the report went
(same or new association, to which AE and address, when, or why it could not be
sent). So the clinic's confirmation survives a restart, and the transfer report
lists it: a closing clinic deletes its copies on the strength of these reports.

A request is filed under the latest transfer whose source AE title is the
requester's (any status: clinics often ask after the transfer was finalized).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select

from gateway.archive.db import Database
from gateway.archive.models import utcnow
from gateway.transfers.models import CommitmentItem, CommitmentRequest, Transfer

_BATCH = 1000


@dataclass(frozen=True)
class CommitmentFailure:
    sop_uid: str
    sop_class_uid: str
    failure_reason: int | None


@dataclass
class CommitmentInfo:
    id: int
    transaction_uid: str
    calling_ae: str
    transfer_id: int | None
    requested_at: dt.datetime
    event_type: int
    committed: int
    failed: int
    report_status: str
    reported_how: str
    reported_to: str
    reported_at: dt.datetime | None
    report_error: str
    failures: list[CommitmentFailure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "transaction_uid": self.transaction_uid,
            "calling_ae": self.calling_ae,
            "transfer_id": self.transfer_id,
            "requested_at": self.requested_at.isoformat(),
            "event_type": self.event_type,
            "committed": self.committed,
            "failed": self.failed,
            "report": {
                "status": self.report_status,
                "how": self.reported_how,
                "to": self.reported_to,
                "at": self.reported_at.isoformat() if self.reported_at else None,
                "error": self.report_error,
            },
            "failures": [
                {
                    "sop_uid": f.sop_uid,
                    "sop_class_uid": f.sop_class_uid,
                    "failure_reason": f.failure_reason,
                }
                for f in self.failures
            ],
        }


def record_result(
    db: Database,
    transaction_uid: str,
    calling_ae: str,
    event_type: int,
    committed: list[tuple[str, str]],
    failed: list[tuple[str, str, int]],
) -> int:
    """Keep a computed result: (class, instance) committed, (class, instance, reason)
    failed. Returns the request's id (for ``record_report``)."""
    now = utcnow()
    with db.writing() as session:
        transfer_fk = session.scalar(
            select(Transfer.id)
            .where(Transfer.source_ae == calling_ae)
            .order_by(Transfer.id.desc())
            .limit(1)
        )
        row = CommitmentRequest(
            transaction_uid=transaction_uid,
            calling_ae=calling_ae,
            transfer_fk=transfer_fk,
            requested_at=now,
            event_type=event_type,
            committed=len(committed),
            failed=len(failed),
            report_status="pending",
            reported_how="",
            reported_to="",
            report_error="",
        )
        session.add(row)
        session.flush()
        items: list[dict[str, Any]] = [
            {
                "request_fk": row.id,
                "sop_class_uid": c,
                "sop_uid": s,
                "committed": True,
                "failure_reason": None,
            }
            for c, s in committed
        ]
        items += [
            {
                "request_fk": row.id,
                "sop_class_uid": c,
                "sop_uid": s,
                "committed": False,
                "failure_reason": reason,
            }
            for c, s, reason in failed
        ]
        for start in range(0, len(items), _BATCH):
            session.execute(insert(CommitmentItem), items[start : start + _BATCH])
        return row.id


def record_report(db: Database, request_id: int, *, how: str, to: str, error: str = "") -> None:
    """How the report went: ``how`` is same-association, new-association or '' (unsent)."""
    with db.writing() as session:
        row = session.get(CommitmentRequest, request_id)
        if row is None:
            return
        row.report_status = "sent" if how else "unsent"
        row.reported_how = how
        row.reported_to = to[:500]
        row.reported_at = utcnow() if how else None
        row.report_error = error[:2000]


def commitments(
    db: Database, *, transfer_id: int | None = None, transaction_uid: str | None = None
) -> list[CommitmentInfo]:
    """Requests (of a transfer, or with a Transaction UID), oldest first, with the
    instances that failed."""
    stmt = select(CommitmentRequest).order_by(CommitmentRequest.id)
    if transfer_id is not None:
        stmt = stmt.where(CommitmentRequest.transfer_fk == transfer_id)
    if transaction_uid is not None:
        stmt = stmt.where(CommitmentRequest.transaction_uid == transaction_uid)
    with db.reading() as session:
        infos = [
            CommitmentInfo(
                id=r.id,
                transaction_uid=r.transaction_uid,
                calling_ae=r.calling_ae,
                transfer_id=r.transfer_fk,
                requested_at=r.requested_at,
                event_type=r.event_type,
                committed=r.committed,
                failed=r.failed,
                report_status=r.report_status,
                reported_how=r.reported_how,
                reported_to=r.reported_to,
                reported_at=r.reported_at,
                report_error=r.report_error,
            )
            for r in session.scalars(stmt)
        ]
        by_id = {i.id: i for i in infos}
        if by_id:
            for item in session.scalars(
                select(CommitmentItem)
                .where(
                    CommitmentItem.request_fk.in_(list(by_id)),
                    CommitmentItem.committed.is_(False),
                )
                .order_by(CommitmentItem.id)
            ):
                by_id[item.request_fk].failures.append(
                    CommitmentFailure(item.sop_uid, item.sop_class_uid, item.failure_reason)
                )
    return infos


def committed_instances(db: Database, request_id: int) -> list[str]:
    """SOP Instance UIDs a request confirmed as committed."""
    with db.reading() as session:
        return list(
            session.scalars(
                select(CommitmentItem.sop_uid)
                .where(CommitmentItem.request_fk == request_id, CommitmentItem.committed)
                .order_by(CommitmentItem.id)
            )
        )
