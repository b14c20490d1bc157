"""HTTP upload of a zip (a disc image, a folder of DICOM files) through the importer.

``POST /api/imports`` with the zip as the request body (``Content-Type:
application/zip``), optional query parameters ``transfer`` (a closure transfer the
files belong to: its Issuer of Patient ID and institution apply), ``issuer`` and
``institution`` (only in the demo profile: otherwise the upload is recorded as sent
by the caller's institution, as STOW-RS). The body streams to a staging file (at most
``import_max_bytes``); ``gateway.importer`` then reads the zip (DICOMDIR when there
is one, else every member), skips non-DICOM members with a reason, and ingests each
instance through the one ingest. The answer is the import report: one line per
file with its outcome. Uploading the same zip again reports duplicates and stores
nothing twice.

Access (``consent.access``, as STOW-RS): the caller needs the store permission (an
institution's system, or its clerk or admin); a transfer must be its institution's
(another's answers like an unknown one); an instance of a study that exists and is
not visible to the caller is refused in the report (``not-authorized``), so an
upload never makes another sender's study visible. Every decision is audited.

Answers: 200 with the report (per-file failures are in it); 400 not a readable
zip; 401 no valid access token; 403 no store permission, or an ``institution``
other than the caller's; 404 unknown transfer; 409 a transfer that takes no more
instances; 413 too large; 415 not a zip.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from consent.access import StudyAdmission
from consent.principals import Kind
from dicomweb.access import client_address, gate_of, principal_of
from dicomweb.deps import get_archive
from dicomweb.errors import HTTPError
from gateway.archive import Archive
from gateway.importer import ImportSourceError, import_path, plan_import
from gateway.transfers.records import TransferError, accepting_transfer, mark_receiving

router = APIRouter()

ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/octet-stream"}


@router.post("/api/imports", summary="Import a zip of DICOM files (disc image or folder)")
async def import_zip(
    request: Request,
    transfer: int | None = None,
    issuer: str | None = None,
    institution: str = "",
    archive: Archive = Depends(get_archive),
) -> JSONResponse:
    settings = archive.settings
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ZIP_TYPES:
        raise HTTPError(415, "send the zip file as the body (Content-Type: application/zip)")
    limit = settings.import_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the upload is larger than {limit} bytes", "too-large")
    principal = principal_of(request)
    client = client_address(request)
    gate = gate_of(request)
    if not await run_in_threadpool(gate.check_store, principal, door="import", client=client):
        raise HTTPError(403, "this principal may not store", "forbidden")
    demo = principal.kind is Kind.DEMO
    if not demo:
        # What is uploaded counts as sent by the caller's institution (consent.access).
        if institution and institution != principal.institution:
            raise HTTPError(
                403, "uploads are recorded as sent by your own institution", "forbidden"
            )
        institution = principal.institution
    if transfer is not None:
        try:
            bound = await run_in_threadpool(accepting_transfer, archive.db, transfer)
            if not demo and bound.institution != principal.institution:
                raise TransferError(f"no transfer {transfer}")  # another's: as unknown
        except TransferError as exc:
            status = 404 if "no transfer" in str(exc) else 409
            raise HTTPError(status, str(exc), "transfer") from exc
        issuer, institution = bound.issuer, institution or bound.institution
    admit = StudyAdmission(gate, principal, door="import", client=client)
    path = await _receive(request, settings.staging_dir, limit)
    try:
        if transfer is not None:
            await run_in_threadpool(mark_receiving, archive.db, transfer)
        try:
            plan = await run_in_threadpool(lambda: plan_import(archive, path, staged=True))
            if plan.kind != "zip":
                raise ImportSourceError("not a zip file")
            report = await run_in_threadpool(
                lambda: import_path(
                    archive,
                    path,
                    issuer=issuer,
                    institution=institution,
                    transfer_id=transfer,
                    plan=plan,
                    admit=admit,
                )
            )
        except ImportSourceError as exc:
            # The report names the staging file: say what the client sent instead.
            raise HTTPError(400, "the upload is not a readable zip file", "invalid-zip") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    body = report.as_dict()
    body["source"] = "upload"
    return JSONResponse(body)


async def _receive(request: Request, staging: Path, limit: int) -> Path:
    """Stream the body to a staging file, refusing it past ``limit`` bytes."""
    staging.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=staging, prefix="upload-", suffix=".zip")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"the upload is larger than {limit} bytes", "too-large")
                out.write(chunk)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    return Path(name)
