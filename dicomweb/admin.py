"""The operators' API (``/api/admin``): institutions and their DICOMweb clients, DIMSE
peers, user accounts.

The HTTP twin of ``studybridge institutions|peers|users``: both call the same
functions (``consent.principals``, ``consent.accounts``, ``gateway.peers``). Only
operators may call it: 401 without a principal, 403 for every other kind (refusals
audited too). Cookie sessions need the page's CSRF token on changes
(``dicomweb.sessions.caller``). Every call is one audit record with the operator as
actor, door ``admin``. Password hashes and TOTP secrets are never answered; the one
exception is the enrollment answer of ``POST /users/{username}/totp`` (the otpauth://
URI the account holder scans once) and of ``POST /institutions/{name}/clients`` (the
client secret, shown once and stored only as a hash), neither of which is logged.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from consent import principals
from consent.accounts import enable_totp, set_password
from consent.principals import (
    ClientView,
    InstitutionView,
    Kind,
    Principal,
    Role,
    UserView,
    add_dicomweb_client,
    add_institution,
    add_user,
    disable_client,
    disable_username,
    list_clients,
    list_institutions,
    list_users,
)
from dicomweb.access import record_attempt
from dicomweb.errors import HTTPError
from dicomweb.portal import private_answer
from dicomweb.sessions import caller
from gateway.peers import Peer, PeerError, PeerRegistry

DOOR = "admin"


def _audit(request: Request, me: Principal, outcome: str, detail: str = "") -> None:
    # The route's name says what was asked ("create_user"); the column holds 32.
    endpoint = request.scope.get("endpoint")
    operation = getattr(endpoint, "__name__", "") or request.method
    record_attempt(request, me, DOOR, operation, outcome, detail=detail)


def operator(request: Request, me: Principal = Depends(caller)) -> Principal:
    """The calling operator; any other principal is refused (and audited)."""
    if me.kind is not Kind.OPERATOR:
        _audit(request, me, "denied")
        raise HTTPError(403, "the admin API is for operators", "forbidden")
    return me


router = APIRouter(dependencies=[Depends(private_answer)])


def _db(request: Request) -> Any:
    return request.app.state.archive.db


# -- institutions -------------------------------------------------------------------------
class InstitutionIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    issuer: str = Field(default="", max_length=64, description="Issuer of Patient ID")
    description: str = Field(default="", max_length=1000)


class Done(BaseModel):
    status: str


@router.get("/institutions", summary="List institutions")
def list_all_institutions(
    request: Request, me: Principal = Depends(operator)
) -> list[InstitutionView]:
    _audit(request, me, "allowed")
    return list_institutions(_db(request))


@router.post("/institutions", status_code=201, summary="Register an institution")
def create_institution(
    body: InstitutionIn, request: Request, me: Principal = Depends(operator)
) -> InstitutionView:
    _audit(request, me, "allowed", f"institution {body.name}")
    add_institution(_db(request), body.name, issuer=body.issuer, description=body.description)
    return next(i for i in list_institutions(_db(request)) if i.name == body.name.strip())


@router.post("/institutions/{name}/disable", summary="Disable an institution")
def disable_institution(name: str, request: Request, me: Principal = Depends(operator)) -> Done:
    _audit(request, me, "allowed", f"institution {name}")
    principals.disable_institution(_db(request), name)
    return Done(status="disabled")


# -- DICOMweb clients of an institution -------------------------------------------------
class ClientIn(BaseModel):
    client_id: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=1000)


class ClientCredentials(BaseModel):
    client_id: str
    institution: str
    client_secret: str = Field(
        description="Shown once, never again: only its hash is stored (POST /api/token)"
    )


@router.get("/institutions/{name}/clients", summary="List an institution's DICOMweb clients")
def list_institution_clients(
    name: str, request: Request, me: Principal = Depends(operator)
) -> list[ClientView]:
    _audit(request, me, "allowed", f"institution {name}")
    return list_clients(_db(request), name)


@router.post(
    "/institutions/{name}/clients",
    status_code=201,
    summary="Create DICOMweb client credentials (the secret is answered once)",
)
def create_client(
    name: str, body: ClientIn, request: Request, me: Principal = Depends(operator)
) -> ClientCredentials:
    _audit(request, me, "allowed", f"client {body.client_id} of {name}")
    _id, secret = add_dicomweb_client(_db(request), name, body.client_id, body.description)
    return ClientCredentials(
        client_id=body.client_id.strip(), institution=name.strip(), client_secret=secret
    )


@router.post(
    "/institutions/{name}/clients/{client_id}/disable",
    summary="Disable a DICOMweb client (its tokens are refused from the next request)",
)
def disable_institution_client(
    name: str, client_id: str, request: Request, me: Principal = Depends(operator)
) -> Done:
    _audit(request, me, "allowed", f"client {client_id} of {name}")
    disable_client(_db(request), name, client_id)
    return Done(status="disabled")


# -- DIMSE peers --------------------------------------------------------------------------
class PeerModel(BaseModel):
    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    institution: str = Field(default="", max_length=64)
    issuer: str = Field(default="", max_length=64)
    description: str = Field(default="", max_length=1000)
    tls: bool = Field(default=False, description="Our associations to it speak DICOM TLS")
    tls_ca_file: str = Field(default="", description="CA (PEM) on this host verifying it")
    tls_server_name: str = Field(default="", description="Name its certificate must carry")


def _registry(request: Request) -> PeerRegistry:
    return PeerRegistry(_db(request))


@router.get("/peers", summary="List DIMSE peers")
def list_peers(request: Request, me: Principal = Depends(operator)) -> list[Peer]:
    _audit(request, me, "allowed")
    return _registry(request).list()


@router.post("/peers", status_code=201, summary="Register a DIMSE peer (AE title bound to host)")
def register_peer(body: PeerModel, request: Request, me: Principal = Depends(operator)) -> Peer:
    _audit(request, me, "allowed", f"peer {body.ae_title} at {body.host}:{body.port}")
    try:
        peer = _registry(request).add(**body.model_dump())
    except PeerError as exc:
        status = 409 if "already registered" in str(exc) else 400
        raise HTTPError(status, str(exc), "refused") from exc
    return peer


@router.delete("/peers/{ae_title}", summary="Remove a DIMSE peer")
def remove_peer(ae_title: str, request: Request, me: Principal = Depends(operator)) -> Done:
    _audit(request, me, "allowed", f"peer {ae_title}")
    if not _registry(request).remove(ae_title):
        raise HTTPError(404, f"no peer {ae_title}", "not-found")
    return Done(status="removed")


# -- user accounts ------------------------------------------------------------------------
class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=128)
    kind: Kind
    institution: str | None = Field(default=None, description="Staff only")
    role: Role | None = Field(default=None, description="Staff only")
    display_name: str = Field(default="", max_length=200)
    password: str | None = Field(
        default=None, max_length=1024, description="Initial password (never answered back)"
    )


class Enrollment(BaseModel):
    username: str
    otpauth_uri: str = Field(description="Shown once: the account holder scans it")


@router.get("/users", summary="List user accounts (no secrets)")
def list_accounts(request: Request, me: Principal = Depends(operator)) -> list[UserView]:
    _audit(request, me, "allowed")
    return list_users(_db(request))


@router.post("/users", status_code=201, summary="Create a user account")
def create_user(body: UserIn, request: Request, me: Principal = Depends(operator)) -> UserView:
    _audit(request, me, "allowed", f"user {body.username} ({body.kind.value})")
    db = _db(request)
    add_user(
        db,
        body.username,
        body.kind,
        display_name=body.display_name,
        institution=body.institution,
        role=body.role,
    )
    if body.password is not None:
        set_password(db, body.username.strip(), body.password)
    made = next(u for u in list_users(db) if u.username == body.username.strip())
    return made


@router.post("/users/{username}/disable", summary="Disable a user account")
def disable_user(username: str, request: Request, me: Principal = Depends(operator)) -> Done:
    _audit(request, me, "allowed", f"user {username}")
    disable_username(_db(request), username)
    return Done(status="disabled")


@router.post(
    "/users/{username}/totp",
    summary="Reset an account's TOTP second factor (answers the new enrollment URI once)",
)
def reset_totp(username: str, request: Request, me: Principal = Depends(operator)) -> Enrollment:
    _audit(request, me, "allowed", f"user {username}")
    uri = enable_totp(_db(request), username)
    return Enrollment(username=username, otpauth_uri=uri)
