"""STOW-RS: the Studies Store transaction (PS3.18 10.5), through the one ingest.

``POST {prefix}/studies`` and ``POST {prefix}/studies/{study}`` take a
``multipart/related; type="application/dicom"`` body. The body is streamed: the
multipart is parsed as it arrives (``dicomweb.multipart_parser``) and each part is
written straight to a staging file beside the blobs, then handed to
``Archive.ingest_file(..., owned=True)``, the ingest C-STORE and imports use. While
one part is ingested (in a worker thread) the next one is already being received.
Neither a part nor the body is ever held in memory.

Before the body is read, the request is refused when: the Accept header rules out
``application/dicom+json`` (406); the Content-Type is not multipart/related of
``application/dicom`` parts (415, also for metadata and bulk data uploads,
``type="application/dicom+json"``, which we do not support), or has no valid
boundary (400); the Content-Encoding is neither identity nor gzip (415); the
target Study Instance UID is not a valid UID (400); the Content-Length exceeds
``stow_max_bytes`` (413, the body is not read and the connection is closed).

While reading, the body is counted: more than ``stow_max_bytes`` received, or, for
gzip, more than ``stow_max_bytes`` after decompression (a compression bomb never
expands further than that), is 413. A body that is not well-formed multipart (no
delimiter, a part that breaks off, no closing delimiter) is 400. In both cases the
part being received is removed from staging; parts received completely and
ingested before the damage stay stored (a retry of the whole request is safe: an
exact duplicate is a success). The answer then lists them: when any part was
processed, its body is the Store Instances Response below (with the request's
status, and a ``Warning: 299`` header saying what was wrong); otherwise it is the
usual error body ``{"error", "message"}``.

Each part is one instance. A part that is not ``application/dicom`` (part without
Content-Type: taken as the request's ``type``), an instance of another study than
the target study, or an instance the ingest refuses is a failure of that part
only. The answer is an ``application/dicom+json`` Store Instances Response
(PS3.18 Annex I): Retrieve URL of the study (empty when the stored instances
belong to several studies), Referenced SOP Sequence (stored instances, with their
Retrieve URL and a Warning Reason where one applies) and Failed SOP Sequence
(SOP Class and Instance UIDs where known and valid, Failure Reason), and one
``Warning: 299`` header per failed part naming the reason. The status follows
PS3.18 table 10.5.3-1: 200 all stored without warnings, 202 some stored and some
failed or warned, 409 none stored, or 503 with Retry-After when none was stored
because the blob store or the index is down (every failure retryable).

Before a staged part is ingested its header is read once for the SOP Class,
SOP Instance and Study Instance UIDs (``_peek``): to refuse an instance of another
study without storing it, and to name failed instances in the answer. A part's
``transfer-syntax`` parameter is not checked: the file meta is authoritative, and
the instance is stored as received. The codes used are in ``FAILURE_REASONS`` and
``WARNING_REASONS`` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from consent.access import StudyAdmission
from dicomweb.access import client_address, gate_of, principal_of
from dicomweb.deps import get_archive
from dicomweb.errors import error_body
from dicomweb.multipart_parser import (
    MultipartError,
    MultipartParser,
    PartData,
    PartStart,
    check_boundary,
    parse_media_type,
)
from dicomweb.urls import service_url
from gateway.archive import Archive, IngestResult, Outcome, Source
from gateway.archive import errors as archive_errors
from gateway.archive.uids import is_valid_uid

log = logging.getLogger(__name__)

router = APIRouter()

DICOM_JSON = "application/dicom+json"

# Failure Reason (0008,1197) values, PS3.18 table I.2-2. The ranges A7xx, A9xx and
# Cxxx are the standard's; the Cxxx sub-codes are ours and the same as our C-STORE
# status codes (docs/architecture.md), except the study mismatch.
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_INDEX = 0xA701
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC002
INSTANCE_CONFLICT = 0xC010
PATIENT_MISMATCH = 0xC011
# An instance of another study POSTed to /studies/{study}. PS3.18 names the case
# (table 10.5.3-1, "Study Instance UID mismatch") but gives it no code; this value is
# the one dcm4chee-arc answers, so clients that know it recognise it.
STUDY_MISMATCH = 0xC409
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124  # PS3.7 C.4.2.1.3 Refused: Not Authorized

# Warning Reason (0008,1196) values, PS3.18 table I.2-1.
# The instance's own identifiers are kept in its bytes, but it is filed under the
# patient its study already has (IHE IRWF.b reconciled copy).
COERCION_OF_DATA_ELEMENTS = 0xB000
# The instance was already stored in another transfer syntax: that copy is kept and
# the one received is discarded.
ELEMENTS_DISCARDED = 0xB006

# The one table of archive errors -> Failure Reason; the first match wins.
FAILURE_REASONS: list[tuple[type[archive_errors.ArchiveError], int]] = [
    (archive_errors.StorageUnavailable, OUT_OF_RESOURCES),
    (archive_errors.IndexUnavailable, OUT_OF_RESOURCES_INDEX),
    (archive_errors.NotStorageSOPClass, SOP_CLASS_NOT_SUPPORTED),
    (archive_errors.MissingAttribute, DOES_NOT_MATCH_SOP_CLASS),
    (archive_errors.InvalidUID, INVALID_UID),
    (archive_errors.InvalidDataset, CANNOT_UNDERSTAND),
    (archive_errors.InstanceConflict, INSTANCE_CONFLICT),
    (archive_errors.PatientMismatch, PATIENT_MISMATCH),
    (archive_errors.NotAuthorized, NOT_AUTHORIZED),
]

WARNING_REASONS: dict[Outcome, int] = {
    Outcome.RECONCILED_COPY: COERCION_OF_DATA_ELEMENTS,
    Outcome.ALTERNATE_SYNTAX: ELEMENTS_DISCARDED,
}

# Most parts one request may carry: the answer lists each of them.
MAX_PARTS = 10_000
# Most Warning headers one answer carries (one per failed part).
MAX_WARNING_HEADERS = 20
_INFLATE_STEP = 256 * 1024
_GZIP = 16 + zlib.MAX_WBITS
_EXPECTED = 'multipart/related; type="application/dicom"; boundary=...'
_ACCEPTABLE = {"*/*", "application/*", DICOM_JSON, "application/json"}


def failure_reason(exc: BaseException) -> int:
    for cls, code in FAILURE_REASONS:
        if isinstance(exc, cls):
            return code
    return PROCESSING_FAILURE


# -- routes ----------------------------------------------------------------------------
@router.post("/studies", response_class=Response, summary="Store instances (STOW-RS)")
async def store_instances(request: Request, archive: Archive = Depends(get_archive)) -> Response:
    return await _store(request, archive, None)


@router.post(
    "/studies/{study}", response_class=Response, summary="Store instances of one study (STOW-RS)"
)
async def store_study_instances(
    study: str, request: Request, archive: Archive = Depends(get_archive)
) -> Response:
    return await _store(request, archive, study)


# -- the transaction -------------------------------------------------------------------
class _Refused(Exception):
    """The request as a whole is refused with ``status``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


