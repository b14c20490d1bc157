"""Linking a patient account to the archive's patients (issuer + Patient ID).

Never by matching names or birth dates: a link is made by a named person who takes
responsibility for it, with the evidence they relied on, and the act is audited:

- ``attestation``: an institution admin vouches for a Patient ID of their own
  institution's issuer (the patient identified themselves at that hospital);
- ``verification``: an operator checked the patient's identity and documents.

A link's ``relation`` says whose account it is: the patient's own (``self``), or a
proxy's (``guardian``: a minor's parent; ``legal-representative``), made the same
way and with the evidence of the relation (family register, court order), usually
with an end (``ends_at``: the minor comes of age). A proxy acts for the patient:
sees their studies, shares them, gives consents; every access is audited under the
proxy's own name, so the patient's history shows who it was.
"""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from consent.audit import Attempt, Auditor
from consent.models import Institution, PatientLink, User
from consent.principals import ConsentError, Kind, Principal, Role
from gateway.archive.db import Database
from gateway.archive.models import utcnow


class Relation(StrEnum):
    """Whose account a patient link is: the patient's own, or a proxy's."""

    SELF = "self"
    GUARDIAN = "guardian"
    LEGAL_REPRESENTATIVE = "legal-representative"


RELATIONS = tuple(r.value for r in Relation)


def link_patient(
    db: Database,
    auditor: Auditor,
    *,
    account_id: int,
    issuer: str,
    patient_id: str,
    by: Principal,
    evidence: str,
    relation: str = "self",
    ends_at: dt.datetime | None = None,
    client: str = "",
    now: dt.datetime | None = None,
) -> int:
    now = now or utcnow()
    issuer, patient_id, evidence = issuer.strip(), patient_id.strip(), evidence.strip()
    if not issuer or not patient_id:
        raise ConsentError("a patient link needs the issuer and the Patient ID")
    if relation not in RELATIONS:
        raise ConsentError(f"relation is one of {', '.join(RELATIONS)}")
    if ends_at is not None and ends_at <= now:
        raise ConsentError("the link would end before it starts")
    if len(evidence) < 10:
        raise ConsentError("say what the identity was checked against (at least 10 characters)")
    with db.reading() as session:
        account = session.get(User, account_id)
        if account is None or account.kind != Kind.PATIENT.value:
            raise ConsentError("patient links are made for patient accounts")
        if by.kind is Kind.OPERATOR:
            method = "verification"
        elif by.kind is Kind.STAFF and by.role == Role.INSTITUTION_ADMIN.value:
            inst = session.get(Institution, by.institution_id)
            if inst is None or not inst.issuer or inst.issuer != issuer:
                raise ConsentError("an institution attests Patient IDs of its own issuer only")
            method = "attestation"
        else:
            raise ConsentError("only an institution admin or an operator links patients")
    detail = json.dumps(
        {
            "account": account_id,
            "issuer": issuer,
            "patient_id": patient_id,
            "method": method,
            "relation": relation,
            "ends_at": ends_at.isoformat() if ends_at else None,
        }
    )
    try:
        with db.writing() as session:
            row = PatientLink(
                user_fk=account_id,
                issuer=issuer,
                patient_id=patient_id,
                method=method,
                attested_by_fk=by.id,
                evidence=evidence,
                created_at=now,
                relation=relation,
                ends_at=ends_at,
            )
            session.add(row)
            session.flush()
            link_id = row.id
    except IntegrityError as exc:
        raise ConsentError("this Patient ID is already linked to the account") from exc
    auditor.record(
        Attempt(
            principal=by,
            door="admin",
            operation="link-patient",
            outcome="allowed",
            client=client,
            detail=detail,
        ),
        now,
    )
    return link_id


def unlink_patient(
    db: Database,
    auditor: Auditor,
    link_id: int,
    *,
    by: Principal,
    client: str = "",
    now: dt.datetime | None = None,
) -> None:
    now = now or utcnow()
    if by.kind is not Kind.OPERATOR and by.role != Role.INSTITUTION_ADMIN.value:
        raise ConsentError("only an institution admin or an operator unlinks patients")
    with db.writing() as session:
        row = session.get(PatientLink, link_id)
        if row is None or row.revoked_at is not None:
            raise ConsentError("no such patient link")
        if by.kind is Kind.STAFF:
            inst = session.get(Institution, by.institution_id)
            if inst is None or inst.issuer != row.issuer:
                raise ConsentError("no such patient link")
        row.revoked_at = now
        detail = json.dumps({"link": link_id, "issuer": row.issuer, "patient_id": row.patient_id})
    auditor.record(
        Attempt(
            principal=by,
            door="admin",
            operation="unlink-patient",
            outcome="allowed",
            client=client,
            detail=detail,
        ),
        now,
    )


def linked_ids(db: Database, account_id: int) -> list[tuple[str, str]]:
    """The (issuer, Patient ID) pairs a patient account is linked to."""
    with db.reading() as session:
        return [
            (issuer, pid)
            for issuer, pid in session.execute(
                select(PatientLink.issuer, PatientLink.patient_id)
                .where(PatientLink.user_fk == account_id, PatientLink.revoked_at.is_(None))
                .order_by(PatientLink.issuer, PatientLink.patient_id)
            )
        ]
