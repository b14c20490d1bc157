"""The one place that decides the DICOMweb base URL written into responses.

Retrieve URLs (QIDO, STOW) and BulkDataURIs (metadata) must point where the client
can reach us. In order: ``settings.public_base_url`` when set (a deployment behind
a proxy names its public address once); else, only when
``settings.trust_forwarded_headers`` is on, the proxy's ``X-Forwarded-Proto`` and
``X-Forwarded-Host``; else the request's own scheme and ``Host``. Forwarded headers
are ignored by default: any client can send them, and a URL pointing elsewhere
would make viewers send their credentials to that host.
"""

from __future__ import annotations

import re

from fastapi import Request

from gateway.config import Settings

_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")


def service_url(request: Request, settings: Settings | None = None) -> str:
    """The DICOMweb base URL (scheme, host, root path and prefix) as clients see it."""
    settings = settings or request.app.state.settings
    prefix = settings.dicomweb_prefix.rstrip("/")
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + prefix
    scheme = request.url.scheme
    host = request.headers.get("host", "")
    if settings.trust_forwarded_headers:
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            scheme = proto
        forwarded = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
        if forwarded and _HOST_RE.match(forwarded):
            host = forwarded
    if not _HOST_RE.match(host):
        host = request.url.netloc
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return f"{scheme}://{host}{root}{prefix}"
