"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9): retrieving what the archive holds.

Every route resolves its UIDs through ``gateway.archive.retrieve`` (the one retrieve
path C-MOVE and C-GET use) and reads bytes through the blob store:

- ``/studies/{s}[/series/{se}[/instances/{i}]]``: ``multipart/related;
  type="application/dicom"``, one Part 10 file per part, streamed from the blobs in
  chunks. Each part is the stored file (our file meta and the data set exactly as
  received) when ``transfer-syntax=*`` or its stored syntax is accepted; otherwise
  it is converted frame by frame to Explicit VR Little Endian, the default when no
  transfer syntax is named (PS3.18 8.7.3). An instance that can be delivered in no
  acceptable syntax makes the request 406 before anything is sent.
- ``.../metadata``: DICOM JSON with ``BulkDataURI``s for pixel data and large binary
  values (absolute, built from the request and X-Forwarded-Proto/Host); series
  metadata comes from its cache beside the instances (``archive.metadata``).
- ``.../instances/{i}/bulk/{tag path}``: a bulk data value as
  ``multipart/related; type="application/octet-stream"``.
- ``.../instances/{i}/frames/{list}``: frames read by byte range; stored compressed
  bytes (``image/jp2``, ``image/jpeg``, ``image/jls``, ``image/dicom-rle`` ...) for
  ``transfer-syntax=*`` or their own media type, else uncompressed octet-stream.
- ``.../rendered``, ``.../thumbnail``: JPEG (default), PNG or GIF (``dicomweb.rendered``),
  at every level; a study or series renders as its representative image (the middle
  image of its first series with images), one image as dicomweb-client and Orthanc
  expect, not a multipart of every instance.
- ``/wado?requestType=WADO&...``: WADO-URI, DICOM or rendered.

Instance resources carry an ``ETag`` derived from the stored data set's SHA-256 (the
stored representation's ETag is that hash itself) and answer ``If-None-Match`` with
304. Pixel data and multipart bodies are never gzipped (``JSONGZip`` only touches
JSON); ``Cross-Origin-Resource-Policy`` is added by ``dicomweb.middleware``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.uid import UID

from consent.principals import Operation
from dicomweb import rendered
from dicomweb.access import authorize, not_found
from dicomweb.deps import requested_accept
from dicomweb.dicomjson import choose_json_type
from dicomweb.errors import HTTPError
from dicomweb.multipart import MultipartWriter, Part, parse_accept
from dicomweb.ranges import ranged_multipart, stable_writer
from dicomweb.streaming import BatchedStream
from dicomweb.urls import service_url
from gateway.archive import Archive
from gateway.archive import metadata as archive_metadata
from gateway.archive.blobstore import BlobStore
from gateway.archive.errors import InvalidDataset, NotFound
from gateway.archive.frames import (
    MEDIA_TYPE_ALIASES,
    FrameReader,
    can_decode,
    frame_media_type,
    is_encapsulated,
)
from gateway.archive.query import Level
from gateway.archive.retrieve import (
    ANY_SYNTAX,
    EXPLICIT_LE,
    RetrieveRequest,
    StoredInstance,
    deliverable_syntax,
    find_instances,
    get_instance,
    iter_part10,
    recorded_part10_size,
)
from gateway.archive.uids import is_valid_uid

router = APIRouter()

DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
_CHUNK = 1024 * 1024
_CACHE_CONTROL = "private, no-cache"
CAPABILITIES = {
    "retrieve": {
        "media_types": [f'multipart/related; type="{DICOM}"'],
        "transfer_syntaxes": [
            "* (as stored)",
            f"{EXPLICIT_LE} (default; converted from any stored syntax that can be decoded)",
        ],
    },
    "metadata": {"media_types": ["application/dicom+json", "application/json"]},
    "frames": {
        "media_types": [
            f"{OCTET_STREAM} (uncompressed, Explicit VR Little Endian)",
            "image/jpeg, image/jls, image/jp2, image/jpx, image/jphc, image/dicom-rle "
            "(as stored, or transfer-syntax=*)",
        ]
    },
    "bulkdata": {"media_types": [f'multipart/related; type="{OCTET_STREAM}"']},
    "rendered": {
        "levels": ["study", "series", "instance", "frame"],
        "study_and_series": "the representative image (the middle image of the first "
        "series with images), as one image",
        "media_types": list(rendered.RENDERED_TYPES),
        "parameters": ["window", "viewport", "quality"],
    },
    "thumbnail": {"levels": ["study", "series", "instance", "frame"]},
    "wado_uri": {
        "path": "/wado",
        "content_types": [DICOM, *rendered.RENDERED_TYPES],
        "parameters": [
            "requestType",
            "studyUID",
            "seriesUID",
            "objectUID",
            "contentType",
            "transferSyntax",
            "frameNumber",
            "rows",
            "columns",
            "region",
            "windowCenter",
            "windowWidth",
            "imageQuality",
        ],
    },
}


# -- shared helpers --------------------------------------------------------------------
def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise HTTPError(400, f"{what} is not a valid UID: {value[:70]!r}", reason="invalid-uid")
    return value


def _etag(inst: StoredInstance, variant: str = "") -> str:
    """The stored representation's ETag is its SHA-256; other representations add a
    digest of what makes them differ."""
    if not variant:
        return f'"{inst.sha256}"'
    digest = hashlib.sha256(variant.encode()).hexdigest()[:16]
    return f'"{inst.sha256}-{digest}"'


def _not_modified(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return any(t == "*" or t.removeprefix("W/") == etag for t in tags)


def _cache_headers(etag: str | None) -> dict[str, str]:
    headers = {"Vary": "Accept", "Cache-Control": _CACHE_CONTROL}
    if etag:
        headers["ETag"] = etag
    return headers


def _304(etag: str) -> Response:
    return Response(status_code=304, headers=_cache_headers(etag))


# -- retrieve (DICOM) ------------------------------------------------------------------
def dicom_syntaxes(accept: str | None) -> list[str]:
    """Acceptable transfer syntaxes for application/dicom parts, preferred first."""
    ranges = parse_accept(accept)
    if not ranges:
        return [EXPLICIT_LE]
    found: list[str] = []
    for r in ranges:
        part = r.part_type
        if r.type in ("*/*", "multipart/*") and part in (None, "*/*", DICOM, "application/*"):
            found.append(EXPLICIT_LE if r.type == "*/*" else r.transfer_syntax or EXPLICIT_LE)
            continue
        if r.type in (DICOM, "application/*") or (
            r.type == "multipart/related" and part in (None, DICOM, "*/*", "application/*")
        ):
            syntax = r.transfer_syntax or EXPLICIT_LE
            if syntax == ANY_SYNTAX or is_valid_uid(syntax):
                found.append(syntax)
    if not found:
        raise HTTPError(
            406,
            f'this resource is available as multipart/related; type="{DICOM}" '
            "(transfer-syntax=* or a UID)",
            reason="not-acceptable",
        )
    return found


def _plan(instances: Sequence[StoredInstance], syntaxes: Sequence[str]) -> list[tuple]:
    plan = []
    for inst in instances:
        syntax = deliverable_syntax(inst, syntaxes)
        if syntax is None:
            raise HTTPError(
                406,
                f"instance {inst.sop_uid} is stored in transfer syntax "
                f"{inst.transfer_syntax_uid}, which cannot be converted to any of "
                f"{', '.join(syntaxes)[:200]}; ask for transfer-syntax=* to get it as stored",
                reason="transfer-syntax-not-supported",
            )
        plan.append((inst, syntax))
    return plan


def _retrieve(request: Request, req: RetrieveRequest, *, single: bool = False) -> Response:
    archive = _archive(request)
    instances = _permitted(request, Operation.DOWNLOAD, req)
    plan = _plan(instances, dicom_syntaxes(requested_accept(request)))
    etag = None
    if single:
        inst, syntax = plan[0]
        etag = _etag(inst, "" if syntax == inst.transfer_syntax_uid else f"dicom:{syntax}")
        if _not_modified(request, etag):
            return _304(etag)
    store = archive.store
    parts = [_dicom_part(store, inst, syntax) for inst, syntax in plan]
    if single:
        assert etag is not None
        return ranged_multipart(
            request, stable_writer(DICOM, etag), parts, etag, _cache_headers(etag)
        )
    writer = MultipartWriter(DICOM)
    return BatchedStream(
        writer.spans(parts),
        media_type=writer.content_type,
        headers=_cache_headers(etag),
        content_length=writer.content_length(parts),
    )


def _dicom_part(store: BlobStore, inst: StoredInstance, syntax: str) -> Part:
    content_type = f"{DICOM}; transfer-syntax={syntax}"
    if syntax == inst.transfer_syntax_uid:
        # As stored: read straight from the blob, its size known from the index
        # (asking an S3 store for 250 sizes would delay the first byte).
        return Part(
            content_type,
            size=recorded_part10_size(inst),
            source=partial(store.open, inst.blob_key),
        )
    return Part(content_type, iter_part10(store, inst, syntax, _CHUNK))


@router.get("/studies/{study}", summary="Retrieve a study (multipart application/dicom)")
def retrieve_study(request: Request, study: str) -> Response:
    req = RetrieveRequest(Level.STUDY, study_uids=[_uid(study, "Study Instance UID")])
    return _retrieve(request, req)


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series")
def retrieve_series(request: Request, study: str, series: str) -> Response:
    req = RetrieveRequest(
        Level.SERIES,
        study_uids=[_uid(study, "Study Instance UID")],
        series_uids=[_uid(series, "Series Instance UID")],
    )
    return _retrieve(request, req)


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
def retrieve_instance(request: Request, study: str, series: str, instance: str) -> Response:
    req = RetrieveRequest(
        Level.IMAGE,
        study_uids=[_uid(study, "Study Instance UID")],
        series_uids=[_uid(series, "Series Instance UID")],
        sop_uids=[_uid(instance, "SOP Instance UID")],
    )
    return _retrieve(request, req, single=True)


def _instance(request: Request, study: str, series: str, instance: str) -> StoredInstance:
    """The instance the path names, if the principal may view it (else its 404)."""
    inst = get_instance(
        _archive(request).db,
        _uid(study, "Study Instance UID"),
        _uid(series, "Series Instance UID"),
        _uid(instance, "SOP Instance UID"),
    )
    authorize(request, Operation.VIEW, [inst.study_uid], not_found(Level.IMAGE, inst.sop_uid))
    return inst


def _permitted(
    request: Request, operation: Operation, req: RetrieveRequest
) -> list[StoredInstance]:
    """The instances a retrieve names, if the principal may ``operation`` them all;
    otherwise exactly the answer for instances that do not exist."""
    instances = find_instances(_archive(request).db, req, require=True)
    uid = {
        Level.STUDY: req.study_uids,
        Level.SERIES: req.series_uids,
        Level.IMAGE: req.sop_uids,
    }[req.level][0]
    authorize(request, operation, {i.study_uid for i in instances}, not_found(req.level, uid))
    return instances


# -- metadata --------------------------------------------------------------------------
def _json_type(request: Request) -> str:
    media = choose_json_type(requested_accept(request))
    if media is None:
        raise HTTPError(
            406, "metadata is available as application/dicom+json", reason="not-acceptable"
        )
    return media


def _scratch(request: Request):  # type: ignore[no-untyped-def]
    return request.app.state.settings.staging_dir


@router.get("/studies/{study}/metadata", summary="Study metadata (DICOM JSON)")
def study_metadata(request: Request, study: str) -> Response:
    study = _uid(study, "Study Instance UID")
    media = _json_type(request)
    archive = _archive(request)
    series = archive_metadata.study_series(archive.db, study)
    authorize(request, Operation.VIEW, [study], not_found(Level.STUDY, study))
    body = b"".join(
        archive_metadata.iter_study_metadata(
            archive.db, archive.store, _scratch(request), study, series_uids=series
        )
    )
    body = archive_metadata.bind_base(body, service_url(request))
    return Response(body, media_type=media, headers={"Vary": "Accept"})


@router.get("/studies/{study}/series/{series}/metadata", summary="Series metadata (DICOM JSON)")
def series_metadata(request: Request, study: str, series: str) -> Response:
    study = _uid(study, "Study Instance UID")
    series = _uid(series, "Series Instance UID")
    media = _json_type(request)
    archive = _archive(request)
    archive_metadata.series_marker(archive.db, study, series)  # NotFound if not there
    authorize(request, Operation.VIEW, [study], not_found(Level.SERIES, series))
    body = archive_metadata.series_metadata(
        archive.db, archive.store, _scratch(request), study, series
    )
    body = archive_metadata.bind_base(body, service_url(request))
    return Response(body, media_type=media, headers={"Vary": "Accept"})


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Instance metadata (DICOM JSON)",
)
def instance_metadata(request: Request, study: str, series: str, instance: str) -> Response:
    media = _json_type(request)
    inst = _instance(request, study, series, instance)
    base = service_url(request)
    etag = _etag(inst, f"metadata:{base}")  # the body names the base URL
    if _not_modified(request, etag):
        return _304(etag)
    data = archive_metadata.dumps(
        [archive_metadata.instance_metadata(_archive(request).store, inst)]
    )
    body = archive_metadata.bind_base(data, base)
    return Response(body, media_type=media, headers=_cache_headers(etag))


