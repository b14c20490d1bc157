"""The portal API (``/api``).

The HTTP door to ``consent``: sign-in (local accounts; DICOMweb clients by OAuth 2
client credentials), share links (create, list, revoke; describe and exchange by
their holders), consents (with FHIR export), access requests, access history,
break-glass. Every answer carries ``Referrer-Policy: no-referrer`` and
``Cache-Control: no-store``.

A share link is ``<base>/viewer/share#sbl_...`` (``SHARE_PAGE``): the token sits in
the URL fragment, which browsers send neither to servers nor in ``Referer``. The
viewer's share-link page reads it and POSTs it (``/api/links/describe``, then
``/api/links/exchange`` with the access code if one is needed), keeps the
short-lived access token it gets back in ``sessionStorage`` and sends it as a Bearer
header. Only for an external viewer that can take it no other way (OHIF's
``?token=``, when ``viewer_url`` is set) does the exchange answer put the access
token, never the share token, in a URL.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any
from urllib.parse import parse_qs, urlencode

import segno
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from consent import breakglass, consents
from consent.accounts import CodeRequired, SignInFailed
from consent.audit import Attempt
from consent.history import access_history
from consent.links import (
    LinkPolicy,
    LinkRefused,
    LinkRules,
    create_link,
    describe,
    exchange,
    launch_token,
    link_studies,
    list_links,
    revoke_link,
    studies_of_link,
)
from consent.models import User
from consent.patients import Relation, link_patient
from consent.principals import (
    AlreadyExists,
    ConsentError,
    Kind,
    Operation,
    Principal,
)
from consent.throttle import CLIENT_CREDENTIALS
from consent.tokens import authenticate_client, issue_for_system, issue_for_user
from dicomweb.access import client_address, gate_of, optional_principal
from dicomweb.answers import (
    AccessRequest,
    BreakGlassGrant,
    Created,
    FhirConsent,
    History,
    LinkDescription,
    LinkExchanged,
    LinkLaunch,
    NewShareLink,
    Notice,
    PatientLinkMade,
    RequestDecided,
    ShareLink,
    Status,
    TokenAnswer,
)
from dicomweb.errors import HTTPError, error_body
from dicomweb.sessions import caller
from dicomweb.throttling import (
    LOCKED_MESSAGE,
    failed,
    retry_after,
    signed_in,
    throttled_sign_in,
)
from gateway.archive.fhir import imaging_study_bundle

PRIVATE = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
# Where a share link opens: the viewer's share-link page, the token in the fragment.
SHARE_PAGE = "/viewer/share"


def private_answer(response: Response) -> None:
    """Answers about people are never cached nor referred (a router dependency)."""
    response.headers.update(PRIVATE)


router = APIRouter(dependencies=[Depends(private_answer)])


def _settings(request: Request) -> Any:
    return request.app.state.settings


def _db(request: Request) -> Any:
    return request.app.state.archive.db


def _policy(request: Request) -> LinkPolicy:
    return LinkPolicy.from_settings(_settings(request))


def _token_lifetime(request: Request) -> dt.timedelta:
    return dt.timedelta(minutes=_settings(request).access_token_minutes)


def _token_answer(token: str, expires_at: dt.datetime) -> dict[str, Any]:
    seconds = max(0, int((expires_at - dt.datetime.now(dt.UTC)).total_seconds()))
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": seconds,
        "expires_at": expires_at.isoformat(),
    }


def _need(principal: Principal, *kinds: Kind) -> Principal:
    if principal.kind not in kinds:
        raise HTTPError(403, "this is not for your kind of account", "forbidden")
    return principal


def _audit(request: Request, principal: Principal, operation: str, outcome: str, **kw: Any) -> None:
    gate_of(request).auditor.record(
        Attempt(
            principal=principal,
            door="portal",
            operation=operation,
            outcome=outcome,
            client=client_address(request),
            **kw,
        )
    )


# -- signing in ------------------------------------------------------------------------
class SignIn(BaseModel):
    username: str
    password: str
    code: str | None = None


@router.post(
    "/session",
    summary="Sign in with a local account (password, TOTP code)",
    response_model=TokenAnswer,
)
def session(body: SignIn, request: Request) -> dict[str, Any]:
    db = _db(request)
    try:
        user_id = throttled_sign_in(request, body.username, body.password, body.code)
    except CodeRequired as exc:
        raise HTTPError(401, str(exc), "code-required") from exc
    except SignInFailed as exc:
        raise HTTPError(401, str(exc), "sign-in-failed") from exc
    issued = issue_for_user(db, user_id, _token_lifetime(request), client=client_address(request))
    return _token_answer(issued.token, issued.expires_at)


@router.post("/token", summary="OAuth 2 client credentials (DICOMweb clients of institutions)")
async def client_token(request: Request) -> JSONResponse:
    """RFC 6749 4.4: an application/x-www-form-urlencoded body with grant_type,
    client_id and client_secret (parsed here: the body is small and flat)."""
    form = {k: v[0] for k, v in parse_qs((await request.body())[:4096].decode()).items()}
    if form.get("grant_type") != "client_credentials":
        return JSONResponse({"error": "unsupported_grant_type"}, 400, headers=PRIVATE)
    db = _db(request)
    client_id = form.get("client_id", "")
    seconds = await run_in_threadpool(retry_after, request, CLIENT_CREDENTIALS, client_id)
    if seconds is not None:
        return JSONResponse(
            {"error": "too-many-attempts", "message": LOCKED_MESSAGE},
            429,
            headers={**PRIVATE, "Retry-After": str(seconds)},
        )
    system_id = await run_in_threadpool(
        authenticate_client, db, client_id, form.get("client_secret", "")
    )
    if system_id is None:
        await run_in_threadpool(failed, request, CLIENT_CREDENTIALS, client_id, "invalid_client")
        return JSONResponse({"error": "invalid_client"}, 401, headers=PRIVATE)
    await run_in_threadpool(signed_in, request, CLIENT_CREDENTIALS, system_id=system_id)
    issued = await run_in_threadpool(
        issue_for_system, db, system_id, _token_lifetime(request), client=client_address(request)
    )
    return JSONResponse(_token_answer(issued.token, issued.expires_at), headers=PRIVATE)


# -- share links: holders ----------------------------------------------------------------
class LinkToken(BaseModel):
    token: str = Field(max_length=200)
    access_code: str | None = Field(default=None, max_length=100)


_LINK_STATUS = {
    "unknown": 404,
    "expired": 410,
    "revoked": 410,
    "used": 410,
    "access-code": 401,
    "locked": 429,
    "recipient": 403,
}


@router.post(
    "/links/describe",
    summary="What a share link's landing page may show",
    response_model=LinkDescription,
)
def link_describe(body: LinkToken, request: Request) -> dict[str, Any]:
    info = describe(_db(request), body.token)
    if info is None:
        raise HTTPError(404, "this link is not valid", "unknown")
    return {
        "status": info.status,
        "needs_access_code": info.needs_access_code,
        "single_use": info.single_use,
        "can_download": info.can_download,
        "recipient_institution": info.recipient_institution,
        "expires_at": info.expires_at.isoformat(),
    }


@router.post(
    "/links/exchange",
    summary="Trade a share link for a short-lived access token",
    response_model=LinkExchanged,
    response_model_exclude_none=True,  # "viewer" only when one is configured
)
def link_exchange(
    body: LinkToken,
    request: Request,
    presenter: Principal | None = Depends(optional_principal),
) -> dict[str, Any] | JSONResponse:
    db = _db(request)
    holder = presenter or Principal(kind=Kind.LINK, id=0, name="link holder")
    try:
        issued = exchange(
            db,
            body.token,
            _policy(request),
            client=client_address(request),
            access_code=body.access_code,
            presenter=presenter,
        )
    except LinkRefused as exc:
        _audit(request, holder, "link-exchange", "denied", detail=exc.reason)
        refusal = error_body(exc.reason, str(exc))
        if exc.remaining is not None:  # wrong access code: tries left before the lockout
            refusal["remaining"] = exc.remaining
        return JSONResponse(refusal, _LINK_STATUS.get(exc.reason, 403), headers=PRIVATE)
    _audit(request, holder, "link-exchange", "allowed", detail=f"access token {issued.id}")
    settings = _settings(request)
    base = str(request.base_url).rstrip("/") + settings.dicomweb_prefix.rstrip("/")
    studies = link_studies(db, issued)
    answer = {**_token_answer(issued.token, issued.expires_at), "dicomweb": base}
    answer["study_uids"] = studies
    if settings.viewer_url:
        # Viewers such as OHIF take the access token (never the share token) as ?token=.
        query = urlencode({"StudyInstanceUIDs": ",".join(studies), "token": issued.token})
        answer["viewer"] = f"{settings.viewer_url}?{query}"
    return answer


# -- share links: patients -------------------------------------------------------------------
class NewLink(BaseModel):
    study_uids: list[str] = Field(min_length=1, max_length=100)
    days: float | None = None
    access_code: str | None = Field(default=None, max_length=100)
    can_download: bool = False
    single_use: bool = False
    recipient_institution: str | None = None
    label: str = Field(default="", max_length=200)


def _link_json(view: Any) -> dict[str, Any]:
    return {
        "id": view.id,
        "label": view.label,
        "study_uids": view.study_uids,
        "created_at": view.created_at.isoformat(),
        "expires_at": view.expires_at.isoformat(),
        "can_download": view.can_download,
        "single_use": view.single_use,
        "has_access_code": view.has_access_code,
        "recipient_institution": view.recipient_institution,
        "used_at": view.used_at.isoformat() if view.used_at else None,
        "revoked_at": view.revoked_at.isoformat() if view.revoked_at else None,
    }


@router.get("/me/links", summary="My share links", response_model=list[ShareLink])
def my_links(request: Request, me: Principal = Depends(caller)) -> list[dict]:
    return [_link_json(v) for v in list_links(_db(request), _need(me, Kind.PATIENT))]


@router.post(
    "/me/links",
    summary="Create a share link (its token is shown once)",
    response_model=NewShareLink,
)
def new_link(body: NewLink, request: Request, me: Principal = Depends(caller)) -> dict[str, Any]:
    rules = LinkRules(
        can_download=body.can_download,
        single_use=body.single_use,
        access_code=body.access_code,
        recipient_institution=body.recipient_institution,
        lifetime=dt.timedelta(days=body.days) if body.days is not None else None,
        label=body.label,
    )
    link_id, token = create_link(
        _db(request), _need(me, Kind.PATIENT), body.study_uids, rules, _policy(request)
    )
    base = str(request.base_url).rstrip("/")
    url = f"{base}{SHARE_PAGE}#{token}"
    # The QR code is made here, the one time the token is known; it is never stored.
    return {"id": link_id, "token": token, "url": url, "qr_svg": qr_svg(url)}


def qr_svg(text: str) -> str:
    """``text`` as a QR code (SVG, medium error correction, dark on white)."""
    out = io.BytesIO()
    # A standalone document (with its namespace): pages show it as an image.
    segno.make(text, error="m").save(
        out, kind="svg", scale=4, border=2, xmldecl=False, dark="#000", light="#fff"
    )
    return out.getvalue().decode()


@router.delete("/me/links/{link_id}", summary="Revoke one of my share links", response_model=Notice)
def drop_link(link_id: int, request: Request, me: Principal = Depends(caller)) -> dict[str, str]:
    return {"notice": revoke_link(_db(request), _need(me, Kind.PATIENT), link_id)}


# -- consents and requests -------------------------------------------------------------------
class NewConsent(BaseModel):
    institution: str
    decision: str = "permit"
    purpose: str = "TREAT"
    study_uids: list[str] | None = None
    end: dt.datetime | None = None


@router.get("/me/consents", summary="My consents", response_model=list[FhirConsent])
def my_consents(request: Request, me: Principal = Depends(caller)) -> list[dict]:
    db = _db(request)
    return [consents.to_fhir(db, c.id) for c in consents.list_consents(db, _need(me, Kind.PATIENT))]


@router.post(
    "/me/consents", summary="Give or refuse consent to an institution", response_model=FhirConsent
)
def new_consent(
    body: NewConsent, request: Request, me: Principal = Depends(caller)
) -> dict[str, Any]:
    db = _db(request)
    consent_id = consents.grant(
        db,
        _need(me, Kind.PATIENT),
        institution=body.institution,
        decision=body.decision,
        purpose=body.purpose,
        study_uids=body.study_uids,
        end=body.end,
    )
    return consents.to_fhir(db, consent_id)


@router.delete("/me/consents/{consent_id}", summary="Revoke a consent", response_model=FhirConsent)
def drop_consent(
    consent_id: int, request: Request, me: Principal = Depends(caller)
) -> dict[str, Any]:
    db = _db(request)
    consents.revoke(db, _need(me, Kind.PATIENT), consent_id)
    return consents.to_fhir(db, consent_id)


@router.get(
    "/me/requests",
    summary="Institutions' pending requests for my studies",
    response_model=list[AccessRequest],
)
def my_requests(request: Request, me: Principal = Depends(caller)) -> list[dict]:
    return [
        {
            "id": r.id,
            "institution": r.institution,
            "purpose": r.purpose,
            "reason": r.reason,
            "study_uids": r.study_uids,
            "created_at": r.created_at.isoformat(),
        }
        for r in consents.requests_for(_db(request), _need(me, Kind.PATIENT))
    ]


@router.post(
    "/me/requests/{request_id}/{decision}",
    summary="Approve or decline a request",
    response_model=RequestDecided,
)
def decide_request(
    request_id: int, decision: str, request: Request, me: Principal = Depends(caller)
) -> dict[str, Any]:
    if decision not in ("approve", "decline"):
        raise HTTPError(404, "approve or decline", "not-found")
    consent_id = consents.decide(
        _db(request), _need(me, Kind.PATIENT), request_id, approve=decision == "approve"
    )
    return {"request": request_id, "decision": decision, "consent": consent_id}


class NewRequest(BaseModel):
    issuer: str
    patient_id: str
    purpose: str = "TREAT"
    reason: str = ""
    study_uids: list[str] = Field(default_factory=list, max_length=100)


@router.post("/requests", summary="Ask a patient for access (institutions)", response_model=Created)
def new_request(
    body: NewRequest, request: Request, me: Principal = Depends(caller)
) -> dict[str, int]:
    request_id = consents.request_access(
        _db(request),
        _need(me, Kind.STAFF, Kind.SYSTEM),
        issuer=body.issuer,
        patient_id=body.patient_id,
        purpose=body.purpose,
        reason=body.reason,
        study_uids=body.study_uids,
    )
    return {"id": request_id}


# -- history and break-glass ---------------------------------------------------------------
@router.get(
    "/me/history", summary="Who accessed my studies, and break-glass grants", response_model=History
)
def my_history(request: Request, me: Principal = Depends(caller)) -> dict[str, Any]:
    history = access_history(_db(request), _need(me, Kind.PATIENT))
    return {
        "accesses": [
            {
                "at": a.at.isoformat(),
                "last_at": a.last_at.isoformat(),
                "count": a.count,
                "who": a.who,
                "kind": a.principal_kind,
                "institution": a.institution,
                "door": a.door,
                "operation": a.operation,
                "study_uid": a.study_uid,
                "outcome": a.outcome,
                "purpose": a.purpose,
                "break_glass": a.break_glass,
            }
            for a in history.accesses
        ],
        "break_glass": [_grant_json(g) for g in history.break_glass],
    }


def _grant_json(g: breakglass.Grant) -> dict[str, Any]:
    return {
        "id": g.id,
        "issuer": g.issuer,
        "patient_id": g.patient_id,
        "reason": g.reason,
        "started_at": g.started_at.isoformat(),
        "expires_at": g.expires_at.isoformat(),
        "ended_at": g.ended_at.isoformat() if g.ended_at else None,
        "reviewed_at": g.reviewed_at.isoformat() if g.reviewed_at else None,
        "review_note": g.review_note,
    }


class BreakGlassRequest(BaseModel):
    issuer: str
    patient_id: str
    reason: str
    minutes: float = 60


@router.post(
    "/break-glass",
    summary="Declare emergency access to one patient's studies",
    response_model=BreakGlassGrant,
)
def declare_break_glass(
    body: BreakGlassRequest, request: Request, me: Principal = Depends(caller)
) -> dict[str, Any]:
    settings = _settings(request)
    grant = breakglass.declare(
        _db(request),
        gate_of(request).auditor,
        me,
        issuer=body.issuer,
        patient_id=body.patient_id,
        reason=body.reason,
        duration=dt.timedelta(minutes=body.minutes),
        max_duration=dt.timedelta(minutes=settings.break_glass_max_minutes),
        client=client_address(request),
    )
    return _grant_json(grant)


@router.get(
    "/break-glass",
    summary="Break-glass grants for review (operators, auditors)",
    response_model=list[BreakGlassGrant],
)
def review_list(
    request: Request, unreviewed: bool = True, me: Principal = Depends(caller)
) -> list[dict]:
    _need(me, Kind.OPERATOR, Kind.AUDITOR)
    return [_grant_json(g) for g in breakglass.grants(_db(request), unreviewed=unreviewed)]


class Review(BaseModel):
    note: str = Field(min_length=1)


@router.post(
    "/break-glass/{grant_id}/review", summary="Record the review of a grant", response_model=Status
)
def review_grant(
    grant_id: int, body: Review, request: Request, me: Principal = Depends(caller)
) -> dict[str, str]:
    breakglass.review(_db(request), me, grant_id, body.note)
    return {"status": "reviewed"}


# -- share export: FHIR manifest, IID launch ---------------------------------------------
@router.get(
    "/manifest",
    summary="Studies as a FHIR Bundle (ImagingStudy + DICOMweb Endpoint, in the spirit of "
    "IHE MADO)",
)
def manifest(
    request: Request,
    study: list[str] = Query(default_factory=list),
    me: Principal = Depends(caller),
) -> Response:
    """The named studies (``study=``, repeatable), or, for a share link's holder, the
    link's studies. Each must be one the caller may view: any other answers 404, like a
    study that does not exist. The Endpoint is the DICOMweb base: a reader brings its
    own access token; none is in the Bundle."""
    db = _db(request)
    wanted = sorted(set(study)) or (studies_of_link(db, me.id) if me.kind is Kind.LINK else [])
    if not wanted or len(wanted) > 100:
        raise HTTPError(400, "name 1 to 100 studies (study=UID)", "bad-request")
    allowed = gate_of(request).check(
        me, Operation.VIEW, wanted, door="portal", client=client_address(request)
    )
    missing = [uid for uid in wanted if uid not in allowed]
    if missing:
        raise HTTPError(404, f"no such study: {missing[0]}", "not-found")
    settings = _settings(request)
    base = str(request.base_url).rstrip("/") + settings.dicomweb_prefix.rstrip("/")
    bundle = imaging_study_bundle(db, wanted, base)
    return JSONResponse(bundle, media_type="application/fhir+json", headers=PRIVATE)


@router.post(
    "/links/launch",
    summary="An IHE IID launch URL for an opened share link",
    response_model=LinkLaunch,
)
def link_launch(request: Request, me: Principal = Depends(caller)) -> dict[str, Any]:
    """For the holder of an exchanged link token: the configured IID viewer's URL with
    the link's studies and a second short-lived access token of the link (never the
    share token), for a viewer that can take a token no other way."""
    settings = _settings(request)
    if not settings.iid_viewer_url:
        raise HTTPError(404, "no IID viewer is configured here", "not-found")
    db = _db(request)
    issued = launch_token(db, me, _policy(request), client=client_address(request))
    _audit(request, me, "link-launch", "allowed", detail=f"access token {issued.id}")
    query = urlencode(
        {
            "requestType": "STUDY",
            "studyUID": ",".join(studies_of_link(db, me.id)),
            "diagnosticQuality": "true",
            "access_token": issued.token,  # RFC 6750 2.3: the viewer sends it as Bearer
        }
    )
    url = f"{settings.iid_viewer_url}?{query}"
    return {"url": url, "expires_at": issued.expires_at.isoformat()}


# -- patient links (institution attestation, operator verification) -----------------------
class NewPatientLink(BaseModel):
    username: str = Field(max_length=200)
    issuer: str = Field(max_length=64)
    patient_id: str = Field(max_length=64)
    evidence: str = Field(max_length=2000)
    relation: Relation = Relation.SELF
    ends_at: dt.datetime | None = None


@router.post(
    "/patient-links",
    summary="Link an account to a patient: themself, or a guardian / legal representative",
    response_model=PatientLinkMade,
)
def new_patient_link(
    body: NewPatientLink, request: Request, me: Principal = Depends(caller)
) -> dict[str, Any]:
    """Institution admins attest Patient IDs of their own issuer; operators verify any.
    A proxy (guardian, legal representative) then sees and shares the patient's
    studies, under their own name in the audit trail, until ``ends_at``."""
    db = _db(request)
    _need(me, Kind.STAFF, Kind.OPERATOR)
    with db.reading() as session:
        account = session.scalar(select(User.id).where(User.username == body.username))
    if account is None:
        raise HTTPError(404, "no such account", "unknown")
    ends_at = body.ends_at
    if ends_at is not None and ends_at.tzinfo is None:
        ends_at = ends_at.replace(tzinfo=dt.UTC)
    link_id = link_patient(
        db,
        gate_of(request).auditor,
        account_id=account,
        issuer=body.issuer,
        patient_id=body.patient_id,
        by=me,
        evidence=body.evidence,
        relation=body.relation.value,
        ends_at=ends_at,
        client=client_address(request),
    )
    return {"id": link_id, "relation": body.relation.value}


async def consent_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """A consent-side refusal: 404 for things that are not (or not yours), 409 for a
    name already registered, else 400."""
    message = str(exc)
    if isinstance(exc, AlreadyExists):
        status = 409
    else:
        status = 404 if message.startswith("no such") else 400
    return JSONResponse({"error": "refused", "message": message}, status, headers=PRIVATE)


__all__ = ["ConsentError", "consent_error_handler", "router"]
