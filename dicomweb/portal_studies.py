"""Study lists of the portal pages: a patient's studies by institution, an institution's
inbox, and the institutions one can name (``/api``).

Both lists are one query of the one query engine, scoped by ``consent.access`` inside
the query and audited as searches (door ``portal``), exactly as a QIDO-RS search by
the same account would be; they add what a person needs to recognise a study: the
institution that sent it and whether that clinic has closed (a closure transfer
handed its archive over), and for the inbox why the institution may see it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import and_, select

from consent.access import break_glass_filter, received_filter, shared_with
from consent.models import Institution
from consent.principals import Kind, Operation, Principal
from dicomweb.access import client_address, gate_of
from dicomweb.answers import Inbox, InstitutionChoice, MyStudies
from dicomweb.errors import HTTPError
from dicomweb.sessions import caller
from gateway.archive.models import Study, utcnow
from gateway.archive.query import Level, Query, run_query, study_sources
from gateway.transfers.records import list_transfers

# At most this many studies in one list (newest first); the answer says if more exist.
LIMIT = 500
_KEYS = {
    "StudyInstanceUID": "",
    "StudyDate": "",
    "StudyTime": "",
    "StudyDescription": "",
    "AccessionNumber": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedSeries": "",
    "NumberOfStudyRelatedInstances": "",
    "PatientName": "",
    "PatientID": "",
    "IssuerOfPatientID": "",
}


def _private(response: Response) -> None:
    response.headers.update({"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


router = APIRouter(dependencies=[Depends(_private)])


def _closed_clinics(request: Request) -> set[str]:
    db = request.app.state.archive.db
    return {t.institution for t in list_transfers(db) if t.reason == "closure"}


def _studies(request: Request, me: Principal, extra: Any = None) -> tuple[list[dict], bool]:
    scope = gate_of(request).search_scope(me, door="portal", client=client_address(request))
    study_scope = scope if extra is None else (lambda: and_(scope(), extra()))
    result = run_query(
        request.app.state.archive.db,
        Query(level=Level.STUDY, keys=dict(_KEYS), limit=LIMIT, study_scope=study_scope),
    )
    rows = [dict(zip(result.keys, row, strict=True)) for row in result.rows]
    sources = study_sources(request.app.state.archive.db, [r["StudyInstanceUID"] for r in rows])
    closed = _closed_clinics(request)
    studies = []
    for r in rows:
        uid = r["StudyInstanceUID"]
        institution = next((s for s in sources.get(uid, []) if s), "")
        studies.append(
            {
                "study_uid": uid,
                "date": r["StudyDate"] or "",
                "time": r["StudyTime"] or "",
                "description": r["StudyDescription"] or "",
                "accession": r["AccessionNumber"] or "",
                "modalities": r["ModalitiesInStudy"] or [],
                "series": r["NumberOfStudyRelatedSeries"] or 0,
                "instances": r["NumberOfStudyRelatedInstances"] or 0,
                "patient_name": r["PatientName"] or "",
                "patient_id": r["PatientID"] or "",
                "issuer": r["IssuerOfPatientID"] or "",
                "institution": institution,
                "closed": institution in closed,
            }
        )
    return studies, result.truncated


@router.get(
    "/me/studies",
    summary="My studies, grouped by the institution that sent them",
    response_model=MyStudies,
)
def my_studies(request: Request, me: Principal = Depends(caller)) -> dict[str, Any]:
    if me.kind is not Kind.PATIENT:
        raise HTTPError(403, "this is not for your kind of account", "forbidden")
    studies, truncated = _studies(request, me)
    groups: dict[str, dict[str, Any]] = {}
    for study in studies:
        name = study["institution"]
        group = groups.setdefault(name, {"institution": name, "closed": study["closed"]})
        group.setdefault("studies", []).append(study)
    ordered = sorted(groups.values(), key=lambda g: (g["institution"] == "", g["institution"]))
    return {"institutions": ordered, "truncated": truncated}


@router.get(
    "/inbox",
    summary="Studies patients shared with or consented to my institution",
    response_model=Inbox,
)
def inbox(request: Request, me: Principal = Depends(caller)) -> dict[str, Any]:
    """What the institution sees through someone else's decision (consents; share links
    bound to it, with their expiry; the user's own break-glass grants, flagged), not
    what it sent itself."""
    if me.kind is not Kind.STAFF:
        raise HTTPError(403, "the inbox is for institution staff", "forbidden")
    now = utcnow()
    studies, truncated = _studies(request, me, lambda: received_filter(me, now))
    if studies:
        with request.app.state.archive.db.reading() as session:
            flagged = set(
                session.scalars(
                    select(Study.study_uid).where(
                        Study.study_uid.in_([s["study_uid"] for s in studies]),
                        break_glass_filter(me, now),
                    )
                )
            )
        db = request.app.state.archive.db
        links = shared_with(db, me, Operation.SEARCH, [s["study_uid"] for s in studies], now)
        for study in studies:
            uid = study["study_uid"]
            shared = links.get(uid)
            study["shared_until"] = max(e for _i, e in shared).isoformat() if shared else None
            if uid in flagged:
                study["reason"] = "break-glass"
            else:
                study["reason"] = "share-link" if shared else "consent"
    return {"institution": me.institution, "studies": studies, "truncated": truncated}


@router.get(
    "/institutions",
    summary="Institutions one can share with or consent to",
    response_model=list[InstitutionChoice],
)
def institutions(request: Request, me: Principal = Depends(caller)) -> list[dict[str, Any]]:
    closed = _closed_clinics(request)
    with request.app.state.archive.db.reading() as session:
        rows = session.execute(
            select(Institution.name, Institution.description)
            .where(Institution.disabled_at.is_(None))
            .order_by(Institution.name)
        ).all()
    return [{"name": n, "description": d, "closed": n in closed} for n, d in rows]
