"""Consents (FHIR Consent shaped) and institutions' access requests.

A consent is the patient's decision about one recipient institution: permit or deny,
a purpose of use, a period, and all studies or named ones. It covers the archive
patients linked to the patient's account (``consent.patients``), so a study must be
one of the patient's own to be named. Revoking sets ``revoked_at``; the access
decision (``consent.access``) reads consents live, so revocation holds from the next
request. ``to_fhir`` renders a consent as a FHIR R4 Consent resource.

An access request comes from an institution naming a patient by issuer + Patient ID;
the patient linked to that ID sees it and approves (which makes a permit consent) or
declines it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from consent.access import permitted_studies
from consent.models import AccessRequest, Consent, ConsentStudy, Institution, PatientLink, User
from consent.principals import ConsentError, Kind, Operation, Principal
from gateway.archive.db import Database
from gateway.archive.models import utcnow

PURPOSES = {"TREAT", "ETREAT", "PATRQT", "HRESCH", "HPAYMT", "HOPERAT", "CAREMGT", "PUBHLTH"}
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


@dataclass(frozen=True)
class ConsentView:
    id: int
    institution: str
    decision: str
    purpose: str
    period_start: dt.datetime
    period_end: dt.datetime | None
    all_studies: bool
    study_uids: list[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None


def grant(
    db: Database,
    patient: Principal,
    *,
    institution: str,
    decision: str = "permit",
    purpose: str = "TREAT",
    study_uids: list[str] | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    request_id: int | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Record a consent; ``study_uids`` None means all the patient's studies."""
    now = now or utcnow()
    if patient.kind is not Kind.PATIENT:
        raise ConsentError("only patients give or refuse consent")
    if decision not in ("permit", "deny"):
        raise ConsentError("a consent permits or denies")
    if purpose not in PURPOSES:
        raise ConsentError(f"purpose of use must be one of {', '.join(sorted(PURPOSES))}")
    start = start or now
    if end is not None and end <= start:
        raise ConsentError("a consent's period ends after it starts")
    wanted: list[str] = []
    if study_uids is not None:
        wanted = sorted({u.strip() for u in study_uids if u and u.strip()})
        if not wanted:
            raise ConsentError("name at least one study, or consent to all")
        if set(wanted) - permitted_studies(db, patient, Operation.VIEW, wanted, now):
            raise ConsentError("a consent can only name your own studies")
    with db.writing() as session:
        inst = session.scalar(select(Institution).where(Institution.name == institution))
        if inst is None or inst.disabled_at is not None:
            raise ConsentError(f"no institution named {institution!r}")
        row = Consent(
            user_fk=patient.id,
            institution_fk=inst.id,
            decision=decision,
            purpose=purpose,
            period_start=start,
            period_end=end,
            all_studies=study_uids is None,
            request_fk=request_id,
            created_at=now,
        )
        session.add(row)
        session.flush()
        session.add_all([ConsentStudy(consent_fk=row.id, study_uid=u) for u in wanted])
        return row.id


def revoke(
    db: Database, patient: Principal, consent_id: int, now: dt.datetime | None = None
) -> None:
    with db.writing() as session:
        row = session.get(Consent, consent_id)
        if row is None or row.user_fk != patient.id or patient.kind is not Kind.PATIENT:
            raise ConsentError("no such consent")
        if row.revoked_at is None:
            row.revoked_at = now or utcnow()


def list_consents(db: Database, patient: Principal) -> list[ConsentView]:
    with db.reading() as session:
        rows = session.execute(
            select(Consent, Institution.name)
            .join(Institution, Institution.id == Consent.institution_fk)
            .where(Consent.user_fk == patient.id)
            .order_by(Consent.id.desc())
        ).all()
        return [_view(session, row, name) for row, name in rows]


def _view(session: Any, row: Consent, institution: str) -> ConsentView:
    studies = list(
        session.scalars(
            select(ConsentStudy.study_uid)
            .where(ConsentStudy.consent_fk == row.id)
            .order_by(ConsentStudy.study_uid)
        )
    )
    return ConsentView(
        id=row.id,
        institution=institution,
        decision=row.decision,
        purpose=row.purpose,
        period_start=row.period_start,
        period_end=row.period_end,
        all_studies=row.all_studies,
        study_uids=studies,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def to_fhir(db: Database, consent_id: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """A consent as a FHIR R4 Consent resource."""
    now = now or utcnow()
    with db.reading() as session:
        found = session.execute(
            select(Consent, Institution.name, User.username)
            .join(Institution, Institution.id == Consent.institution_fk)
            .join(User, User.id == Consent.user_fk)
            .where(Consent.id == consent_id)
        ).first()
        if found is None:
            raise ConsentError("no such consent")
        row, institution, username = found
        view = _view(session, row, institution)
        identifiers = session.execute(
            select(PatientLink.issuer, PatientLink.patient_id).where(
                PatientLink.user_fk == row.user_fk, PatientLink.revoked_at.is_(None)
            )
        ).all()
    if view.revoked_at is not None or (view.period_end is not None and view.period_end <= now):
        status = "inactive"
    else:
        status = "active"
    period: dict[str, str] = {"start": _iso(view.period_start)}
    if view.period_end is not None:
        period["end"] = _iso(view.period_end)
    provision: dict[str, Any] = {
        "type": view.decision,
        "period": period,
        "actor": [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                            "display": "information recipient",
                        }
                    ]
                },
                "reference": {
                    "identifier": {"system": "urn:studybridge:institution", "value": institution},
                    "display": institution,
                },
            }
        ],
        "purpose": [{"system": _ACT_REASON, "code": view.purpose}],
    }
    if not view.all_studies:
        provision["data"] = [
            {
                "meaning": "instance",
                "reference": {
                    "type": "ImagingStudy",
                    "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
                },
            }
            for uid in view.study_uids
        ]
    return {
        "resourceType": "Consent",
        "id": str(view.id),
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [
            {"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Consent"}]}
        ],
        "patient": {
            "identifier": {"system": "urn:studybridge:user", "value": username},
            "extension": [
                {
                    "url": "urn:studybridge:linked-patient-ids",
                    "valueString": "; ".join(f"{i}|{p}" for i, p in identifiers),
                }
            ],
        }
        if identifiers
        else {"identifier": {"system": "urn:studybridge:user", "value": username}},
        "dateTime": _iso(row.created_at),
        "policyRule": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "OPTIN" if view.decision == "permit" else "OPTOUT",
                }
            ]
        },
        "provision": provision,
    }


# -- access requests ------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestView:
    id: int
    institution: str
    issuer: str
    patient_id: str
    purpose: str
    reason: str
    study_uids: list[str]
    status: str
    created_at: dt.datetime
    decided_at: dt.datetime | None


def request_access(
    db: Database,
    requester: Principal,
    *,
    issuer: str,
    patient_id: str,
    purpose: str = "TREAT",
    reason: str = "",
    study_uids: list[str] | None = None,
    now: dt.datetime | None = None,
) -> int:
    if requester.kind not in (Kind.STAFF, Kind.SYSTEM) or requester.institution_id is None:
        raise ConsentError("access requests come from an institution's staff or systems")
    if purpose not in PURPOSES:
        raise ConsentError(f"purpose of use must be one of {', '.join(sorted(PURPOSES))}")
    if not issuer.strip() or not patient_id.strip():
        raise ConsentError("name the patient by issuer and Patient ID")
    with db.writing() as session:
        row = AccessRequest(
            institution_fk=requester.institution_id,
            requested_by_fk=requester.id if requester.kind is Kind.STAFF else None,
            issuer=issuer.strip(),
            patient_id=patient_id.strip(),
            purpose=purpose,
            reason=reason.strip(),
            study_uids=json.dumps(sorted(set(study_uids or []))),
            created_at=now or utcnow(),
        )
        session.add(row)
        session.flush()
        return row.id


def requests_for(
    db: Database, patient: Principal, *, pending_only: bool = True
) -> list[RequestView]:
    """Requests naming one of the patient's linked IDs."""
    stmt = (
        select(AccessRequest, Institution.name)
        .join(Institution, Institution.id == AccessRequest.institution_fk)
        .join(
            PatientLink,
            (PatientLink.issuer == AccessRequest.issuer)
            & (PatientLink.patient_id == AccessRequest.patient_id),
        )
        .where(PatientLink.user_fk == patient.id, PatientLink.revoked_at.is_(None))
        .order_by(AccessRequest.id.desc())
    )
    if pending_only:
        stmt = stmt.where(AccessRequest.status == "pending")
    with db.reading() as session:
        return [
            RequestView(
                id=row.id,
                institution=name,
                issuer=row.issuer,
                patient_id=row.patient_id,
                purpose=row.purpose,
                reason=row.reason,
                study_uids=json.loads(row.study_uids),
                status=row.status,
                created_at=row.created_at,
                decided_at=row.decided_at,
            )
            for row, name in session.execute(stmt)
        ]


def decide(
    db: Database,
    patient: Principal,
    request_id: int,
    *,
    approve: bool,
    end: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> int | None:
    """Approve (returns the new consent's id) or decline a pending request."""
    now = now or utcnow()
    mine = {r.id: r for r in requests_for(db, patient)}
    request = mine.get(request_id)
    if request is None:
        raise ConsentError("no such pending request")
    consent_id = None
    if approve:
        consent_id = grant(
            db,
            patient,
            institution=request.institution,
            purpose=request.purpose,
            study_uids=request.study_uids or None,
            end=end,
            request_id=request_id,
            now=now,
        )
    with db.writing() as session:
        row = session.get(AccessRequest, request_id)
        assert row is not None
        row.status = "approved" if approve else "declined"
        row.decided_by_fk = patient.id
        row.decided_at = now
    return consent_id
