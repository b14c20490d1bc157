"""HTTP Range requests (RFC 9110 section 14) on WADO-RS resources of fixed bytes.

A single instance as stored and a bulk data value (an attribute's bytes, or the
uncompressed pixel data of a native instance) are the same bytes on every request:
their multipart body is framed with a boundary derived from the ETag, so its length
is known and a byte range of it means the same thing each time. Such a response
says ``Accept-Ranges: bytes`` and answers one byte range (``bytes=a-b``, ``a-`` or
``-n``) with 206 and ``Content-Range``, reading only that range from the blob (a
viewer fetching pixel data in pieces, or a download resumed after a dropped
connection). A range starting past the end is a 416 with ``Content-Range: bytes
*/length``. As the RFC allows, a header the server does not take (several ranges,
another unit, bad syntax) or an ``If-Range`` that is not the current ETag gets the
whole body (200). Bodies that are built as they are sent (transcoded instances,
decoded frames) have no length to range over and ignore Range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from starlette.requests import Request
from starlette.responses import Response

from dicomweb.errors import HTTPError
from dicomweb.multipart import MultipartWriter, Part
from dicomweb.streaming import BatchedStream


def stable_writer(part_type: str, etag: str) -> MultipartWriter:
    """A writer whose boundary follows from the representation's ETag."""
    return MultipartWriter(part_type, boundary=hashlib.sha256(etag.encode()).hexdigest()[:32])


def requested_range(request: Request, total: int, etag: str | None) -> tuple[int, int] | None:
    """The one byte range asked for, inclusive, or None for the whole body."""
    header = request.headers.get("range")
    if not header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and (etag is None or if_range.strip() != etag):
        return None  # the client's copy is another representation: send it all
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or "," in spec:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or total == 0:
            raise _unsatisfiable(total)
        return max(0, total - suffix), total - 1
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range: ignored
    if start >= total:
        raise _unsatisfiable(total)
    return start, min(int(last), total - 1) if last else total - 1


def _unsatisfiable(total: int) -> HTTPError:
    return HTTPError(
        416,
        f"the requested range starts beyond the {total} bytes of this resource",
        reason="range-not-satisfiable",
        headers={"Content-Range": f"bytes */{total}"},
    )


def ranged_multipart(
    request: Request,
    writer: MultipartWriter,
    parts: Sequence[Part],
    etag: str | None,
    headers: Mapping[str, str],
) -> Response:
    """The multipart body of ``parts``: whole (200) or the byte range asked for (206)."""
    total = writer.content_length(parts)
    if total is None:
        return BatchedStream(writer.spans(parts), media_type=writer.content_type, headers=headers)
    headers = {**headers, "Accept-Ranges": "bytes"}
    span = requested_range(request, total, etag)
    if span is None:
        return BatchedStream(
            writer.spans(parts),
            media_type=writer.content_type,
            headers=headers,
            content_length=total,
        )
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{total}"
    return BatchedStream(
        writer.range_spans(parts, start, end),
        media_type=writer.content_type,
        headers=headers,
        content_length=end - start + 1,
        status_code=206,
    )
