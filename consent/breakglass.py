"""Break-glass: emergency access to one patient's studies, declared and reviewed.

A clinician (staff radiologist) or an operator declares a reason and gets a grant
for a limited time (at most ``break_glass_max_minutes``). Every access under it is
audited with the break-glass flag and purpose ETREAT; the grant itself is audited,
appears in the patient's history, and waits for an operator's or auditor's review.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import select

from consent.audit import Attempt, Auditor
from consent.models import BreakGlass, PatientLink
from consent.principals import ConsentError, Kind, Principal, Role
from gateway.archive.db import Database
from gateway.archive.models import utcnow


@dataclass(frozen=True)
class Grant:
    id: int
    user_id: int
    issuer: str
    patient_id: str
    reason: str
    started_at: dt.datetime
    expires_at: dt.datetime
    ended_at: dt.datetime | None
    reviewed_at: dt.datetime | None
    review_note: str


def _grant(row: BreakGlass) -> Grant:
    return Grant(
        row.id,
        row.user_fk,
        row.issuer,
        row.patient_id,
        row.reason,
        row.started_at,
        row.expires_at,
        row.ended_at,
        row.reviewed_at,
        row.review_note,
    )


def declare(
    db: Database,
    auditor: Auditor,
    by: Principal,
    *,
    issuer: str,
    patient_id: str,
    reason: str,
    duration: dt.timedelta,
    max_duration: dt.timedelta,
    client: str = "",
    now: dt.datetime | None = None,
) -> Grant:
    now = now or utcnow()
    allowed = by.kind is Kind.OPERATOR or (
        by.kind is Kind.STAFF and by.role == Role.RADIOLOGIST.value
    )
    if not allowed:
        raise ConsentError("break-glass is for clinicians (radiologists) and operators")
    reason = reason.strip()
    if len(reason) < 10:
        raise ConsentError("declare the emergency (at least 10 characters)")
    if not issuer.strip() or not patient_id.strip():
        raise ConsentError("break-glass names one patient: issuer and Patient ID")
    if duration <= dt.timedelta(0) or duration > max_duration:
        raise ConsentError(
            f"break-glass lasts at most {int(max_duration.total_seconds() // 60)} min"
        )
    with db.writing() as session:
        row = BreakGlass(
            user_fk=by.id,
            issuer=issuer.strip(),
            patient_id=patient_id.strip(),
            reason=reason,
            started_at=now,
            expires_at=now + duration,
        )
        session.add(row)
        session.flush()
        grant = _grant(row)
    auditor.record(
        Attempt(
            principal=by,
            door="admin",
            operation="break-glass",
            outcome="allowed",
            purpose="ETREAT",
            client=client,
            break_glass=True,
            detail=json.dumps(
                {
                    "grant": grant.id,
                    "issuer": grant.issuer,
                    "patient_id": grant.patient_id,
                    "reason": reason,
                    "expires_at": grant.expires_at.isoformat(),
                }
            ),
        ),
        now,
    )
    return grant


def end(db: Database, by: Principal, grant_id: int, now: dt.datetime | None = None) -> None:
    with db.writing() as session:
        row = session.get(BreakGlass, grant_id)
        if row is None or (row.user_fk != by.id and by.kind is not Kind.OPERATOR):
            raise ConsentError("no such break-glass grant")
        if row.ended_at is None:
            row.ended_at = now or utcnow()


def review(
    db: Database, by: Principal, grant_id: int, note: str, now: dt.datetime | None = None
) -> None:
    if by.kind not in (Kind.OPERATOR, Kind.AUDITOR):
        raise ConsentError("operators and auditors review break-glass grants")
    with db.writing() as session:
        row = session.get(BreakGlass, grant_id)
        if row is None:
            raise ConsentError("no such break-glass grant")
        if row.user_fk == by.id:
            raise ConsentError("a grant is reviewed by someone else than its user")
        row.reviewed_by_fk = by.id
        row.reviewed_at = now or utcnow()
        row.review_note = note.strip()


def grants(
    db: Database, *, unreviewed: bool = False, patient_account: int | None = None
) -> list[Grant]:
    """Grants for the review report, or those touching one patient account's IDs."""
    stmt = select(BreakGlass).order_by(BreakGlass.started_at.desc())
    if unreviewed:
        stmt = stmt.where(BreakGlass.reviewed_at.is_(None))
    if patient_account is not None:
        stmt = stmt.join(
            PatientLink,
            (PatientLink.issuer == BreakGlass.issuer)
            & (PatientLink.patient_id == BreakGlass.patient_id),
        ).where(PatientLink.user_fk == patient_account, PatientLink.revoked_at.is_(None))
    with db.reading() as session:
        return [_grant(row) for row in session.scalars(stmt)]