# -- bulk data -------------------------------------------------------------------------
_TAG_PATH = re.compile(r"^[0-9A-Fa-f]{8}(/\d{1,6}/[0-9A-Fa-f]{8})*$")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulk/{tag_path:path}",
    summary="Retrieve a bulk data value (multipart application/octet-stream)",
)
def bulkdata(request: Request, study: str, series: str, instance: str, tag_path: str) -> Response:
    if not _TAG_PATH.match(tag_path):
        raise HTTPError(400, "bulk data path must be TAG or TAG/item/TAG... (8 hex digits)")
    inst = _instance(request, study, series, instance)
    store = _archive(request).store
    reader = FrameReader(store, inst)
    steps = tag_path.split("/")
    tags = [int(t, 16) for t in steps[0::2]]
    items = [int(i) for i in steps[1::2]]
    if len(tags) == 1 and tags[0] in _PIXEL_TAGS:
        return _pixel_bulkdata(request, reader, tags[0])
    value = _bulk_value(reader, tags, items)
    etag = _etag(inst, f"bulk:{tag_path}")
    if _not_modified(request, etag):
        return _304(etag)
    part = Part(
        f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_LE}",
        size=len(value),
        source=partial(io.BytesIO, value),
    )
    writer = stable_writer(OCTET_STREAM, etag)
    return ranged_multipart(request, writer, [part], etag, _cache_headers(etag))


def _bulk_value(reader: FrameReader, tags: list[int], items: list[int]) -> bytes:
    ds = reader.header
    try:
        for depth, tag in enumerate(tags):
            if tag not in ds:
                raise KeyError(tag)
            elem = ds[tag]
            if depth == len(tags) - 1:
                break
            ds = elem.value[items[depth]]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise NotFound("no such attribute in the instance") from exc
    value = elem.value
    if not isinstance(value, bytes | bytearray):
        raise NotFound("the attribute holds no binary value")
    width = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(str(elem.VR), 1)
    little = reader.header.original_encoding[1] if reader.header.original_encoding else True
    if little is False and width > 1:
        import numpy as np

        value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return bytes(value)


def _pixel_bulkdata(request: Request, reader: FrameReader, tag: int) -> Response:
    """Pixel data: all frames uncompressed in one part, or (transfer-syntax=* or the
    stored media type) the stored frames one per part."""
    inst = reader.inst
    if reader.pixel_tag != tag:
        raise NotFound("no such pixel data element in the instance")
    count = reader.number_of_frames
    if count == 0:
        raise NotFound("the instance's pixel data could not be located")
    numbers = list(range(1, count + 1))
    choice = frame_choice(requested_accept(request), inst.transfer_syntax_uid)
    etag = _etag(inst, f"pixels:{choice.mode}")
    if _not_modified(request, etag):
        return _304(etag)
    if choice.mode == "stored":
        return _frames_response(reader, numbers, choice, etag)
    native = _native_pixels(reader)
    if native is not None:
        # The stored pixel bytes are the answer: one sized part, so Range works.
        offset, size = native
        part = Part(
            f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_LE}",
            size=size,
            source=partial(reader.store.open, inst.blob_key),
            offset=offset,
        )
        writer = stable_writer(OCTET_STREAM, etag)
        return ranged_multipart(request, writer, [part], etag, _cache_headers(etag))
    writer = MultipartWriter(choice.media_type)

    def body() -> Iterator[bytes]:
        for number in numbers:
            data, _meta = reader.uncompressed(number)
            yield data

    part = Part(f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_LE}", body())
    return StreamingResponse(
        writer.iter_body([part]), media_type=writer.content_type, headers=_cache_headers(etag)
    )


def _native_pixels(reader: FrameReader) -> tuple[int, int] | None:
    """(offset, length) of a native little-endian instance's frames in its blob, when
    they lie back to back (their uncompressed form is then exactly those bytes)."""
    if reader.encapsulated or reader.deflated or not UID(reader.transfer_syntax).is_little_endian:
        return None
    ranges = reader.ranges
    if not ranges or any(a[0] + a[1] != b[0] for a, b in itertools.pairwise(ranges)):
        return None
    return ranges[0][0], sum(length for _, length in ranges)


# -- frames ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameChoice:
    mode: str  # "stored" (the stored codestream) or "uncompressed"
    media_type: str
    transfer_syntax: str


def frame_choice(accept: str | None, stored: str) -> FrameChoice:
    """How to send frames of an instance stored in ``stored`` for this Accept header."""
    encapsulated = is_encapsulated(stored)
    stored_type = frame_media_type(stored)
    as_stored = FrameChoice("stored", stored_type, stored)
    uncompressed = FrameChoice("uncompressed", OCTET_STREAM, EXPLICIT_LE)
    decodable = not encapsulated or can_decode(stored)
    ranges = parse_accept(accept)
    if not ranges:
        if decodable:
            return uncompressed
        raise _not_acceptable_frames(stored)
    for r in ranges:
        part = r.part_type if r.is_multipart else r.type
        part = MEDIA_TYPE_ALIASES.get(part or "*/*", part or "*/*")
        syntax = r.transfer_syntax
        if part in ("*/*", "multipart/*"):
            # Anything: the default (uncompressed) unless asked for as stored.
            if syntax in (ANY_SYNTAX, stored) and encapsulated:
                return as_stored
            if syntax in (None, EXPLICIT_LE) and decodable:
                return uncompressed
            if syntax is None:
                return as_stored
            continue
        if part == OCTET_STREAM:
            if syntax == ANY_SYNTAX or (syntax == stored and encapsulated):
                return as_stored if encapsulated else uncompressed
            if syntax in (None, EXPLICIT_LE) and decodable:
                return uncompressed
            continue
        if not encapsulated:
            continue
        family = stored_type.split("/")[0] + "/*"
        if part in (stored_type, family) and syntax in (None, ANY_SYNTAX, stored):
            return as_stored
    raise _not_acceptable_frames(stored)


def _not_acceptable_frames(stored: str) -> HTTPError:
    options = [f"{OCTET_STREAM} (uncompressed)"] if can_decode(stored) else []
    if is_encapsulated(stored):
        options.append(f"{frame_media_type(stored)} or transfer-syntax=* (as stored)")
    return HTTPError(
        406,
        f"frames of this instance (stored as {stored}) are available as "
        + " or ".join(options or ["transfer-syntax=* only"]),
        reason="not-acceptable",
    )


def _parse_frames(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise HTTPError(400, "frame list must be comma-separated numbers, e.g. 1,3,5") from exc
    if not numbers or len(numbers) > 10000:
        raise HTTPError(400, "frame list must name 1 to 10000 frames")
    return numbers


def _frames_response(
    reader: FrameReader, numbers: list[int], choice: FrameChoice, etag: str
) -> Response:
    writer = MultipartWriter(choice.media_type)
    part_type = f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}"

    def parts() -> Iterator[Part]:
        for number in numbers:
            if choice.mode == "stored":
                yield Part(part_type, _lazy(reader.stored, number))
            else:
                yield Part(part_type, _lazy(lambda n: reader.uncompressed(n)[0], number))

    if len(numbers) == 1:
        # One frame (what a viewer asks for, slice by slice) is read whole anyway: one
        # body with its length, instead of a thread hop per multipart chunk.
        return Response(
            b"".join(writer.iter_body(parts())),
            media_type=writer.content_type,
            headers=_cache_headers(etag),
        )
    return StreamingResponse(
        writer.iter_body(parts()), media_type=writer.content_type, headers=_cache_headers(etag)
    )


def _lazy(read, number: int) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    yield read(number)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Retrieve frames (multipart octet-stream or stored image media types)",
)
def retrieve_frames(
    request: Request, study: str, series: str, instance: str, frames: str
) -> Response:
    numbers = _parse_frames(frames)
    inst = _instance(request, study, series, instance)
    reader = FrameReader(_archive(request).store, inst)
    reader.check_frames(numbers)
    choice = frame_choice(requested_accept(request), inst.transfer_syntax_uid)
    etag = _etag(inst, f"frames:{frames}:{choice.mode}")
    if _not_modified(request, etag):
        return _304(etag)
    return _frames_response(reader, numbers, choice, etag)


# -- rendered and thumbnails -----------------------------------------------------------
def _render_options(
    request: Request, window: str | None, viewport: str | None, quality: str | None
) -> rendered.RenderOptions:
    return rendered.RenderOptions(
        media_type=rendered.choose_media_type(requested_accept(request)),
        window=rendered.parse_window(window),
        viewport=rendered.parse_viewport(viewport),
        quality=rendered.parse_quality(quality),
    )


def _image_response(
    request: Request,
    inst: StoredInstance,
    number: int,
    options: rendered.RenderOptions,
    *,
    thumbnail: bool = False,
) -> Response:
    archive = _archive(request)
    reader = FrameReader(archive.store, inst)
    if reader.number_of_frames == 0:
        raise HTTPError(
            406, "the instance has no pixel data to render as an image", reason="not-acceptable"
        )
    reader.check_frames([number])
    if not can_decode(inst.transfer_syntax_uid):
        raise HTTPError(
            406,
            f"no decoder for transfer syntax {inst.transfer_syntax_uid} is installed here, "
            "so the instance cannot be rendered",
            reason="not-acceptable",
        )
    etag = _etag(inst, f"{'thumbnail' if thumbnail else 'rendered'}:{number}:{options.variant()}")
    if _not_modified(request, etag):
        return _304(etag)
    try:
        if thumbnail:
            data = rendered.cached_thumbnail(
                archive.store, _scratch(request), reader, number, options
            )
        else:
            data = rendered.render(reader, number, options)
    except InvalidDataset:
        raise
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise InvalidDataset(f"frame {number} cannot be rendered: {exc}") from exc
    return Response(data, media_type=options.media_type, headers=_cache_headers(etag))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="Rendered instance (first frame)",
)
def rendered_instance(
    request: Request,
    study: str,
    series: str,
    instance: str,
    window: str | None = Query(None, description="center,width[,linear|linear-exact|sigmoid]"),
    viewport: str | None = Query(None, description="vw,vh[,sx,sy,sw,sh]"),
    quality: str | None = Query(None, description="1-100 (JPEG)"),
) -> Response:
    options = _render_options(request, window, viewport, quality)
    inst = _instance(request, study, series, instance)
    return _image_response(request, inst, 1, options)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="Rendered frame",
)
def rendered_frame(
    request: Request,
    study: str,
    series: str,
    instance: str,
    frame: str,
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
) -> Response:
    numbers = _parse_frames(frame)
    if len(numbers) != 1:
        raise HTTPError(400, "a rendered frame names one frame number")
    options = _render_options(request, window, viewport, quality)
    inst = _instance(request, study, series, instance)
    return _image_response(request, inst, numbers[0], options)


