"""A patient's access history: who tried to reach their studies, when, and how.

Read from the audit trail (records naming one of the patient's studies) and the
break-glass grants on their linked IDs, newest first. Operator and staff names are
shown as recorded; nothing here is editable.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select

from consent.access import study_filter
from consent.breakglass import Grant, grants
from consent.models import AuditRecord
from consent.principals import ConsentError, Kind, Operation, Principal
from gateway.archive.db import Database
from gateway.archive.models import Study


@dataclass(frozen=True)
class Access:
    at: dt.datetime
    last_at: dt.datetime
    count: int
    who: str
    principal_kind: str
    institution: str
    door: str
    operation: str
    study_uid: str
    outcome: str
    purpose: str
    break_glass: bool


@dataclass(frozen=True)
class History:
    accesses: list[Access]
    break_glass: list[Grant]


def access_history(db: Database, patient: Principal, *, limit: int = 500) -> History:
    if patient.kind is not Kind.PATIENT:
        raise ConsentError("the access history belongs to a patient")
    mine = select(Study.study_uid).where(study_filter(patient, Operation.VIEW))
    stmt = (
        select(AuditRecord)
        .where(AuditRecord.study_uid.in_(mine))
        .order_by(AuditRecord.at.desc(), AuditRecord.id.desc())
        .limit(limit)
    )
    with db.reading() as session:
        rows = session.scalars(stmt).all()
    accesses = [
        Access(
            at=r.at,
            last_at=r.last_at,
            count=r.count,
            who=r.principal_name,
            principal_kind=r.principal_kind,
            institution=r.institution,
            door=r.door,
            operation=r.operation,
            study_uid=r.study_uid,
            outcome=r.outcome,
            purpose=r.purpose,
            break_glass=r.break_glass,
        )
        for r in rows
    ]
    return History(accesses, grants(db, patient_account=patient.id))
