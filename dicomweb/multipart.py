"""Accept header parsing and streamed ``multipart/related`` bodies (PS3.18 8.6, 8.7).

``parse_accept`` reads an Accept header into media ranges in preference order
(q-values, then the order given). The parameters of a multipart range may name the
part media type and transfer syntax either beside ``type`` or inside its quotes
(``type="application/dicom; transfer-syntax=*"``), both of which clients send.

``MultipartWriter`` frames parts around byte iterators so a response body is
produced part by part, chunk by chunk: nothing larger than a chunk is held.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO


@dataclass(frozen=True)
class MediaRange:
    type: str  # lower case, e.g. "multipart/related", "application/dicom", "*/*"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def is_multipart(self) -> bool:
        return self.type in ("multipart/related", "multipart/*")

    @property
    def part_type(self) -> str | None:
        """Media type of the parts: the ``type`` parameter of a multipart range, else
        the range itself."""
        if self.is_multipart:
            return self.params.get("type")
        return self.type

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def parse_media_type(text: str) -> MediaRange:
    pieces = _split(text, ";")
    mtype = pieces[0].strip().lower()
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        name = name.strip().lower()
        value = value.strip().strip('"').strip()
        if not name:
            continue
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(value)))
            except ValueError:
                q = 0.0
            continue
        if name == "type" and ";" in value:
            # type="application/dicom; transfer-syntax=..." (quoted parameters)
            inner = parse_media_type(value)
            value = inner.type
            for key, inner_value in inner.params.items():
                params.setdefault(key, inner_value)
        elif name == "type":
            value = value.lower()
        params[name] = value
    return MediaRange(mtype, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges of an Accept header, most preferred first; q=0 ranges dropped."""
    if not header or not header.strip():
        return []
    ranges = [parse_media_type(part) for part in _split(header, ",") if part.strip()]
    ranges = [r for r in ranges if r.q > 0 and r.type]
    # Stable sort: equal q keeps the client's order.
    return sorted(ranges, key=lambda r: -r.q)


def new_boundary() -> str:
    return secrets.token_hex(16)


@dataclass
class Part:
    """One part: its body as byte chunks, or ``size`` bytes read from ``source()``.

    A sized source lets the response declare its Content-Length, and its body
    chunks go to the socket as read from the file, with no copy to add framing.
    """

    content_type: str
    body: Iterable[bytes] = ()
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    source: Callable[[], BinaryIO] | None = None
    # Where the ``size`` bytes start in ``source()`` (e.g. pixel data inside a blob).
    offset: int = 0


class MultipartWriter:
    """Frames parts of a ``multipart/related`` body (RFC 2387) as they are produced."""

    def __init__(self, part_type: str, boundary: str | None = None) -> None:
        self.part_type = part_type
        self.boundary = boundary or new_boundary()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def _head(self, part: Part) -> bytes:
        head = [f"--{self.boundary}", f"Content-Type: {part.content_type}"]
        head.extend(f"{name}: {value}" for name, value in part.headers.items())
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("latin-1")

    def content_length(self, parts: Sequence[Part]) -> int | None:
        """The body's length when every part is sized, else None."""
        if any(part.size is None or part.source is None for part in parts):
            return None
        return sum(len(self._head(p)) + (p.size or 0) + 2 for p in parts) + len(self._tail())

    def range_spans(self, parts: Sequence[Part], start: int, end: int) -> Iterator[Piece]:
        """Bytes ``start`` to ``end`` (inclusive) of the body of sized parts (an HTTP
        Range): framing cut from memory, part bodies as spans from ``start`` on, so a
        range near the end of a large instance reads only itself."""
        pos = 0
        for part in parts:
            assert part.source is not None and part.size is not None
            for piece in (self._head(part), part, b"\r\n"):
                length = len(piece) if isinstance(piece, bytes) else part.size
                lo, hi = max(start, pos), min(end + 1, pos + length)
                if lo < hi:
                    if isinstance(piece, bytes):
                        yield piece[lo - pos : hi - pos]
                    else:
                        yield FileSpan(part, lo - pos, hi - lo)
                pos += length
        tail = self._tail()
        lo, hi = max(start, pos), min(end + 1, pos + len(tail))
        if lo < hi:
            yield tail[lo - pos : hi - pos]

    def iter_range(
        self, parts: Sequence[Part], start: int, end: int, chunk_size: int = 4 << 20
    ) -> Iterator[bytes]:
        """``range_spans``, read."""
        return materialize(self.range_spans(parts, start, end), chunk_size)

    def spans(self, parts: Iterable[Part]) -> Iterator[Piece]:
        """The body: framing and unsized parts' chunks as bytes, sized parts' bodies as
        spans of their source (read by ``materialize``, or sent from their file by a
        server that can: ``dicomweb.zerocopy``)."""
        # Each yielded item costs a trip through the server's thread pool and an HTTP
        # chunk, so the small framing pieces ride along with the part's first chunk.
        pending = b""
        for part in parts:
            pending += self._head(part)
            if part.source is not None and part.size is not None:
                # Framing goes as its own small chunk: joining it to the body would
                # copy the body (sized parts are sent with a Content-Length, so a
                # chunk costs no HTTP chunk framing, and BatchedStream batches them).
                yield pending
                pending = b"\r\n"
                yield FileSpan(part, 0, part.size, whole=True)
                continue
            for chunk in part.body:
                if not chunk:
                    continue
                if pending:
                    chunk = pending + chunk
                    pending = b""
                yield chunk
            pending += b"\r\n"
        yield pending + self._tail()

    def iter_body(self, parts: Iterable[Part], chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """The body, chunk by chunk; a sized part comes in chunks of ``chunk_size``."""
        return materialize(self.spans(parts), chunk_size)


@dataclass(frozen=True)
class FileSpan:
    """``length`` bytes of a sized part's body from ``skip`` on. ``whole``: the
    part's entire body, whose source must then hold exactly ``size`` bytes past its
    offset (never send a silently shortened or lengthened part)."""

    part: Part
    skip: int
    length: int
    whole: bool = False


Piece = bytes | FileSpan


def materialize(pieces: Iterable[Piece], chunk_size: int = 4 << 20) -> Iterator[bytes]:
    """The bytes of ``pieces``: spans read from their source in chunks."""
    for piece in pieces:
        if isinstance(piece, FileSpan):
            yield from read_span(piece, chunk_size)
        else:
            yield piece


def read_span(span: FileSpan, chunk_size: int) -> Iterator[bytes]:
    """The span's bytes, read in chunks (each a fresh, unzeroed buffer)."""
    part = span.part
    assert part.source is not None and part.size is not None
    left = span.length
    with part.source() as fh:
        if part.offset + span.skip:
            fh.seek(part.offset + span.skip)
        while left:
            chunk = fh.read(min(left, chunk_size))
            if not chunk:
                raise OSError(f"blob ended {left} bytes before its recorded size")
            left -= len(chunk)
            yield chunk
        if span.whole and part.offset == 0 and fh.read(1):
            # Never send a silently shortened part: the client sees a broken body.
            raise OSError("blob is longer than its recorded size")
