"""Browser sessions of the portal pages: an HttpOnly cookie, a CSRF token, and the
viewer's access token.

The portal pages (``/viewer/portal``, ``/viewer/inbox``) sign in here rather than
with ``POST /api/session``, whose answer hands the access token to the caller: in a
browser that would put it within reach of any script on the page. Here the session's
access token goes into a cookie the page's scripts cannot read:

- ``sb_session``: ``HttpOnly``, ``SameSite=Strict``, ``Path=/api``, ``Secure`` when
  the page was served over HTTPS; it lives as long as the access token it holds
  (``access_token_minutes``) and signing out revokes that token;
- a CSRF token for every state-changing request (header ``X-CSRF-Token``), derived
  from the session token by a one-way hash, so it needs no storage, dies with the
  session, and cannot be computed without the cookie (SameSite=Strict already keeps
  the cookie off cross-site requests; the header is the second lock, and CORS does
  not allow it from other origins);
- the viewer never sees the cookie: it asks ``POST /api/session/viewer-token`` for a
  short-lived access token of the same account and sends it as a Bearer header, the
  way any DICOMweb viewer does.

``caller`` is the portal routes' principal dependency: a Bearer header (API clients)
wins, then the cookie; DICOMweb routes never read the cookie.

Signing out of a session an OpenID Connect sign-in opened also answers the provider's
sign-out URL when it has one (``end_session_url``, RP-Initiated Logout 1.0), which the
page follows so the provider forgets the browser too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from consent.accounts import CodeRequired, SignInFailed
from consent.models import AccessToken, User
from consent.oidc import provider_of
from consent.principals import Principal
from consent.tokens import issue_for_user, resolve, revoke_token
from dicomweb.access import client_address, require_principal
from dicomweb.answers import BrowserSession, BrowserSignedIn, SignedOut, ViewerToken
from dicomweb.errors import HTTPError
from dicomweb.throttling import throttled_sign_in
from gateway.archive.models import utcnow

COOKIE = "sb_session"
COOKIE_PATH = "/api"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# The viewer's token: short, and renewed by the page when it opens another study.
VIEWER_TOKEN_MINUTES = 15.0
_PRIVATE = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: a one-way function of its (secret) access token."""
    return hashlib.sha256(b"studybridge-csrf\x00" + session_token.encode()).hexdigest()


def _session_ended() -> HTTPError:
    return HTTPError(401, "your session has ended: sign in again", "session-ended")


def _failed() -> HTTPError:
    return HTTPError(401, "the username, password or code is not right", "sign-in-failed")


def caller(request: Request) -> Principal:
    """The principal of a portal request: Bearer header, else the session cookie (with
    its CSRF token on state-changing methods), else what ``require_principal`` says."""
    cookie = request.cookies.get(COOKIE)
    if request.headers.get("authorization") is not None or not cookie:
        return require_principal(request)
    principal = resolve(request.app.state.archive.db, cookie)
    if principal is None:
        raise _session_ended()
    if request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_token(cookie).encode()):
            raise HTTPError(
                403, "this request lacks the page's CSRF token: reload the page", "csrf"
            )
    request.state.principal = principal
    return principal


def _private(response: Response) -> None:
    response.headers.update(_PRIVATE)


router = APIRouter(dependencies=[Depends(_private)])


class SignIn(BaseModel):
    username: str = Field(max_length=128)
    password: str = Field(max_length=1024)
    code: str | None = Field(default=None, max_length=16)


def _account(request: Request, principal: Principal) -> dict[str, Any]:
    with request.app.state.archive.db.reading() as session:
        display = session.scalar(select(User.display_name).where(User.id == principal.id))
    return {
        "username": principal.name,
        "display_name": display or principal.name,
        "kind": principal.kind.value,
        "institution": principal.institution,
        "role": principal.role,
    }


def _secure(request: Request) -> bool:
    settings = request.app.state.settings
    return request.url.scheme == "https" or settings.public_base_url.startswith("https:")