async def _store(request: Request, archive: Archive, target: str | None) -> Response:
    settings = archive.settings
    limit = settings.stow_max_bytes
    try:
        boundary, gzip = _check_request(request, target, limit)
    except _Refused as exc:
        # The body was not read: do not let the client go on sending it.
        return _error(exc, close=True)

    principal = principal_of(request)
    client = client_address(request)
    allowed = await run_in_threadpool(
        gate_of(request).check_store, principal, door="dicomweb", client=client
    )
    if not allowed:
        return _error(_Refused(403, "forbidden", "this principal may not store"), close=True)

    base = service_url(request, settings)
    # What is stored counts as sent by the principal's institution (consent.access).
    source = Source(door="stow", host=client, institution=principal.institution)
    stow = _Transaction(
        archive,
        source,
        target,
        base,
        may_store_into=StudyAdmission(
            gate_of(request), principal, door="dicomweb", client=client
        ).allows,
    )
    parser = MultipartParser(boundary)
    try:
        chunks = _counted(request.stream(), limit)
        if gzip:
            chunks = _gunzip(chunks, limit)
        async for chunk in chunks:
            for event in parser.feed(chunk):
                await stow.on_event(event)
        parser.close()
        await stow.finish()
    except (_Refused, MultipartError) as exc:
        if isinstance(exc, _Refused):
            refused = exc
        else:
            refused = _Refused(400, "malformed-multipart", str(exc))
        await stow.abort()
        log.info("STOW-RS refused (%s): %s", refused.status, refused)
        return stow.answer_refused(refused)
    except ClientDisconnect:
        await stow.abort()
        log.info("STOW-RS client went away after %d parts", len(stow.results))
        return Response(status_code=400)
    finally:
        stow.discard_current()
    if not stow.results:
        return _error(_Refused(400, "no-parts", "the multipart body holds no part"))
    return stow.answer()


