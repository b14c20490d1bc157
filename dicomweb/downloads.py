"""Whole studies leaving the archive for people: the PDI zip and "send to our PACS".

Routes (mounted under ``/api`` beside the portal, with its private headers):

- ``GET /api/studies/{study}/actions``: what the caller may do with a study (view,
  download, the DICOM peers of their institution it may be sent to). The viewer shows
  its Download and Send buttons from this answer; the decision is ``consent.access``'s.
- ``GET|POST /api/studies/{study}/download``: the study as a zip with a DICOMDIR in
  the IHE PDI layout (``gateway.archive.media``), streamed. It needs the download
  permission (a view-only share link gets 403, as for whole instances over WADO).
  Browsers cannot put a header on a file download, so besides ``Authorization:
  Bearer`` the POST takes the access token as the form field ``access_token`` (RFC
  6750 2.2): the token travels in a request body, never in a URL or a log.
- ``POST /api/studies/{study}/forward`` ``{"peer": AE}``: staff of an institution (or
  a recipient-bound share link they opened) with the download permission queue a
  forwarding job (``gateway.forward``) to one of their institution's registered peers,
  once ``gateway.forward.access.authorize_forward`` permits it (they and the peer's
  institution may both download the study).

Every decision is audited: downloads through the app's gate (operation
``download``), forwarding by ``authorize_forward`` (operation ``forward``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from consent.access import permitted_studies
from consent.principals import Kind, Operation, Principal, peer_principal
from dicomweb.access import (
    authorize,
    client_address,
    gate_of,
    not_found,
    principal_for_token,
    require_principal,
)
from dicomweb.errors import HTTPError
from dicomweb.portal import PRIVATE, private_answer
from gateway.archive import Level, RetrieveRequest
from gateway.archive.media import iter_pdi_zip
from gateway.archive.retrieve import StoredInstance
from gateway.archive.uids import check_uid
from gateway.forward.access import ForwardDenied, authorize_forward
from gateway.forward.jobs import ForwardError, create_job
from gateway.forward.tasks import FORWARD
from gateway.peers import Peer, PeerRegistry

router = APIRouter(dependencies=[Depends(private_answer)])

_FORM = "application/x-www-form-urlencoded"


def _archive(request: Request) -> Any:
    return request.app.state.archive


def _study_instances(request: Request, study: str) -> list[StoredInstance]:
    """The study's instances, or the archive's not-found answer (also for a study the
    caller may not see: ``authorize`` raises the same one)."""
    check_uid(study, "Study Instance UID")
    found: list[StoredInstance] = _archive(request).find_instances(
        RetrieveRequest(Level.STUDY, study_uids=[study])
    )
    if not found:
        raise not_found(Level.STUDY, study)
    return found


def _institution_peers(request: Request, principal: Principal, study: str) -> list[Peer]:
    """The DICOM peers registered for the caller's institution (staff, or a share link
    exchanged by its staff) that may receive the study: where "send to our PACS" may
    go. The same two questions ``authorize_forward`` asks (and audits) when it is
    done; listing them for the buttons is not an access, so it is not audited."""
    if principal.kind not in (Kind.STAFF, Kind.LINK) or not principal.institution:
        return []
    db = _archive(request).db
    peers = PeerRegistry(db).list()
    return [
        p
        for p in peers
        if p.institution == principal.institution
        and permitted_studies(
            db, peer_principal(db, p.ae_title, p.institution), Operation.DOWNLOAD, [study]
        )
    ]


@router.get("/studies/{study}/actions", summary="What I may do with a study (viewer buttons)")
def actions(study: str, request: Request, me: Principal = Depends(require_principal)) -> dict:
    check_uid(study, "Study Instance UID")
    db = _archive(request).db
    # Not audited: it reads no study data, and a hidden study looks like a missing one.
    can_view = bool(permitted_studies(db, me, Operation.VIEW, [study]))
    can_download = can_view and bool(permitted_studies(db, me, Operation.DOWNLOAD, [study]))
    peers = _institution_peers(request, me, study) if can_download else []
    return {
        "view": can_view,
        "download": can_download,
        "forward": [
            {"ae_title": p.ae_title, "description": p.description or p.ae_title} for p in peers
        ],
    }


def _zip_response(request: Request, study: str) -> StreamingResponse:
    instances = _study_instances(request, study)
    authorize(request, Operation.DOWNLOAD, {study}, not_found(Level.STUDY, study))
    settings = request.app.state.settings
    # The DICOMDIR is built before the first byte (a missing blob fails the request).
    body = iter_pdi_zip(_archive(request).store, instances, settings.staging_dir)
    return StreamingResponse(
        body,
        media_type="application/zip",
        headers={
            **PRIVATE,
            "Content-Disposition": f'attachment; filename="study-{study}.zip"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/studies/{study}/download", summary="The study as a zip with a DICOMDIR (PDI)")
def download(
    study: str, request: Request, _me: Principal = Depends(require_principal)
) -> StreamingResponse:
    return _zip_response(request, study)


@router.post(
    "/studies/{study}/download",
    summary="The same, for browsers: the access token as form field access_token",
)
async def download_form(study: str, request: Request) -> StreamingResponse:
    if request.headers.get("authorization") is not None:
        require_principal(request)
    else:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        if content_type.lower() != _FORM:
            raise HTTPError(415, f"send the access token as {_FORM}", "unsupported-media-type")
        form = parse_qs((await request.body())[:4096].decode("latin-1"))
        token = (form.get("access_token") or [""])[0]
        if not token:
            raise HTTPError(401, "no access token", "unauthorized")
        await run_in_threadpool(principal_for_token, request, token)
    return await run_in_threadpool(_zip_response, request, study)


class ForwardRequest(BaseModel):
    peer: str = Field(min_length=1, max_length=16)


@router.post("/studies/{study}/forward", summary="Send the study to my institution's PACS")
def forward(
    study: str, body: ForwardRequest, request: Request, me: Principal = Depends(require_principal)
) -> dict[str, Any]:
    archive = _archive(request)
    _study_instances(request, study)
    peer = PeerRegistry(archive.db).get(body.peer)
    if peer is None or not me.institution or peer.institution != me.institution:
        raise HTTPError(
            403, "send only to a DICOM peer registered for your institution", "forbidden"
        )
    try:
        # The one forwarding decision: the asker and the destination may both download
        # the study (audited as operation forward); hidden studies answer as missing.
        authorize_forward(
            archive.db,
            gate_of(request).auditor,
            me,
            study,
            body.peer,
            door="portal",
            client=client_address(request),
        )
    except ForwardDenied as exc:
        if str(exc).startswith("no such study"):
            raise not_found(Level.STUDY, study) from exc
        raise HTTPError(403, str(exc), "forbidden") from exc
    try:
        job = create_job(archive, study, body.peer)
    except ForwardError as exc:
        raise HTTPError(409, str(exc), "conflict") from exc
    archive.tasks.submit(FORWARD, job_id=job.id)
    return {"job": job.id, "peer": body.peer, "status": job.status, "instances": job.counts}
