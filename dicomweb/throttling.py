"""Sign-in throttling for the HTTP doors (``consent.throttle``, the mechanism share-link
access codes use): a local account's password (``POST /api/session`` and
``/api/session/browser``) and a DICOMweb client's secret (``POST /api/token``).

After ``sign_in_max_failures`` failures for one account or client id, or
``sign_in_max_failures_per_client`` from one address, within
``sign_in_lockout_minutes``, the next attempts are answered 429 with ``Retry-After``
without checking the secret (a right password is refused too) until the window has
let enough failures go. Every sign-in is audited (operation ``sign-in`` or
``client-creds``): successes as allowed, with the account or client signed in
(``signed_in``, which the OpenID Connect callback calls too), failures and lockouts as
denied; the typed name of an unknown account is never recorded (it may be a mistyped
password).
"""

from __future__ import annotations

import datetime as dt

from fastapi import Request
from sqlalchemy import select

from consent.accounts import SignInFailed, sign_in
from consent.models import InstitutionSystem
from consent.principals import (
    Kind,
    Principal,
    principal_by_username,
    system_principal,
    user_principal,
)
from consent.throttle import SIGN_IN, Throttle
from dicomweb.access import client_address, record_attempt
from dicomweb.errors import HTTPError

LOCKED_MESSAGE = "too many failed sign-ins; try again later"


def _throttle(request: Request, kind: str) -> Throttle:
    settings = request.app.state.settings
    return Throttle(
        kind,
        settings.sign_in_max_failures,
        settings.sign_in_max_failures_per_client,
        dt.timedelta(minutes=settings.sign_in_lockout_minutes),
    )


def _claimant(request: Request, kind: str, subject: str) -> Principal:
    """Who the attempt claims to be: the account or client when it exists."""
    db = request.app.state.archive.db
    if kind == SIGN_IN:
        known = principal_by_username(db, subject)
        return known or Principal(kind=Kind.STAFF, id=0, name="unknown account")
    with db.reading() as session:
        system_id = session.scalar(
            select(InstitutionSystem.id).where(
                InstitutionSystem.kind == "dicomweb", InstitutionSystem.client_id == subject
            )
        )
    known = system_principal(db, system_id) if system_id is not None else None
    return known or Principal(kind=Kind.SYSTEM, id=0, name="unknown client")


def _audit(request: Request, kind: str, subject: str, detail: str) -> None:
    record_attempt(
        request, _claimant(request, kind, subject), "portal", kind, "denied", detail=detail
    )


def signed_in(
    request: Request, operation: str, *, user_id: int | None = None, system_id: int | None = None
) -> None:
    """Audit a successful sign-in: a local or identity provider's account, or a client."""
    db = request.app.state.archive.db
    if user_id is not None:
        principal = user_principal(db, user_id)
    else:
        principal = system_principal(db, system_id) if system_id is not None else None
    if principal is not None:
        record_attempt(request, principal, "portal", operation, "allowed")


def retry_after(request: Request, kind: str, subject: str) -> int | None:
    """Seconds until ``subject`` (or this client address) may try again, audited; None
    while attempts are open."""
    db = request.app.state.archive.db
    locked = _throttle(request, kind).retry_after(db, subject, client_address(request))
    if locked is None:
        return None
    what, seconds = locked
    scope = "account" if what == "subject" else "address"
    _audit(request, kind, subject, f"locked out ({scope}), retry in {seconds}s")
    return seconds


def failed(request: Request, kind: str, subject: str, reason: str) -> None:
    db = request.app.state.archive.db
    _throttle(request, kind).failed(db, subject, client_address(request))
    _audit(request, kind, subject, reason)


def throttled_sign_in(request: Request, username: str, password: str, code: str | None) -> int:
    """``consent.accounts.sign_in`` behind the throttle: HTTPError 429 while locked out;
    a failure (``SignInFailed``, re-raised) is counted and audited."""
    subject = username.strip()
    seconds = retry_after(request, SIGN_IN, subject)
    if seconds is not None:
        raise HTTPError(429, LOCKED_MESSAGE, "too-many-attempts", {"Retry-After": str(seconds)})
    db = request.app.state.archive.db
    try:
        user_id = sign_in(db, username, password, code)
    except SignInFailed:
        failed(request, SIGN_IN, subject, "sign-in-failed")
        raise
    signed_in(request, SIGN_IN, user_id=user_id)
    return user_id
