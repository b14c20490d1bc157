"""The FastAPI application served by ``studybridge serve``.

Operational endpoints: ``/healthz`` (the process is up), ``/readyz`` (the index
and the blob store answer) and ``/metrics`` (Prometheus, every serving process; only
for the holder of ``metrics_token`` or, without one, for clients on this machine).
The DICOMweb services (QIDO-RS, WADO-RS, STOW-RS, WADO-URI) are routers mounted
under ``settings.dicomweb_prefix``; archive errors become HTTP statuses through the
one table in ``dicomweb.errors``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Receive, Scope, Send

from consent import redact
from consent.access import Gate
from consent.audit import Auditor
from consent.principals import ConsentError, Kind
from consent.tokens import resolve
from dicomweb import (
    admin,
    capabilities,
    custody,
    downloads,
    imports,
    media,
    oidc,
    portal,
    portal_studies,
    qido,
    sessions,
    stow,
    wado,
    zerocopy,
)
from dicomweb.access import require_principal
from dicomweb.errors import (
    HTTPError,
    archive_error_handler,
    http_error_handler,
    index_error_handler,
)
from dicomweb.middleware import (
    CatchAllErrors,
    HeadAsGet,
    JSONGZip,
    MaskNationalIDs,
    ResourcePolicy,
)
from dicomweb.request_ids import RequestIDs
from gateway import __version__
from gateway.archive import Archive
from gateway.archive.errors import ArchiveError
from gateway.config import Settings
from gateway.ops import metrics
from viewer import pages as viewer_pages


class _App(FastAPI):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Before any middleware wraps ``send``: it names the server's protocol.
            zerocopy.attach(scope, send)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, archive: Archive | None = None) -> FastAPI:
    archive = archive or Archive.open(settings, post_ingest=True)

    # Every route of the DICOMweb routers asks consent.access through this gate, and
    # every attempt lands in this process's audit chain.
    auditor = Auditor(archive.db, window_seconds=settings.audit_window_seconds)
    gate = Gate(archive.db, auditor)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        redact.install()  # tokens never reach a log handler
        auditor.start_flusher()
        yield
        auditor.close()
        archive.close()

    app = _App(title="studybridge", version=__version__, lifespan=lifespan)
    app.state.archive = archive
    app.state.settings = settings
    app.state.gate = gate
    app.add_exception_handler(ArchiveError, archive_error_handler)
    app.add_exception_handler(HTTPError, http_error_handler)
    app.add_exception_handler(SQLAlchemyError, index_error_handler)
    prefix = settings.dicomweb_prefix.rstrip("/")
    # Middleware added first runs innermost: errors become JSON responses inside CORS,
    # so 4xx/5xx answers carry CORS headers too; gzip only touches JSON.
    app.add_middleware(HeadAsGet)
    app.add_middleware(CatchAllErrors)
    app.add_middleware(ResourcePolicy, prefix=prefix)
    app.add_middleware(MaskNationalIDs)  # on the JSON body, before gzip
    app.add_middleware(JSONGZip, minimum_size=1024)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "Accept",
            "Content-Type",
            "If-None-Match",
            "Range",
            "If-Range",
        ],
        expose_headers=[
            "Warning",
            "ETag",
            "Content-Location",
            "X-Request-ID",
            "Content-Range",
            "Accept-Ranges",
        ],
    )
    app.add_middleware(RequestIDs)  # outermost: every answer and log line has its ID

    # Exactly one principal per request, or 401 (see dicomweb.access).
    signed_in = [Depends(require_principal)]
    app.include_router(qido.router, prefix=prefix, tags=["QIDO-RS"], dependencies=signed_in)
    app.include_router(wado.router, prefix=prefix, tags=["WADO-RS"], dependencies=signed_in)
    app.include_router(stow.router, prefix=prefix, tags=["STOW-RS"], dependencies=signed_in)
    # Uploads need the store permission and count as sent by the caller's institution.
    app.include_router(imports.router, tags=["Import"], dependencies=signed_in)
    # Downloads of a study as a zip need the download permission (dicomweb.media).
    app.include_router(media.router, tags=["Download"], dependencies=signed_in)

    # The viewer's pages: a separate door that reads this API over HTTP like any viewer,
    # with an access token (Bearer) like any viewer. The pages are static: no study data.
    app.mount("/viewer", viewer_pages.create_app(settings))

    # The portal API (dicomweb.portal); share-link pages are the viewer's.
    app.include_router(portal.router, prefix="/api", tags=["Portal"])
    app.include_router(oidc.router, prefix=oidc.COOKIE_PATH, tags=["Portal"])
    # The operators' API: institutions, DIMSE peers, user accounts (dicomweb.admin).
    app.include_router(admin.router, prefix="/api/admin", tags=["Administration"])
    # Transfers and forwarding jobs: operators and the institutions' staff (custody).
    app.include_router(custody.router, prefix="/api", tags=["Transfers and forwarding"])
    # The portal pages' browser sessions (cookie + CSRF) and study lists.
    app.include_router(sessions.router, prefix="/api", tags=["Portal"])
    app.include_router(portal_studies.router, prefix="/api", tags=["Portal"])
    app.include_router(downloads.router, prefix="/api", tags=["Downloads"])
    app.add_exception_handler(ConsentError, portal.consent_error_handler)

    services = {"QIDO-RS": qido, "WADO-RS": wado, "STOW-RS": stow}

    @app.get(prefix + "/", tags=["DICOMweb"], summary="Capability description")
    def capability_description(request: Request) -> JSONResponse:
        return JSONResponse(capabilities.describe(app, request, settings, services))

    if prefix:
        app.add_api_route(prefix, capability_description, methods=["GET"], include_in_schema=False)

    task_metrics = metrics.task_registry(settings)

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint(request: Request) -> Response:
        _check_scraper(request, settings)
        body, content_type = metrics.exposition(task_metrics)
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        problems = []
        try:
            with archive.db.read_conn() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            problems.append(f"index: {exc.__class__.__name__}")
        try:
            archive.store.check()
        except ArchiveError as exc:
            problems.append(f"blob store: {exc}")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app


_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def _check_scraper(request: Request, settings: Settings) -> None:
    """Who may read /metrics (operations data: peers, institutions, failure causes):

    - a request with ``Authorization: Bearer`` and the ``metrics_token`` (a scraper's
      credential), or an operator's access token (``consent``: operators run the
      installation);
    - without credentials, a client on this machine that came through no proxy, and
      only while no ``metrics_token`` is set.
    """
    token = settings.metrics_token.get_secret_value()
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer" and given:
        if token and hmac.compare_digest(given.encode(), token.encode()):
            return
        principal = resolve(request.app.state.archive.db, given)
        if principal is not None and principal.kind is Kind.OPERATOR:
            return
        if principal is not None:
            raise HTTPError(403, "metrics are for operators", reason="forbidden")
        raise HTTPError(
            401,
            "the token is neither the scrape token nor a valid operator's access token",
            reason="invalid-token",
            headers={"WWW-Authenticate": 'Bearer realm="metrics", error="invalid_token"'},
        )
    if token:
        raise HTTPError(
            401,
            "metrics need the scrape token or an operator's access token (Authorization: Bearer)",
            reason="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    host = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local or any(h in request.headers for h in _PROXY_HEADERS):
        raise HTTPError(
            403,
            "metrics are served to this machine only, to operators, or to a scraper "
            "with metrics_token",
            reason="forbidden",
        )
