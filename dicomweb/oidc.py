"""Portal routes of OpenID Connect sign-in: ``/api/oidc/login`` and ``/api/oidc/callback``.

``login`` sends the browser to the identity provider (``consent.oidc`` keeps the
sign-in's state, nonce and PKCE verifier) and sets a short-lived, HttpOnly cookie
binding the sign-in to this browser. ``callback`` finishes it and answers what a
local sign-in answers for the account the provider's subject maps to: to a browser
(``Accept: text/html``) the portal pages' session cookie (``dicomweb.sessions``) and a
redirect to ``/viewer/signin``, which goes on to the account's home page; to an API
client the access token of ``POST /api/session``. The browser session is marked as
opened here, so that signing out of it (``dicomweb.sessions.browser_sign_out``) also
offers the provider's sign-out (RP-initiated logout). The code and state arrive in the query
string: nothing here logs them, and ``gateway.ops.logs`` masks both in any log line
that carries the URL (an access log, if a site turns one on). Every callback is
audited (operation ``oidc-sign-in``): allowed with the account signed in, or denied
with the reason (never the code, state or claims).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from consent.oidc import OIDCConfig, OIDCRefused, Provider, map_account, provider_of
from consent.principals import Kind, Principal
from consent.tokens import issue_for_user
from dicomweb.access import client_address, record_attempt
from dicomweb.errors import HTTPError
from dicomweb.portal import PRIVATE, _token_answer, _token_lifetime, private_answer
from dicomweb.sessions import start_session
from dicomweb.throttling import signed_in

COOKIE = "sb_oidc"
SIGN_IN_OIDC = "oidc-sign-in"
# Who a refused callback claims to be is not known (the provider did not say).
UNKNOWN = Principal(kind=Kind.STAFF, id=0, name="unknown account")
COOKIE_PATH = "/api/oidc"

router = APIRouter(dependencies=[Depends(private_answer)])


def _provider(request: Request) -> Provider:
    """The app's provider, made at first use from the settings (404 when not set up)."""
    provider = provider_of(request.app.state)
    if provider is None:
        raise HTTPError(404, "sign-in with an identity provider is not set up", "not-found")
    return provider


def _redirect_uri(request: Request, config: OIDCConfig) -> str:
    if config.redirect_url:
        return config.redirect_url
    base = request.app.state.settings.public_base_url or str(request.base_url)
    return base.rstrip("/") + COOKIE_PATH + "/callback"


def _refused(exc: OIDCRefused) -> HTTPError:
    return HTTPError(exc.status, str(exc), f"oidc-{exc.reason}")


def _refusal(request: Request, reason: str) -> None:
    record_attempt(request, UNKNOWN, "portal", SIGN_IN_OIDC, "denied", detail=reason)


@router.get("/login", summary="Sign in with the identity provider (redirects there)")
async def login(request: Request) -> RedirectResponse:
    provider = _provider(request)
    try:
        started = await provider.start(
            request.app.state.archive.db, _redirect_uri(request, provider.config)
        )
    except OIDCRefused as exc:
        raise _refused(exc) from exc
    response = RedirectResponse(started.url, status_code=303, headers=PRIVATE)
    response.set_cookie(
        COOKIE,
        started.browser_secret,
        max_age=int(provider.config.login_ttl.total_seconds()),
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="lax",  # sent on the provider's top-level redirect back to us
    )
    return response


@router.get("/callback", summary="Where the identity provider sends the browser back")
async def callback(
    request: Request,
    code: str = "",
    state: str = "",
    iss: str | None = None,
    error: str = "",
) -> Response:
    provider = _provider(request)
    if error:
        # The provider's own error code (access_denied, login_required...), no more.
        _refusal(request, "oidc-" + error[:40])
        raise HTTPError(401, "the identity provider did not sign you in", "oidc-" + error[:40])
    if not code or not state:
        _refusal(request, "oidc-answer")
        raise HTTPError(400, "the identity provider's answer lacks code or state", "oidc-answer")
    db = request.app.state.archive.db
    try:
        claims = await provider.finish(
            db,
            state=state,
            code=code,
            browser_secret=request.cookies.get(COOKIE, ""),
            iss=iss,
        )
        user_id = await run_in_threadpool(map_account, db, provider.config, claims)
    except OIDCRefused as exc:
        await run_in_threadpool(_refusal, request, f"oidc-{exc.reason}")
        raise _refused(exc) from exc
    await run_in_threadpool(signed_in, request, SIGN_IN_OIDC, user_id=user_id)
    if "text/html" in request.headers.get("accept", ""):
        # A browser: the portal pages' session (HttpOnly cookie), then the sign-in page,
        # which finds the session and goes on to the account's home page.
        page = RedirectResponse("/viewer/signin", status_code=303, headers=PRIVATE)
        await run_in_threadpool(start_session, request, page, user_id, via_oidc=True)
        page.delete_cookie(COOKIE, path=COOKIE_PATH)
        return page
    issued = await run_in_threadpool(
        issue_for_user, db, user_id, _token_lifetime(request), client=client_address(request)
    )
    answer: dict[str, Any] = _token_answer(issued.token, issued.expires_at)
    response = JSONResponse(answer, headers=PRIVATE)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response