@router.get("/studies/{study}/rendered", summary="Rendered study (its representative image)")
def rendered_study(
    request: Request,
    study: str,
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
) -> Response:
    options = _render_options(request, window, viewport, quality)
    req = RetrieveRequest(Level.STUDY, study_uids=[_uid(study, "Study Instance UID")])
    inst = _representative(_permitted(request, Operation.VIEW, req))
    return _image_response(request, inst, 1, options)


@router.get(
    "/studies/{study}/series/{series}/rendered",
    summary="Rendered series (its representative image)",
)
def rendered_series(
    request: Request,
    study: str,
    series: str,
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
) -> Response:
    options = _render_options(request, window, viewport, quality)
    req = RetrieveRequest(
        Level.SERIES,
        study_uids=[_uid(study, "Study Instance UID")],
        series_uids=[_uid(series, "Series Instance UID")],
    )
    inst = _representative(_permitted(request, Operation.VIEW, req))
    return _image_response(request, inst, 1, options)


def _thumbnail_options(request: Request, viewport: str | None) -> rendered.RenderOptions:
    media_type = rendered.choose_media_type(requested_accept(request))
    options = rendered.thumbnail_options(media_type)
    custom = rendered.parse_viewport(viewport)
    return options if custom is None else replace(options, viewport=custom)


def _representative(instances: Sequence[StoredInstance]) -> StoredInstance:
    """The middle image of the first series that has images."""
    inst = rendered.representative(instances)
    if inst is None:
        raise HTTPError(406, "nothing here has pixel data for a thumbnail", reason="not-acceptable")
    return inst


@router.get("/studies/{study}/thumbnail", summary="Thumbnail of a study")
def study_thumbnail(request: Request, study: str, viewport: str | None = None) -> Response:
    options = _thumbnail_options(request, viewport)
    req = RetrieveRequest(Level.STUDY, study_uids=[_uid(study, "Study Instance UID")])
    inst = _representative(_permitted(request, Operation.VIEW, req))
    return _image_response(request, inst, 1, options, thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="Thumbnail of a series")
def series_thumbnail(
    request: Request, study: str, series: str, viewport: str | None = None
) -> Response:
    options = _thumbnail_options(request, viewport)
    req = RetrieveRequest(
        Level.SERIES,
        study_uids=[_uid(study, "Study Instance UID")],
        series_uids=[_uid(series, "Series Instance UID")],
    )
    inst = _representative(_permitted(request, Operation.VIEW, req))
    return _image_response(request, inst, 1, options, thumbnail=True)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="Thumbnail of an instance",
)
def instance_thumbnail(
    request: Request, study: str, series: str, instance: str, viewport: str | None = None
) -> Response:
    options = _thumbnail_options(request, viewport)
    inst = _instance(request, study, series, instance)
    return _image_response(request, inst, 1, options, thumbnail=True)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/thumbnail",
    summary="Thumbnail of a frame",
)
def frame_thumbnail(
    request: Request,
    study: str,
    series: str,
    instance: str,
    frame: str,
    viewport: str | None = None,
) -> Response:
    numbers = _parse_frames(frame)
    if len(numbers) != 1:
        raise HTTPError(400, "a thumbnail names one frame number")
    options = _thumbnail_options(request, viewport)
    inst = _instance(request, study, series, instance)
    return _image_response(request, inst, numbers[0], options, thumbnail=True)


