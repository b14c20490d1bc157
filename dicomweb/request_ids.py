"""Request IDs: every HTTP request gets one, in its log lines and its response.

A sane ``X-Request-ID`` from the client or the proxy (up to 64 letters, digits,
``.``, ``_``, ``-``) is kept so one ID follows a request across hops; otherwise a
new one is made. It is set in ``gateway.ops.logs.request_id`` for the duration of
the request (JSON log lines carry it) and echoed as ``X-Request-ID``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from gateway.ops.logs import request_id

_SANE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIDs:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        rid = given if _SANE.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
