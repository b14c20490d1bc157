"""An incremental (push) parser of ``multipart/*`` request bodies, RFC 2046 5.1 and
RFC 2387 (the writer of multipart responses is ``dicomweb.multipart``).

The parser does no I/O. ``feed`` takes the body as it arrives, in chunks of any
size, and returns events: ``PartStart`` (the part's headers), ``PartData`` (a
slice of the part's content) and ``PartEnd``. ``close`` says whether the body
ended properly (after the close delimiter). Memory stays bounded whatever the
size of the parts: the parser keeps only the bytes that may still be the start
of a delimiter (the delimiter's length), the part headers being read (at most
``max_header_bytes``), and nothing of the preamble or the epilogue.

Strictness: line breaks around delimiters and in part headers must be CRLF; the
delimiter may be followed by transport padding (spaces, tabs) before its CRLF; a
preamble longer than ``max_preamble_bytes`` means the body is not the multipart
it claims to be. Whatever follows the close delimiter (the epilogue) is ignored.

``parse_media_type`` reads a ``Content-Type`` value with its parameters (quoted
or not), as used for the request and for each part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "MultipartError",
    "MultipartParser",
    "PartData",
    "PartEnd",
    "PartStart",
    "check_boundary",
    "parse_media_type",
]


class MultipartError(ValueError):
    """The body is not well-formed multipart."""


@dataclass(frozen=True)
class PartStart:
    """The headers of a new part; names are lower case, values as sent (latin-1)."""

    headers: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True)
class PartData:
    """A slice of the current part's content (valid until the next ``feed``)."""

    data: memoryview


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete: its closing delimiter was seen."""


Event = PartStart | PartData | PartEnd

# RFC 2046 5.1.1: bcharsnospace and space; 1 to 70 characters, not ending in space.
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
# RFC 7230 token characters, for header names and media types.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)
_MAX_PADDING = 256


def check_boundary(boundary: str) -> str:
    """The boundary if it is one RFC 2046 allows, else ``MultipartError``."""
    if not _BOUNDARY_RE.match(boundary):
        raise MultipartError(
            "multipart boundary must be 1-70 characters of letters, digits and '()+_,-./:=? "
        )
    return boundary


class MultipartParser:
    def __init__(
        self,
        boundary: str,
        *,
        max_header_bytes: int = 16 * 1024,
        max_preamble_bytes: int = 64 * 1024,
    ) -> None:
        self._delimiter = b"\r\n--" + check_boundary(boundary).encode("ascii")
        self._max_header_bytes = max_header_bytes
        self._max_preamble_bytes = max_preamble_bytes
        # A virtual line break before the body, so that a delimiter on the first line
        # is found like every other one.
        self._pending = b"\r\n"
        self._state = _PREAMBLE
        self._preamble = 0
        self.parts = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held back (a possible delimiter start or incomplete headers)."""
        return len(self._pending)

    @property
    def complete(self) -> bool:
        return self._state == _EPILOGUE

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse the next chunk of the body; the events it completes, in order."""
        if self._state == _EPILOGUE:
            return []
        buf = self._pending + bytes(data) if self._pending else bytes(data)
        self._pending = b""
        view = memoryview(buf)
        events: list[Event] = []
        delimiter = self._delimiter
        keep = len(delimiter) - 1
        pos = 0
        while True:
            if self._state == _BODY or self._state == _PREAMBLE:
                found = buf.find(delimiter, pos)
                end = found if found >= 0 else max(pos, len(buf) - keep)
                if self._state == _BODY:
                    if end > pos:
                        events.append(PartData(view[pos:end]))
                else:
                    self._preamble += end - pos
                    if self._preamble > self._max_preamble_bytes:
                        raise MultipartError(
                            f"no multipart boundary delimiter in the first "
                            f"{self._max_preamble_bytes} bytes of the body"
                        )
                if found < 0:
                    self._pending = buf[end:]
                    return events
                if self._state == _BODY:
                    events.append(PartEnd())
                pos = found + len(delimiter)
                self._state = _AFTER_DELIMITER
            elif self._state == _AFTER_DELIMITER:
                # "--" closes the body; otherwise transport padding, then CRLF.
                if len(buf) - pos < 2:
                    self._pending = buf[pos:]
                    return events
                if buf.startswith(b"--", pos):
                    self._state = _EPILOGUE
                    return events
                start = pos
                while start < len(buf) and buf[start] in b" \t":
                    start += 1
                if start - pos > _MAX_PADDING:
                    raise MultipartError("too much padding after a boundary delimiter")
                if len(buf) - start < 2:
                    self._pending = buf[pos:]
                    return events
                if not buf.startswith(b"\r\n", start):
                    raise MultipartError("boundary delimiter not followed by a line break")
                # The CRLF stays: the header block is searched for from it.
                pos = start
                self._state = _HEADERS
            else:  # _HEADERS, positioned on the CRLF that ended the delimiter line
                found = buf.find(b"\r\n\r\n", pos)
                limit = self._max_header_bytes + 4
                if found < 0:
                    if len(buf) - pos > limit:
                        raise MultipartError("part headers too long")
                    self._pending = buf[pos:]
                    return events
                if found - pos > limit:
                    raise MultipartError("part headers too long")
                events.append(PartStart(_parse_headers(buf[pos + 2 : found])))
                self.parts += 1
                pos = found + 4
                self._state = _BODY

    def close(self) -> None:
        """The body has ended: raise ``MultipartError`` unless it ended properly."""
        if self._state == _EPILOGUE:
            return
        if self._state == _PREAMBLE:
            raise MultipartError("body has no multipart boundary delimiter")
        if self._state == _BODY:
            raise MultipartError("body ended inside a part (no closing boundary delimiter)")
        raise MultipartError("body ended without the closing boundary delimiter")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = ""
    if not block:
        return headers
    for raw in block.split(b"\r\n"):
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            # obsolete line folding: continues the previous header
            if not last:
                raise MultipartError("part header block starts with a continuation line")
            headers[last] = f"{headers[last]} {line.strip()}"
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.match(name):
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        last = name.lower()
        value = value.strip()
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    return headers


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters (names lower case).

    Parameter values may be tokens or quoted strings (with backslash escapes).
    Raises ``MultipartError`` for a value that does not parse.
    """
    text = value.strip()
    media, _, rest = text.partition(";")
    media = media.strip().lower()
    kind, slash, sub = media.partition("/")
    if not slash or not _TOKEN_RE.match(kind) or not _TOKEN_RE.match(sub):
        raise MultipartError(f"malformed media type {value[:80]!r}")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise MultipartError(f"malformed media type parameter in {value[:80]!r}")
        name = rest[i:eq].strip().lower()
        if not _TOKEN_RE.match(name):
            raise MultipartError(f"malformed media type parameter name in {value[:80]!r}")
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= n:
                raise MultipartError(f"unterminated quoted string in {value[:80]!r}")
            i += 1
            param = "".join(chars)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            param = rest[i:end].strip()
            # Tokens, leniently: boundaries sent unquoted often hold '/', '=' or ':'.
            if not param or any(c in param for c in ' \t"'):
                raise MultipartError(f"malformed media type parameter value in {value[:80]!r}")
            i = end
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] != ";":
            raise MultipartError(f"malformed media type parameters in {value[:80]!r}")
        params[name] = param
    return media, params
