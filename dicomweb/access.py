"""Who is calling the DICOMweb API, and may they: one principal per request.

``require_principal`` (a dependency of every DICOMweb router) resolves the request's
``Authorization: Bearer <access token>`` to exactly one principal, or answers 401.
Tokens are accepted only in that header, never in the query string, so they stay
out of URLs and access logs. Without a header, the ``demo`` profile maps the
request to the demo principal (logged loudly, like ``accept_unknown_peers``); every
other profile refuses it.

Routes then ask ``consent.access`` through the app's ``Gate``: QIDO through
``search_scope`` (a SQL condition the query engine applies inside the query), WADO
routes through ``authorize`` right after their own lookup, so a study the principal
may not see gives exactly the answer of one that does not exist (same status, same
message, and only after the same request validation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from fastapi import Request

from consent.access import Gate, SearchScope, permitted_studies
from consent.audit import Attempt
from consent.principals import DEMO, Operation, Principal
from consent.redact import redact
from consent.tokens import refusal, resolve
from dicomweb.errors import HTTPError
from gateway.archive.errors import NotFound
from gateway.archive.query import Level

log = logging.getLogger(__name__)

DOOR = "dicomweb"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="studybridge"'}
_demo_warned = 0.0
_REFUSALS = {
    "invalid": "the access token is not valid (unknown, expired or revoked)",
    "expired": "the access token has expired (or the share link it came from)",
    "revoked": "the access was revoked (the token, or the share link it came from)",
}


def require_principal(request: Request) -> Principal:
    """The one principal of this request (a FastAPI dependency), or 401."""
    settings = request.app.state.settings
    header = request.headers.get("authorization")
    if header is None:
        if settings.profile == "demo":
            _warn_demo(request)
            request.state.principal = DEMO
            return DEMO
        raise HTTPError(
            401,
            "sign in: send an access token as Authorization: Bearer",
            "unauthorized",
            headers=_CHALLENGE,
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPError(
            401, "only Bearer access tokens are accepted", "unauthorized", headers=_CHALLENGE
        )
    return principal_for_token(request, token)


def principal_for_token(request: Request, token: str) -> Principal:
    """The principal of an access token (from the header, or the one route that takes
    it in a form body), recorded on the request; 401 if unknown, expired or revoked."""
    db = request.app.state.archive.db
    principal = resolve(db, token.strip())
    if principal is None:
        # The holder may know what became of their token (the viewer says "revoked").
        why = refusal(db, token.strip())
        raise HTTPError(
            401,
            _REFUSALS[why],
            "invalid-token" if why == "invalid" else f"token-{why}",
            headers={"WWW-Authenticate": 'Bearer realm="studybridge", error="invalid_token"'},
        )
    request.state.principal = principal
    return principal


def optional_principal(request: Request) -> Principal | None:
    """The principal if the request carries credentials (401 if they are bad), else None:
    for routes anyone may call, such as exchanging a share link."""
    if request.headers.get("authorization") is None:
        return None
    return require_principal(request)


def _warn_demo(request: Request) -> None:
    # Loud, but at most once a minute per process: every request is anonymous here.
    global _demo_warned
    now = time.monotonic()
    if now - _demo_warned > 60:
        _demo_warned = now
        log.warning(
            "DEMO PROFILE: anonymous HTTP request from %s served as the demo principal, "
            "which sees every study; never run the demo profile with real data",
            client_address(request),
        )


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def principal_of(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


def record_attempt(
    request: Request, principal: Principal, door: str, operation: str, outcome: str, **kw: Any
) -> None:
    """One audit record of a request through an HTTP door, with its client address."""
    gate_of(request).auditor.record(
        Attempt(
            principal=principal,
            door=door,
            operation=operation,
            outcome=outcome,
            client=client_address(request),
            **kw,
        )
    )


def gate_of(request: Request) -> Gate:
    gate: Gate = request.app.state.gate
    return gate


def search_scope(request: Request) -> SearchScope:
    """The study scope of a QIDO-RS search (the search is audited)."""
    return gate_of(request).search_scope(
        principal_of(request),
        door=DOOR,
        client=client_address(request),
        detail=redact(f"{request.url.path}?{request.url.query}"),
    )


def authorize(
    request: Request, operation: Operation, study_uids: Iterable[str], hidden: NotFound
) -> None:
    """Raise ``hidden`` (the lookup's own not-found answer) unless every study is
    permitted; every study's outcome is audited."""
    wanted = set(study_uids)
    principal = principal_of(request)
    gate = gate_of(request)
    allowed = gate.check(principal, operation, wanted, door=DOOR, client=client_address(request))
    if not wanted - allowed:
        return
    if operation is Operation.DOWNLOAD and wanted <= permitted_studies(
        gate.db, principal, Operation.VIEW, wanted
    ):
        # The principal sees these studies anyway: say plainly what is missing.
        raise HTTPError(
            403, "this access allows viewing, not downloading whole instances", "forbidden"
        )
    raise hidden


def not_found(level: Level, uid: str) -> NotFound:
    """What the archive answers for a study, series or instance it does not hold."""
    what = {Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "instance"}[level]
    return NotFound(f"no such {what}: {uid}")
