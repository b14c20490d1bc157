"""ASGI middleware of the HTTP door: errors as JSON, browser headers, gzip for JSON.

- ``CatchAllErrors`` turns an exception no handler took into a 500 JSON body *inside*
  the CORS middleware, so a browser viewer sees the status (with CORS headers)
  instead of an opaque network error. Starlette's own last-resort handler sits
  outside every user middleware and answers without CORS headers.
- ``ResourcePolicy`` adds ``Cross-Origin-Resource-Policy: cross-origin`` to DICOMweb
  responses, so pages with cross-origin isolation (COEP, needed by OHIF's
  SharedArrayBuffer decoders) may load them.
- ``HeadAsGet`` answers ``HEAD`` on every ``GET`` resource (RFC 9110 9.3.2): the
  request is routed as ``GET`` and the server sends the headers only. Large streamed
  bodies (``dicomweb.streaming.BatchedStream``) see the ``HEAD_ONLY`` scope key and
  read nothing, so a HEAD of a study gives its Content-Length without reading it.
- ``MaskNationalIDs`` masks national identification numbers in the JSON answers
  (QIDO-RS, metadata, portal API) of a principal that has no need for them
  (``consent.access.sees_national_ids``); it runs inside ``JSONGZip``, on the body
  before compression. Instances themselves (``application/dicom``) are returned as
  stored: whoever may download them may see what they hold.
- ``JSONGZip`` compresses JSON responses (``application/json``, ``*+json``) of at
  least ``minimum_size`` bytes for clients that accept gzip. Pixel data, multipart,
  DICOM and image responses pass through untouched: they are compressed already, or
  large and streamed, and must keep their byte ranges.
"""

from __future__ import annotations

import gzip
import logging
import re

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consent.access import sees_national_ids
from dicomweb.dicomjson import dumps
from gateway.ops.national_ids import mask_bytes

log = logging.getLogger(__name__)


class CatchAllErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = dumps({"error": "internal-error", "message": "internal server error"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


HEAD_ONLY = "studybridge.head_only"


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return
        # The server keeps its own scope (method HEAD) and sends no body bytes; the
        # app sees a GET.
        await self.app({**scope, "method": "GET", HEAD_ONLY: True}, receive, send)


class ResourcePolicy:
    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == self.prefix or path.startswith(self.prefix + "/")
        ):
            await self.app(scope, receive, send)
            return

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Cross-Origin-Resource-Policy", "cross-origin")
            await send(message)

        await self.app(scope, receive, with_policy)


_JSON_TYPE = re.compile(r"^application/([a-z0-9.+-]+\+)?json$")
_GZIP_REFUSED = re.compile(r"(^|,)\s*gzip\s*;\s*q=0(\.0*)?\s*(,|$)")


class _JSONRewriter:
    """Buffers a JSON response (``application/json``, ``*+json``, not already encoded)
    and rewrites its whole body once complete; subclasses say when and how."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def applies(self, scope: Scope) -> bool:
        """Whether this request's answer may be rewritten at all (before routing)."""
        return True

    def wants(self, scope: Scope, start: Message) -> bool:
        """Whether to rewrite this answer (its status and headers are known)."""
        return True

    def rewrite(self, body: bytes, headers: MutableHeaders) -> bytes:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.applies(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        passthrough = False

        async def rewriting_send(message: Message) -> None:
            nonlocal start, passthrough
            if passthrough:
                await send(message)
                return
            if message["type"] == "http.response.start":
                headers = Headers(raw=message.get("headers", []))
                media = headers.get("content-type", "").partition(";")[0].strip().lower()
                if (
                    not _JSON_TYPE.match(media)
                    or "content-encoding" in headers
                    or not self.wants(scope, message)
                ):
                    passthrough = True
                    await send(message)
                    return
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers = MutableHeaders(scope=start)
            body = self.rewrite(b"".join(chunks), headers)
            headers["Content-Length"] = str(len(body))
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


class MaskNationalIDs(_JSONRewriter):
    def wants(self, scope: Scope, start: Message) -> bool:
        # The principal is known once the route ran (dicomweb.access).
        principal = scope.get("state", {}).get("principal")
        return principal is not None and not sees_national_ids(principal)

    def rewrite(self, body: bytes, headers: MutableHeaders) -> bytes:
        return mask_bytes(body)


def _accepts_gzip(value: str) -> bool:
    value = value.lower()
    return "gzip" in value and not _GZIP_REFUSED.search(value)


class JSONGZip(_JSONRewriter):
    # Level 1, as nginx's default: a QIDO page of 100 studies (96 KB) compresses in
    # 0.17 ms to 9.7 KB, where level 6 took 0.63 ms for 7.2 KB.
    def __init__(self, app: ASGIApp, minimum_size: int = 1024, level: int = 1) -> None:
        super().__init__(app)
        self.minimum_size = minimum_size
        self.level = level

    def applies(self, scope: Scope) -> bool:
        return _accepts_gzip(Headers(scope=scope).get("accept-encoding", ""))

    def wants(self, scope: Scope, start: Message) -> bool:
        return start["status"] not in (204, 206, 304)

    def rewrite(self, body: bytes, headers: MutableHeaders) -> bytes:
        headers.add_vary_header("Accept-Encoding")
        if len(body) >= self.minimum_size:
            body = gzip.compress(body, compresslevel=self.level, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return body
