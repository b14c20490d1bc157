"""Transfers and forwarding jobs over HTTP: ``/api/transfers`` and ``/api/jobs``.

For the installation's operators and the institutions' staff only (403 for every
other kind of principal):

- ``GET /api/transfers``, ``GET /api/transfers/{id}``, ``GET /api/transfers/{id}/report``:
  operators see every closure transfer; staff see their own institution's (another
  institution's transfer answers 404, like one that does not exist). The report is
  the CLI's ``transfer report --json``: reconciliation and Storage Commitment answers.
- ``GET /api/jobs``, ``GET /api/jobs/{id}`` (``?items=true`` adds every instance's
  outcome), ``POST /api/jobs``: forwarding jobs. Staff see the jobs their institution
  asked for, operators all. Creating a job is the forwarding access decision
  (``gateway.forward.access``: the asker and the receiving institution must both be
  permitted to download the study); the job then runs as the ``studybridge.forward``
  task (a worker with a broker, this process without one); 202 with its status.

Every call is audited (door ``api``), allowed or denied, through the app's auditor.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from consent.principals import Kind, Principal
from dicomweb.access import client_address, gate_of, record_attempt, require_principal
from dicomweb.errors import HTTPError
from dicomweb.portal import PRIVATE, private_answer
from gateway.forward.access import ForwardDenied, authorize_forward
from gateway.forward.jobs import ForwardError, JobInfo, create_job, get_job, list_jobs
from gateway.forward.jobs import items as job_items
from gateway.forward.reconcile import Reconciliation
from gateway.forward.tasks import FORWARD
from gateway.transfers.records import TransferError, TransferInfo, get_transfer, list_transfers
from gateway.transfers.report import transfer_report

DOOR = "api"
router = APIRouter(dependencies=[Depends(private_answer)])


# -- answers (documented in the OpenAPI description) --------------------------------------
class TransferOut(BaseModel):
    id: int
    institution: str
    reason: str = Field(description="closure or suspension")
    effective_on: dt.date | None
    ends_on: dt.date | None
    source_ae: str = Field(description="AE title of the clinic's PACS")
    issuer: str = Field(description="Issuer of Patient ID of the whole transfer")
    custodian_name: str
    custodian_contact: str
    notes: str
    status: str = Field(description="open, receiving, verifying, complete or incomplete")
    created_at: dt.datetime
    updated_at: dt.datetime
    finalized_at: dt.datetime | None


class ReconciliationIds(BaseModel):
    patient_id: str
    issuer: str
    accession_number: str


class JobCounts(BaseModel):
    pending: int
    sent: int
    failed: int


class JobItemOut(BaseModel):
    sop_uid: str
    status: str = Field(description="pending, sent or failed")
    last_status: int | None = Field(description="C-STORE status of the last try")
    detail: str


class JobOut(BaseModel):
    id: int
    study_uid: str
    series_uid: str
    peer: str = Field(description="AE title of the receiving peer")
    status: str = Field(description="queued, running, done or failed")
    attempts: int
    max_attempts: int
    next_attempt_at: dt.datetime
    last_error: str
    created_at: dt.datetime
    updated_at: dt.datetime
    reconcile: ReconciliationIds
    instances: JobCounts
    requested_by: str
    requester_institution: str
    items: list[JobItemOut] | None = None


class JobIn(BaseModel):
    study_uid: str = Field(min_length=1, max_length=64)
    series_uid: str = Field("", max_length=64, description="only this series")
    peer: str = Field(min_length=1, max_length=16, description="AE title of a registered peer")
    patient_id: str = Field("", max_length=64, description="receiving institution's Patient ID")
    issuer: str = Field("", max_length=64, description="its Issuer of Patient ID")
    accession_number: str = Field("", max_length=16, description="its Accession Number")
    max_attempts: int = Field(8, ge=1, le=50)


# -- who may -------------------------------------------------------------------------------
def _audit(
    request: Request,
    principal: Principal,
    operation: str,
    outcome: str,
    *,
    study_uid: str = "",
    detail: str = "",
) -> None:
    record_attempt(request, principal, DOOR, operation, outcome, study_uid=study_uid, detail=detail)


def custodian(request: Request, principal: Principal = Depends(require_principal)) -> Principal:
    """Operators, and staff of an institution; every other principal is refused."""
    if principal.kind is Kind.OPERATOR or (principal.kind is Kind.STAFF and principal.institution):
        return principal
    _audit(request, principal, f"{request.method} {request.url.path}", "denied")
    raise HTTPError(403, "transfers and forwarding jobs are for operators and staff", "forbidden")


def _sees_institution(principal: Principal, institution: str) -> bool:
    return principal.kind is Kind.OPERATOR or principal.institution == institution


def _transfer(request: Request, principal: Principal, transfer_id: int, op: str) -> TransferInfo:
    try:
        info = get_transfer(request.app.state.archive.db, transfer_id)
    except TransferError:
        info = None
    _check_visible(request, principal, op, f"transfer {transfer_id}", info and info.institution)
    assert info is not None
    return info


def _job(request: Request, principal: Principal, job_id: int, op: str) -> JobInfo:
    try:
        info = get_job(request.app.state.archive, job_id)
    except ForwardError:
        info = None
    what = f"forwarding job {job_id}"
    _check_visible(request, principal, op, what, info and info.requester_institution)
    assert info is not None
    return info


def _check_visible(
    request: Request, principal: Principal, op: str, what: str, institution: str | None
) -> None:
    """404 (audited as denied) unless the record exists (``institution`` is its
    institution, None when there is no record) and the principal sees it."""
    if institution is None or not _sees_institution(principal, institution):
        _audit(request, principal, op, "denied", detail=what)
        raise HTTPError(404, f"no {what}", "not-found")
    _audit(request, principal, op, "allowed", detail=what)


# -- transfers -----------------------------------------------------------------------------
@router.get("/transfers", summary="Closure transfers", response_model=list[TransferOut])
def transfers_list(request: Request, me: Principal = Depends(custodian)) -> list[dict[str, Any]]:
    found = list_transfers(request.app.state.archive.db)
    _audit(request, me, "transfer-list", "allowed")
    return [t.as_dict() for t in found if _sees_institution(me, t.institution)]


@router.get("/transfers/{transfer_id}", summary="One transfer", response_model=TransferOut)
def transfers_show(
    transfer_id: int, request: Request, me: Principal = Depends(custodian)
) -> dict[str, Any]:
    return _transfer(request, me, transfer_id, "transfer-show").as_dict()


@router.get(
    "/transfers/{transfer_id}/report",
    summary="Reconciliation (expected vs held, refused, duplicates) and Storage Commitment",
    response_description="As `studybridge transfer report ID --json`: `counts`, `studies` "
    "(per study and series: expected, received, status), `rejected`, `commitments` "
    "(per request: committed, failed instances, when and to whom the report was sent).",
)
def transfers_report(
    transfer_id: int, request: Request, me: Principal = Depends(custodian)
) -> dict[str, Any]:
    _transfer(request, me, transfer_id, "transfer-report")
    return transfer_report(request.app.state.archive.db, transfer_id).as_dict()


# -- forwarding jobs -----------------------------------------------------------------------
@router.get("/jobs", summary="Forwarding jobs", response_model=list[JobOut])
def jobs_list(
    request: Request, status: str | None = None, me: Principal = Depends(custodian)
) -> list[dict[str, Any]]:
    scope = None if me.kind is Kind.OPERATOR else me.institution
    found = list_jobs(request.app.state.archive, status=status, requester_institution=scope)
    _audit(request, me, "job-list", "allowed")
    return [j.as_dict() for j in found]


@router.get("/jobs/{job_id}", summary="A forwarding job's status", response_model=JobOut)
def jobs_show(
    job_id: int, request: Request, items: bool = False, me: Principal = Depends(custodian)
) -> dict[str, Any]:
    info = _job(request, me, job_id, "job-show")
    data = info.as_dict()
    if items:
        data["items"] = [
            {"sop_uid": i.sop_uid, "status": i.status, "last_status": i.last_status,
             "detail": i.detail}
            for i in job_items(request.app.state.archive, job_id)
        ]  # fmt: skip
    return data


@router.post(
    "/jobs",
    summary="Forward a study (or series) to a peer's PACS",
    status_code=202,
    response_model=JobOut,
    responses={403: {"description": "the receiving institution may not have the study"},
               404: {"description": "no such study (or not yours), or no such peer"}},
)  # fmt: skip
def jobs_create(body: JobIn, request: Request, me: Principal = Depends(custodian)) -> JSONResponse:
    archive = request.app.state.archive
    try:
        authorize_forward(
            archive.db,
            gate_of(request).auditor,
            me,
            body.study_uid.strip(),
            body.peer.strip(),
            door=DOOR,
            client=client_address(request),
        )
        info = create_job(
            archive,
            body.study_uid.strip(),
            body.peer.strip(),
            series_uid=body.series_uid.strip(),
            reconcile=Reconciliation(
                body.patient_id.strip(), body.issuer.strip(), body.accession_number.strip()
            ),
            max_attempts=body.max_attempts,
            requested_by=me.name,
            requester_institution=me.institution,
        )
    except ForwardDenied as exc:
        status = 404 if str(exc).startswith("no such") else 403
        raise HTTPError(status, str(exc), "not-found" if status == 404 else "forbidden") from exc
    except ForwardError as exc:
        status = 404 if str(exc).startswith(("no peer", "the archive holds no")) else 400
        raise HTTPError(status, str(exc), "not-found" if status == 404 else "bad-request") from exc
    archive.tasks.submit(FORWARD, job_id=info.id)
    return JSONResponse(
        info.as_dict() | {"items": None},
        status_code=202,
        headers={"Location": str(request.url_for("jobs_show", job_id=info.id)), **PRIVATE},
    )
