"""The viewer's study actions: what the caller may do with a study, and the zip
download as a browser can ask for it.

Routes (mounted under ``/api``, with the portal's private headers):

- ``GET /api/studies/{study}/actions``: view, download, and the DICOM peers of the
  caller's institution that may receive the study. The viewer shows its Download and
  "Send to our PACS" buttons from this answer; the decision is ``consent.access``'s
  (the same questions ``authorize`` and ``gateway.forward.access.authorize_forward``
  ask again, and audit, when the button is used).
- ``POST /api/studies/{study}/media``: the study's zip (``dicomweb.media``, which also
  serves ``GET`` with ``Authorization: Bearer``) for a browser. A browser download
  cannot carry a header, so this takes the access token as the form field
  ``access_token`` (RFC 6750 2.2): it travels in a request body, never in a URL or a
  log. The answer streams to disk like any download.

"Send to our PACS" is ``POST /api/jobs`` (``dicomweb.custody``).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from consent.access import permitted_studies
from consent.principals import Kind, Operation, Principal
from dicomweb import media
from dicomweb.access import principal_for_token, require_principal
from dicomweb.answers import StudyActions
from dicomweb.errors import HTTPError
from dicomweb.portal import private_answer
from gateway.archive.uids import check_uid
from gateway.peers import Peer, PeerRegistry

router = APIRouter(dependencies=[Depends(private_answer)])

_FORM = "application/x-www-form-urlencoded"


def _receiving_peers(request: Request, principal: Principal) -> list[Peer]:
    """The DICOM peers of the caller's institution (staff): where "send to our PACS"
    may go. A peer of the caller's own institution may receive what the caller may
    download (``Gate.check_delivery``, asked and audited by ``authorize_forward`` when
    the job is made); listing them for a button is not an access, so not audited."""
    if principal.kind is not Kind.STAFF or not principal.institution:
        return []
    peers = PeerRegistry(request.app.state.archive.db).list()
    return [p for p in peers if p.institution == principal.institution]


@router.get(
    "/studies/{study}/actions",
    summary="What I may do with a study (viewer buttons)",
    response_model=StudyActions,
)
def actions(study: str, request: Request, me: Principal = Depends(require_principal)) -> dict:
    check_uid(study, "Study Instance UID")
    db = request.app.state.archive.db
    # A hidden study looks like a missing one: nothing permitted.
    can_view = bool(permitted_studies(db, me, Operation.VIEW, [study]))
    can_download = can_view and bool(permitted_studies(db, me, Operation.DOWNLOAD, [study]))
    peers = _receiving_peers(request, me) if can_download else []
    return {
        "view": can_view,
        "download": can_download,
        "forward": [
            {"ae_title": p.ae_title, "description": p.description or p.ae_title} for p in peers
        ],
    }


@router.post(
    "/studies/{study}/media",
    summary="The study's zip for browsers: the access token as form field access_token",
)
async def media_form(study: str, request: Request) -> StreamingResponse:
    if request.headers.get("authorization") is not None:
        await run_in_threadpool(require_principal, request)
    else:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        if content_type.lower() != _FORM:
            raise HTTPError(415, f"send the access token as {_FORM}", "unsupported-media-type")
        form = parse_qs((await request.body())[:4096].decode("latin-1"))
        token = (form.get("access_token") or [""])[0]
        if not token:
            raise HTTPError(401, "no access token", "unauthorized")
        await run_in_threadpool(principal_for_token, request, token)
    return await run_in_threadpool(media.study_media, request, study)