@router.post(
    "/session/browser",
    summary="Sign in a portal page (session cookie)",
    response_model=BrowserSignedIn,
)
def browser_sign_in(body: SignIn, request: Request, response: Response) -> dict[str, Any]:
    """Password, then (for staff, operators, auditors, and patients who set one up)
    the TOTP code: without a code such an account gets 401 ``code-required``."""
    try:
        user_id = throttled_sign_in(request, body.username, body.password, body.code)
    except CodeRequired as exc:
        raise HTTPError(401, str(exc), "code-required") from exc
    except SignInFailed as exc:
        raise _failed() from exc
    return start_session(request, response, user_id)


def start_session(
    request: Request, response: Response, user_id: int, *, via_oidc: bool = False
) -> dict[str, Any]:
    """Open a browser session for an account that has just proved who it is (the local
    sign-in above; an OpenID Connect callback calls this too, with ``via_oidc``): the
    cookie is set on ``response``; the answer holds the account and the CSRF token for
    the page."""
    db = request.app.state.archive.db
    lifetime = dt.timedelta(minutes=request.app.state.settings.access_token_minutes)
    issued = issue_for_user(
        db, user_id, lifetime, client=client_address(request), via_oidc=via_oidc
    )
    principal = resolve(db, issued.token)
    if principal is None:  # disabled between the two reads
        raise _failed()
    response.set_cookie(
        COOKIE,
        issued.token,
        max_age=int(lifetime.total_seconds()),
        path=COOKIE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return {
        "account": _account(request, principal),
        "csrf": csrf_token(issued.token),
        "expires_at": issued.expires_at.isoformat(),
    }


@router.get(
    "/session/browser", summary="Who this page is signed in as", response_model=BrowserSession
)
def browser_session(request: Request) -> dict[str, Any]:
    cookie = request.cookies.get(COOKIE)
    principal = resolve(request.app.state.archive.db, cookie) if cookie else None
    if principal is None or cookie is None:
        raise _session_ended()
    return {"account": _account(request, principal), "csrf": csrf_token(cookie)}


@router.delete(
    "/session/browser",
    summary="Sign out (the session's token is revoked)",
    response_model=SignedOut,
    response_model_exclude_none=True,
)
async def browser_sign_out(
    request: Request, response: Response, me: Principal = Depends(caller)
) -> dict[str, str]:
    """Sign out here. A session an OpenID Connect sign-in opened is answered with
    ``end_session_url`` too when the provider announces an ``end_session_endpoint``:
    the page sends the browser there so the provider's session ends as well (otherwise
    the next sign-in would come straight back without asking who it is)."""
    via_oidc = False
    if request.cookies.get(COOKIE) and me.token_id is not None:
        via_oidc = await run_in_threadpool(revoke_token, request.app.state.archive.db, me.token_id)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=_secure(request), httponly=True)
    answer = {"status": "signed out"}
    provider = provider_of(request.app.state) if via_oidc else None
    if provider is not None:
        url = await provider.end_session_url()
        if url is not None:
            answer["end_session_url"] = url
    return answer


@router.post(
    "/session/viewer-token",
    summary="A short-lived access token for the viewer",
    response_model=ViewerToken,
)
def viewer_token(request: Request, me: Principal = Depends(caller)) -> dict[str, Any]:
    """The signed-in account's own access (the one access decision applies to it as to
    any DICOMweb client), for ``Authorization: Bearer`` from the viewer page."""
    if me.token_id is None or me.kind.value not in ("patient", "staff", "operator"):
        raise HTTPError(403, "this account does not open studies", "forbidden")
    db = request.app.state.archive.db
    lifetime = dt.timedelta(minutes=VIEWER_TOKEN_MINUTES)
    with db.reading() as session:
        ends = session.scalar(select(AccessToken.expires_at).where(AccessToken.id == me.token_id))
    if ends is not None:  # never outlive the session it came from
        lifetime = min(lifetime, ends - utcnow())
    issued = issue_for_user(db, me.id, lifetime, client=client_address(request))
    return {
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_at": issued.expires_at.isoformat(),
    }