def _check_request(request: Request, target: str | None, limit: int) -> tuple[str, bool]:
    """The boundary and whether the body is gzip-encoded, or ``_Refused``."""
    headers = request.headers
    if target is not None and not is_valid_uid(target):
        raise _Refused(
            400, "invalid-uid", f"Study Instance UID in the URL is not a valid UID: {target[:70]!r}"
        )
    accept = headers.get("accept", "")
    if accept.strip() and not _accepts_json(accept):
        raise _Refused(406, "not-acceptable", f"the response is only available as {DICOM_JSON}")
    content_type = headers.get("content-type", "")
    if not content_type:
        raise _Refused(
            415,
            "unsupported-media-type",
            f"Content-Type {_EXPECTED} is required",
        )
    try:
        media, params = parse_media_type(content_type)
    except MultipartError as exc:
        raise _Refused(415, "unsupported-media-type", str(exc)) from exc
    if media != "multipart/related":
        raise _Refused(
            415,
            "unsupported-media-type",
            f"Content-Type {media[:60]} is not supported; use {_EXPECTED}",
        )
    part_type = params.get("type", "application/dicom").strip().lower()
    if part_type in ("application/dicom+json", "application/dicom+xml"):
        raise _Refused(
            415,
            "unsupported-media-type",
            f"metadata and bulk data uploads (type={part_type}) are not supported; "
            'send each instance as an application/dicom part (type="application/dicom")',
        )
    if part_type != "application/dicom":
        raise _Refused(
            415,
            "unsupported-media-type",
            f'multipart/related of {part_type[:60]} is not supported; use type="application/dicom"',
        )
    boundary = params.get("boundary")
    if not boundary:
        raise _Refused(400, "malformed-multipart", "multipart/related without a boundary parameter")
    try:
        check_boundary(boundary)
    except MultipartError as exc:
        raise _Refused(400, "malformed-multipart", str(exc)) from exc
    codings = [
        c.strip().lower()
        for c in headers.get("content-encoding", "").split(",")
        if c.strip() and c.strip().lower() != "identity"
    ]
    if codings not in ([], ["gzip"], ["x-gzip"]):
        raise _Refused(
            415,
            "unsupported-media-type",
            f"Content-Encoding {', '.join(codings)[:60]} is not supported (identity or gzip)",
        )
    length = headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError as exc:
            raise _Refused(400, "bad-request", "Content-Length is not a number") from exc
        if size > limit:
            raise _Refused(
                413,
                "payload-too-large",
                f"request body of {size} bytes exceeds the limit of {limit} bytes",
            )
    return boundary, bool(codings)


def _accepts_json(accept: str) -> bool:
    for item in accept.split(","):
        media, _, params = item.partition(";")
        if media.strip().lower() not in _ACCEPTABLE:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    q = float(value)
        if q > 0:
            return True
    return False


