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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


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
    content_type: str
    body: Iterable[bytes]
    headers: dict[str, str] = field(default_factory=dict)


class MultipartWriter:
    """Frames parts of a ``multipart/related`` body (RFC 2387) as they are produced."""

    def __init__(self, part_type: str, boundary: str | None = None) -> None:
        self.part_type = part_type
        self.boundary = boundary or new_boundary()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def iter_body(self, parts: Iterable[Part]) -> Iterator[bytes]:
        # Each yielded item costs a trip through the server's thread pool and an HTTP
        # chunk, so the small framing pieces ride along with the part's first chunk.
        pending = b""
        for part in parts:
            head = [f"--{self.boundary}", f"Content-Type: {part.content_type}"]
            head.extend(f"{name}: {value}" for name, value in part.headers.items())
            pending += ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
            for chunk in part.body:
                if not chunk:
                    continue
                if pending:
                    chunk = pending + chunk
                    pending = b""
                yield chunk
            pending += b"\r\n"
        yield pending + f"--{self.boundary}--\r\n".encode("latin-1")
