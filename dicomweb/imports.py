"""HTTP upload of a zip (a disc image, a folder of DICOM files) through the importer.

``POST /api/imports`` with the zip as the request body (``Content-Type:
application/zip``), optional query parameters ``transfer`` (a closure transfer the
files belong to: its Issuer of Patient ID and institution apply), ``issuer`` and
``institution``. The body streams to a staging file (at most
``import_max_bytes``); ``gateway.importer`` then reads the zip (DICOMDIR when there
is one, else every member), skips non-DICOM members with a reason, and ingests each
instance through the one ingest. The answer is the import report: one line per
file with its outcome. Uploading the same zip again reports duplicates and stores
nothing twice.

Answers: 200 with the report (per-file failures are in it); 400 not a readable
zip; 404 unknown transfer; 409 a transfer that takes no more instances; 413 too
large; 415 not a zip. No access control yet (the HTTP door listens on 127.0.0.1
by default): with the consent layer, an upload is allowed to an operator, to an
institution for its own transfer, or to a patient for their own records.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

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
    if transfer is not None:
        try:
            bound = await run_in_threadpool(accepting_transfer, archive.db, transfer)
        except TransferError as exc:
            status = 404 if "no transfer" in str(exc) else 409
            raise HTTPError(status, str(exc), "transfer") from exc
        issuer, institution = bound.issuer, institution or bound.institution
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