async def _counted(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise _Refused(
                413, "payload-too-large", f"request body exceeds the limit of {limit} bytes"
            )
        if chunk:
            yield chunk


async def _gunzip(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Decompress a gzip body (one or more members), refusing more than ``limit`` bytes
    of output: each call inflates at most ``_INFLATE_STEP`` bytes, so a bomb is
    stopped as soon as it has expanded past the limit."""
    inflater = zlib.decompressobj(_GZIP)
    produced = 0
    async for chunk in chunks:
        data = chunk
        while data:
            if inflater.eof:
                inflater = zlib.decompressobj(_GZIP)
            try:
                out = inflater.decompress(data, _INFLATE_STEP)
            except zlib.error as exc:
                raise _Refused(400, "bad-content-encoding", f"corrupt gzip body: {exc}") from exc
            produced += len(out)
            if produced > limit:
                raise _Refused(
                    413,
                    "payload-too-large",
                    f"decompressed request body exceeds the limit of {limit} bytes",
                )
            if out:
                yield out
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if not inflater.eof:
        raise _Refused(400, "bad-content-encoding", "gzip body ends before its compressed data")


def _error(exc: _Refused, *, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else None
    return JSONResponse(error_body(exc.reason, str(exc)), status_code=exc.status, headers=headers)


# -- per part --------------------------------------------------------------------------
@dataclass
class _PartResult:
    index: int
    stored: bool
    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    warning: int | None = None
    failure: int | None = None
    message: str = ""
    retryable: bool = False


@dataclass
class _Peek:
    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    error: str = ""


def _peek(path: Path) -> _Peek:
    """The UIDs the instance names, read the way the ingest reads them (its header,
    no pixel data). Only to check the target study and to name failed instances: the
    ingest decides on the file itself."""
    try:
        ds = pydicom.dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            defer_size=65536,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
        values = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
    except RecursionError:
        return _Peek(error="data set nests too deeply to parse")
    except Exception as exc:
        return _Peek(error=f"cannot parse data set: {exc}"[:200])
    cleaned = [
        str(v).strip("\x00 ") if v is not None and str(v).strip("\x00 ") else None for v in values
    ]
    return _Peek(*cleaned)


def _part_problem(start: PartStart) -> str | None:
    """Why a part cannot be an instance, or None."""
    content_type = start.get("content-type") or "application/dicom"
    try:
        media, _params = parse_media_type(content_type)
    except MultipartError as exc:
        return f"part has a malformed Content-Type: {exc}"
    if media != "application/dicom":
        return f"part of type {media[:60]} is not an application/dicom instance"
    encoding = start.get("content-transfer-encoding").strip().lower()
    if encoding not in ("", "binary", "8bit", "7bit"):
        return f"part Content-Transfer-Encoding {encoding[:30]} is not supported (binary)"
    return None


class _Transaction:
    """The parts of one STOW-RS request: staging, ingest, and the answer."""

    def __init__(
        self,
        archive: Archive,
        source: Source,
        target: str | None,
        base: str,
        may_store_into: Callable[[str], bool] | None = None,
    ) -> None:
        self.archive = archive
        self.source = source
        self.target = target
        self.base = base
        self._may_store_into = may_store_into
        self.results: list[_PartResult] = []
        self._index = 0
        self._fh: Any = None
        self._path: Path | None = None
        self._refusal: tuple[int, str, bool] | None = None
        self._pending: asyncio.Future[_PartResult] | None = None

    # events of the parser
    async def on_event(self, event: object) -> None:
        if isinstance(event, PartData):
            self._write(event.data)
        elif isinstance(event, PartStart):
            self._start(event)
        else:
            await self._end()

    def _start(self, start: PartStart) -> None:
        self._index += 1
        if self._index > MAX_PARTS:
            raise _Refused(413, "payload-too-large", f"more than {MAX_PARTS} parts in one request")
        self._refusal = None
        problem = _part_problem(start)
        if problem is not None:
            self._refusal = (CANNOT_UNDERSTAND, problem, False)
            return
        try:
            fd, name = tempfile.mkstemp(
                dir=self.archive.settings.staging_dir, prefix="stow-", suffix=".dcm"
            )
        except OSError as exc:
            self._refusal = (OUT_OF_RESOURCES, f"cannot stage the part: {exc.strerror}", True)
            return
        self._path = Path(name)
        self._fh = os.fdopen(fd, "wb")

    def _write(self, data: memoryview) -> None:
        if self._fh is None:
            return  # a refused part: its content is dropped as it arrives
        try:
            self._fh.write(data)
        except OSError as exc:
            self.discard_current()
            self._refusal = (OUT_OF_RESOURCES, f"cannot stage the part: {exc.strerror}", True)

    async def _end(self) -> None:
        index = self._index
        if self._fh is None:
            code, message, retryable = self._refusal or (PROCESSING_FAILURE, "part lost", False)
            self.results.append(
                _PartResult(index, False, failure=code, message=message, retryable=retryable)
            )
            return
        path = self._path
        try:
            self._fh.close()
        except OSError as exc:
            self.discard_current()
            self.results.append(
                _PartResult(
                    index,
                    False,
                    failure=OUT_OF_RESOURCES,
                    message=f"cannot stage the part: {exc.strerror}",
                    retryable=True,
                )
            )
            return
        self._fh = self._path = None
        assert path is not None
        # One ingest at a time per request, in order; the next part streams meanwhile.
        await self._collect()
        self._pending = asyncio.ensure_future(run_in_threadpool(self._ingest, index, path))

    async def _collect(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.results.append(await pending)

    async def finish(self) -> None:
        await self._collect()

    async def abort(self) -> None:
        """The body broke off: drop the part being received, keep what was ingested."""
        self.discard_current()
        await self._collect()

    def discard_current(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
        self._fh = self._path = None

    # in a worker thread
    def _ingest(self, index: int, path: Path) -> _PartResult:
        peek = _Peek()
        try:
            peek = _peek(path)
            if self.target is not None and peek.study_uid != self.target:
                _unlink(path)
                return self._mismatch(index, peek)
            if (
                peek.study_uid
                and self._may_store_into is not None
                and not self._may_store_into(peek.study_uid)
            ):
                _unlink(path)
                return _failed(
                    index, peek, NOT_AUTHORIZED, "the study belongs to another sender; not stored"
                )
            result = self.archive.ingest_file(path, self.source, owned=True)
        except archive_errors.ArchiveError as exc:
            _unlink(path)
            return _failed(index, peek, failure_reason(exc), str(exc), exc.retryable)
        except Exception:
            _unlink(path)
            log.exception("STOW-RS part %d: unexpected error during ingest", index)
            return _failed(index, peek, PROCESSING_FAILURE, "internal error while storing")
        return _stored(index, result)

    def _mismatch(self, index: int, peek: _Peek) -> _PartResult:
        if peek.study_uid is None:
            message = peek.error or "the instance has no Study Instance UID"
            code = CANNOT_UNDERSTAND
        elif not is_valid_uid(peek.study_uid):
            message = "Study Instance UID of the instance is not a valid UID"
            code = INVALID_UID
        else:
            message = (
                f"instance of study {peek.study_uid} posted to study {self.target}; not stored"
            )
            code = STUDY_MISMATCH
        return _failed(index, peek, code, message)

    # the answer
    def study_url(self, study: str) -> str:
        return f"{self.base}/studies/{study}"

    def answer(self, status: int | None = None, warning: str = "") -> Response:
        results = sorted(self.results, key=lambda r: r.index)
        stored = [r for r in results if r.stored]
        failed = [r for r in results if not r.stored]
        if status is None:
            if not failed and not any(r.warning for r in stored):
                status = 200
            elif stored:
                status = 202
            elif all(r.retryable for r in failed):
                status = 503
            else:
                status = 409
        if self.target is not None:
            study_url = self.study_url(self.target)
        else:
            studies = {r.study_uid for r in stored}
            study_url = self.study_url(studies.pop()) if len(studies) == 1 else ""
        body: dict[str, Any] = {"00081190": _ur(study_url)}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [_failed_item(r) for r in failed]}
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [self._stored_item(r) for r in stored]}
        response = Response(
            json.dumps(body, separators=(",", ":")).encode(),
            status_code=status,
            media_type=DICOM_JSON,
        )
        if status == 503:
            response.headers["Retry-After"] = "30"
        if warning:
            response.headers.append("Warning", _warning(warning))
        for r in failed[:MAX_WARNING_HEADERS]:
            response.headers.append("Warning", _warning(f"part {r.index}: {r.message}"))
        log.info(
            "STOW-RS %s: %d stored, %d failed (%s)",
            status,
            len(stored),
            len(failed),
            self.source.host,
        )
        return response

    def answer_refused(self, refused: _Refused) -> Response:
        """The answer to a body that broke off or went past a limit."""
        if not self.results:
            return _error(refused, close=True)
        response = self.answer(refused.status, warning=str(refused))
        response.headers["Connection"] = "close"
        return response

    def _stored_item(self, r: _PartResult) -> dict[str, Any]:
        item: dict[str, Any] = {
            "00081150": _ui(r.sop_class_uid),
            "00081155": _ui(r.sop_uid),
            "00081190": _ur(
                f"{self.study_url(r.study_uid or '')}/series/{r.series_uid}/instances/{r.sop_uid}"
            ),
        }
        if r.warning is not None:
            item["00081196"] = {"vr": "US", "Value": [r.warning]}
        return item


def _stored(index: int, result: IngestResult) -> _PartResult:
    return _PartResult(
        index,
        True,
        sop_class_uid=result.sop_class_uid,
        sop_uid=result.sop_uid,
        study_uid=result.study_uid,
        series_uid=result.series_uid,
        warning=WARNING_REASONS.get(result.outcome),
    )


def _failed(
    index: int, peek: _Peek, code: int, message: str, retryable: bool = False
) -> _PartResult:
    return _PartResult(
        index,
        False,
        sop_class_uid=peek.sop_class_uid,
        sop_uid=peek.sop_uid,
        study_uid=peek.study_uid,
        failure=code,
        message=message,
        retryable=retryable,
    )


def _failed_item(r: _PartResult) -> dict[str, Any]:
    item: dict[str, Any] = {}
    # UIDs are named only when they are UIDs: the data set is attacker-controlled.
    if is_valid_uid(r.sop_class_uid):
        item["00081150"] = _ui(r.sop_class_uid)
    if is_valid_uid(r.sop_uid):
        item["00081155"] = _ui(r.sop_uid)
    item["00081197"] = {"vr": "US", "Value": [r.failure]}
    return item


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _ur(value: str) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]} if value else {"vr": "UR"}


def _warning(text: str) -> str:
    """A Warning header value (RFC 7234 5.5): 299, the agent, a quoted ASCII text."""
    clean = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return f'299 studybridge "{clean[:300]}"'


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