# -- WADO-URI --------------------------------------------------------------------------
@router.get("/wado", summary="WADO-URI (PS3.18 9): DICOM or a rendered image")
def wado_uri(
    request: Request,
    requestType: str | None = None,
    studyUID: str | None = None,
    seriesUID: str | None = None,
    objectUID: str | None = None,
    contentType: str | None = None,
    transferSyntax: str | None = None,
    frameNumber: str | None = None,
    rows: str | None = None,
    columns: str | None = None,
    region: str | None = None,
    windowCenter: str | None = None,
    windowWidth: str | None = None,
    imageQuality: str | None = None,
    anonymize: str | None = None,
) -> Response:
    if requestType != "WADO":
        raise HTTPError(400, "requestType must be WADO")
    if not (studyUID and seriesUID and objectUID):
        raise HTTPError(400, "studyUID, seriesUID and objectUID are required")
    if anonymize:
        raise HTTPError(400, "anonymize is not supported")
    inst = _instance(request, studyUID, seriesUID, objectUID)
    media = _wado_content_type(contentType, inst)
    if media == DICOM:
        authorize(request, Operation.DOWNLOAD, [inst.study_uid], not_found(Level.IMAGE, objectUID))
        return _wado_dicom(request, inst, transferSyntax)
    number = 1
    if frameNumber:
        number = _parse_frames(frameNumber)[0]
    window = None
    if windowCenter or windowWidth:
        if not (windowCenter and windowWidth):
            raise HTTPError(400, "windowCenter and windowWidth go together")
        window = rendered.parse_window(f"{windowCenter},{windowWidth}")
    options = rendered.RenderOptions(
        media_type=media,
        window=window,
        viewport=_wado_viewport(rows, columns, inst),
        quality=rendered.parse_quality(imageQuality),
        fraction_region=_wado_region(region),
    )
    return _image_response(request, inst, number, options)


def _wado_content_type(value: str | None, inst: StoredInstance) -> str:
    is_image = bool(inst.rows and inst.columns)
    if not value:
        return rendered.JPEG if is_image else DICOM
    for item in value.split(","):
        media = item.split(";")[0].strip().lower()
        if media in (DICOM, *rendered.RENDERED_TYPES):
            return media
        if media in ("*/*", "image/*"):
            return rendered.JPEG if is_image else DICOM
    raise HTTPError(
        406,
        f"contentType must be {DICOM}, image/jpeg, image/png or image/gif",
        reason="not-acceptable",
    )


def _wado_dicom(request: Request, inst: StoredInstance, syntax: str | None) -> Response:
    wanted = [syntax] if syntax else [EXPLICIT_LE]
    if syntax and syntax != ANY_SYNTAX and not is_valid_uid(syntax):
        raise HTTPError(400, "transferSyntax is not a valid UID")
    chosen = deliverable_syntax(inst, wanted)
    if chosen is None:
        raise HTTPError(
            406,
            f"instance is stored in {inst.transfer_syntax_uid}; it can be sent as stored "
            f"or as {EXPLICIT_LE}",
            reason="transfer-syntax-not-supported",
        )
    etag = _etag(inst, "" if chosen == inst.transfer_syntax_uid else f"dicom:{chosen}")
    if _not_modified(request, etag):
        return _304(etag)
    store = _archive(request).store
    headers = _cache_headers(etag)
    headers["Content-Disposition"] = f'attachment; filename="{inst.sop_uid}.dcm"'
    return StreamingResponse(
        iter_part10(store, inst, chosen, _CHUNK),
        media_type=f"{DICOM}; transfer-syntax={chosen}",
        headers=headers,
    )


def _wado_viewport(
    rows: str | None, columns: str | None, inst: StoredInstance
) -> rendered.Viewport | None:
    if not rows and not columns:
        return None
    try:
        height = int(rows) if rows else None
        width = int(columns) if columns else None
    except ValueError as exc:
        raise HTTPError(400, "rows and columns must be whole numbers") from exc
    limit = rendered.MAX_VIEWPORT
    for value in (height, width):
        if value is not None and not 1 <= value <= limit:
            raise HTTPError(400, f"rows and columns must be 1-{limit}")
    # One of them alone keeps the aspect ratio: the other side is left unbounded.
    return rendered.Viewport(width or limit, height or limit)


def _wado_region(text: str | None) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise HTTPError(400, "region must be four numbers 0.0-1.0") from exc
    if len(values) != 4 or not all(0.0 <= v <= 1.0 for v in values):
        raise HTTPError(400, "region must be four numbers 0.0-1.0")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise HTTPError(400, "region must have its lower right corner after its upper left")
    return (x1, y1, x2, y2)
