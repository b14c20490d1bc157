"""Serving the viewer's pages with strict browser security headers.

``create_app(settings)`` is a small Starlette application, mounted by the HTTP app
at ``/viewer``:

- ``/viewer/`` the viewer page (``static/index.html``); the study to show and any
  other state travel in the URL fragment, which browsers never send to a server;
- ``/viewer/signin``, ``/viewer/portal``, ``/viewer/inbox`` the portal pages (sign-in,
  a patient's studies and sharing, an institution's inbox), which talk to ``/api``
  with a session cookie the scripts cannot read (``dicomweb.sessions``);
- ``/viewer/share`` the share-link page (``static/share.html``): a link is
  ``/viewer/share#sbl_...``; the page trades the token for an access token by POST
  and opens the viewer (``static/js/share.js``);
- ``/viewer/config.json`` what the page needs to know about this server (where the
  DICOMweb API lives, the languages it speaks);
- ``/viewer/static/...`` the page's modules, styles and language catalogues.

Every response carries a Content-Security-Policy without inline script or style,
``Referrer-Policy: no-referrer`` (a share token or study identifier in a page's
address must never leak to another site), ``X-Content-Type-Options: nosniff``,
``X-Frame-Options: DENY`` and cross-origin opener isolation. Static files are
revalidated on every use (``no-cache`` with ETags), so an upgrade never mixes old
and new modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import Settings

STATIC = Path(__file__).parent / "static"
LANGUAGES = ("en", "ko")

# blob: images are frames and thumbnails fetched with the Bearer header; a blob:
# frame shows an Encapsulated PDF report. Nothing inline, nothing from elsewhere.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "font-src 'self'",
        "frame-src blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` (and a cache policy) to every response of the pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                headers.setdefault("Cache-Control", "no-cache")
            await send(message)

        await self.app(scope, receive, with_headers)


def _page(_request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


def _static_page(name: str) -> Callable[[Request], Response]:
    def page(_request: Request) -> Response:
        return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")

    return page


def _share_page(_request: Request) -> Response:
    # Static: the link's token is in the fragment, which never reaches this server, and
    # serving the page consumes nothing (link scanners fetch it). no-store: nothing of
    # a link page is kept in caches.
    response = FileResponse(STATIC / "share.html", media_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response


def create_app(settings: Settings) -> ASGIApp:
    """The viewer's pages as an ASGI app, to be mounted at ``/viewer``."""
    config = json.dumps(
        {
            "dicomweb": settings.dicomweb_prefix.rstrip("/"),
            "languages": list(LANGUAGES),
        }
    ).encode()

    def page_config(_request: Request) -> Response:
        return Response(config, media_type="application/json")

    app = Starlette(
        routes=[
            Route("/", _page),
            # The portal: sign-in, a patient's studies, links, consents, requests and
            # history, and an institution's inbox (their data comes from /api).
            Route("/signin", _static_page("signin.html")),
            Route("/portal", _static_page("portal.html")),
            Route("/inbox", _static_page("inbox.html")),
            Route("/share", _share_page),
            Route("/config.json", page_config),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
    return SecurityHeaders(app)
