"""A study as a zip in the layout of a patient CD (``gateway.archive.media``): what a
recipient downloads to load into a PACS or CD importer that speaks no DICOMweb.

``GET /api/studies/{study}/media`` streams ``application/zip`` (DICOMDIR, README,
every instance as stored). Whole instances leave the archive, so it needs the
``download`` permission (``dicomweb.access.authorize``): a view-only share link
gets 403, a study the caller may not see answers exactly like a missing one (404).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from consent.principals import Operation
from dicomweb.access import authorize, not_found
from dicomweb.errors import HTTPError
from gateway.archive import Level, RetrieveRequest
from gateway.archive.media import iter_pdi_zip
from gateway.archive.retrieve import find_instances
from gateway.archive.uids import is_valid_uid

router = APIRouter()


@router.get(
    "/api/studies/{study}/media",
    response_class=StreamingResponse,
    summary="A study as a zip with a DICOMDIR (patient CD layout)",
)
def study_media(request: Request, study: str) -> StreamingResponse:
    if not is_valid_uid(study):
        raise HTTPError(400, "Study Instance UID is not a valid UID", "invalid-uid")
    archive = request.app.state.archive
    instances = find_instances(
        archive.db, RetrieveRequest(Level.STUDY, study_uids=[study]), require=True
    )
    authorize(request, Operation.DOWNLOAD, [study], not_found(Level.STUDY, study))
    # The DICOMDIR is built here, before the first byte: a broken study fails cleanly.
    body = iter_pdi_zip(archive.store, instances, archive.settings.staging_dir)
    return StreamingResponse(
        body,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="study-{study}.zip"',
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )
