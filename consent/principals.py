"""Who is asking: principal kinds, staff roles, operations, and the registry of them.

Every request through every door resolves to exactly one ``Principal`` (or is
refused). A principal is a value: the doors pass it to ``consent.access`` and
``consent.audit`` and never look inside.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from consent.crypto import hash_secret, new_client_secret
from consent.models import Institution, InstitutionSystem, User
from gateway.archive.db import Database
from gateway.archive.errors import IndexUnavailable
from gateway.archive.models import utcnow


class Kind(StrEnum):
    PATIENT = "patient"
    STAFF = "staff"  # a person working for an institution
    SYSTEM = "system"  # an institution's machine: DIMSE peer (AE title) or DICOMweb client
    LINK = "link"  # whoever holds a share link's access token
    OPERATOR = "operator"  # runs the installation; administers, does not read images
    AUDITOR = "auditor"  # reads the audit trail
    DEMO = "demo"  # anonymous requests in the demo profile only


USER_KINDS = {Kind.PATIENT, Kind.STAFF, Kind.OPERATOR, Kind.AUDITOR}
# Usernames of staff accounts made from an identity provider's claims (consent.oidc).
CLAIMED_PREFIX = "oidc:"


class Role(StrEnum):
    RADIOLOGIST = "radiologist"
    CLERK = "clerk"
    INSTITUTION_ADMIN = "institution_admin"


class Operation(StrEnum):
    SEARCH = "search"  # QIDO-RS, C-FIND
    VIEW = "view"  # metadata, frames, rendered, thumbnails, bulk data
    DOWNLOAD = "download"  # whole instances: WADO-RS/URI as DICOM, C-MOVE, C-GET
    STORE = "store"  # STOW-RS, C-STORE


class ConsentError(ValueError):
    """A consent-side request cannot be done as asked (message safe to show)."""


class AlreadyExists(ConsentError):
    """The institution, account or client asked for is already registered (HTTP 409)."""


@dataclass(frozen=True)
class Principal:
    kind: Kind
    id: int  # users.id, institution_systems.id or share_links.id; 0 for demo
    name: str  # username, AE title / client id, or "link-<id>"
    institution_id: int | None = None
    institution: str = ""  # the institution's name (what instances record)
    role: str = ""
    # Share-link holders: whether the link permits downloading whole instances.
    can_download: bool = True
    # The access token this principal presented, if any (for auditing).
    token_id: int | None = None

    @property
    def audit_id(self) -> str:
        """How audit records name the principal (DIMSE peers by AE title)."""
        return str(self.id) if self.id else self.name


DEMO = Principal(kind=Kind.DEMO, id=0, name="demo (anonymous)")


# -- registry ---------------------------------------------------------------------------
def add_institution(db: Database, name: str, *, issuer: str = "", description: str = "") -> int:
    name = name.strip()
    if not name or len(name) > 64:
        raise ConsentError("an institution name is 1 to 64 characters")
    try:
        with db.writing() as session:
            row = Institution(name=name, issuer=issuer.strip(), description=description)
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError as exc:
        raise AlreadyExists(f"institution {name!r} already exists") from exc


def institution_id(db: Database, name: str) -> int:
    with db.reading() as session:
        found = session.scalar(select(Institution.id).where(Institution.name == name.strip()))
    if found is None:
        raise ConsentError(f"no institution named {name!r}")
    return found


def add_user(
    db: Database,
    username: str,
    kind: Kind,
    *,
    display_name: str = "",
    institution: str | None = None,
    role: Role | None = None,
    password_hash: str = "",
) -> int:
    username = username.strip()
    if not username or len(username) > 128 or not username.isprintable():
        raise ConsentError("a username is 1 to 128 printable characters")
    if username.startswith(CLAIMED_PREFIX):
        raise ConsentError(f"usernames starting with {CLAIMED_PREFIX} are made by OIDC sign-in")
    if kind not in USER_KINDS:
        raise ConsentError(f"{kind} is not a kind of user account")
    inst_id = None
    if kind is Kind.STAFF:
        if institution is None or role is None:
            raise ConsentError("a staff account needs an institution and a role")
        inst_id = institution_id(db, institution)
    elif institution is not None or role is not None:
        raise ConsentError("only staff accounts have an institution and a role")
    try:
        with db.writing() as session:
            row = User(
                username=username,
                kind=kind.value,
                display_name=display_name,
                institution_fk=inst_id,
                role=role.value if role else "",
                password_hash=password_hash,
            )
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError as exc:
        raise AlreadyExists(f"user {username!r} already exists") from exc


def add_dicomweb_client(
    db: Database, institution: str, client_id: str, description: str = ""
) -> tuple[int, str]:
    """A DICOMweb client of an institution; returns (id, secret). The secret is shown
    once and stored only as a hash."""
    inst_id = institution_id(db, institution)
    client_id = client_id.strip()
    if not client_id or len(client_id) > 64 or not client_id.isprintable():
        raise ConsentError("a client id is 1 to 64 printable characters")
    secret = new_client_secret()
    try:
        with db.writing() as session:
            row = InstitutionSystem(
                institution_fk=inst_id,
                kind="dicomweb",
                client_id=client_id,
                secret_hash=hash_secret(secret),
                description=description,
            )
            session.add(row)
            session.flush()
            return row.id, secret
    except IntegrityError as exc:
        raise AlreadyExists(f"client {client_id!r} already exists") from exc


def user_principal(db: Database, user_id: int, *, token_id: int | None = None) -> Principal | None:
    """The principal of an enabled user account (None if unknown or disabled)."""
    with db.reading() as session:
        return user_principal_in(session, user_id, token_id=token_id)


def user_principal_in(
    session: Session | Connection, user_id: int, *, token_id: int | None = None
) -> Principal | None:
    """``user_principal`` inside the caller's session or connection (resolving a token
    reads the token and its principal in one statement: each extra round trip to
    PostgreSQL counted on every request)."""
    columns, source = user_source()
    found = session.execute(select(*columns).select_from(source).where(_USERS.c.id == user_id))
    return user_principal_from(found.first(), token_id=token_id)


# Institutions as joined to a user and to a system (aliases: a token's statement
# joins both).
_USER_INSTITUTION = Institution.__table__.alias("user_institution")
_SYSTEM_INSTITUTION = Institution.__table__.alias("system_institution")
_USERS = User.__table__
_SYSTEMS = InstitutionSystem.__table__


def user_source(base: Any = None, on: Any = None) -> tuple[list[Any], Any]:
    """The columns ``user_principal_from`` takes, and the FROM clause that gives them:
    users with their institution, outer-joined to ``base`` on ``on`` when given."""
    users, inst = _USERS, _USER_INSTITUTION
    source = users if base is None else base.outerjoin(users, on)
    source = source.outerjoin(inst, inst.c.id == users.c.institution_fk)
    columns = [
        users.c.id,
        users.c.username,
        users.c.kind,
        users.c.role,
        users.c.disabled_at,
        inst.c.id,
        inst.c.name,
        inst.c.disabled_at,
    ]
    return columns, source


def user_principal_from(values: Any, *, token_id: int | None = None) -> Principal | None:
    """A user's principal from ``user_source``'s values (None: no such user, or it or
    its institution is disabled)."""
    if values is None:
        return None
    user_id, username, kind, role, disabled_at, inst_id, inst_name, inst_disabled = values
    if user_id is None or disabled_at is not None or inst_disabled is not None:
        return None
    return Principal(
        kind=Kind(kind),
        id=user_id,
        name=username,
        institution_id=inst_id,
        institution=inst_name or "",
        role=role,
        token_id=token_id,
    )


def system_source(base: Any = None, on: Any = None) -> tuple[list[Any], Any]:
    """As ``user_source``, for ``system_principal_from``: systems with their
    institution."""
    systems, inst = _SYSTEMS, _SYSTEM_INSTITUTION
    source = systems if base is None else base.outerjoin(systems, on)
    source = source.outerjoin(inst, inst.c.id == systems.c.institution_fk)
    columns = [
        systems.c.id,
        systems.c.client_id,
        systems.c.disabled_at,
        inst.c.id,
        inst.c.name,
        inst.c.disabled_at,
    ]
    return columns, source


def system_principal_from(values: Any, *, token_id: int | None = None) -> Principal | None:
    """A system's principal from ``system_source``'s values (None: no such system, or it
    or its institution is disabled)."""
    if values is None:
        return None
    system_id, client_id, disabled_at, inst_id, inst_name, inst_disabled = values
    if system_id is None or inst_id is None:
        return None
    if disabled_at is not None or inst_disabled is not None:
        return None
    return Principal(
        kind=Kind.SYSTEM,
        id=system_id,
        name=client_id,
        institution_id=inst_id,
        institution=inst_name,
        token_id=token_id,
    )


def principal_by_username(db: Database, username: str) -> Principal | None:
    """The principal of an enabled user account named ``username`` (None otherwise)."""
    with db.reading() as session:
        user_id = session.scalar(select(User.id).where(User.username == username.strip()))
    return user_principal(db, user_id) if user_id is not None else None


def system_principal(
    db: Database, system_id: int, *, token_id: int | None = None
) -> Principal | None:
    with db.reading() as session:
        return system_principal_in(session, system_id, token_id=token_id)


def system_principal_in(
    session: Session | Connection, system_id: int, *, token_id: int | None = None
) -> Principal | None:
    """``system_principal`` inside the caller's session or connection, in one statement."""
    columns, source = system_source()
    found = session.execute(select(*columns).select_from(source).where(_SYSTEMS.c.id == system_id))
    return system_principal_from(found.first(), token_id=token_id)


def institution_disabled(db: Database, name: str) -> bool:
    """Whether ``name`` is a registered institution that an operator disabled (its
    systems are then refused at the door, not just shown nothing)."""
    if not name.strip():
        return False
    try:
        with db.reading() as session:
            disabled_at = session.scalar(
                select(Institution.disabled_at).where(Institution.name == name.strip())
            )
    except (OperationalError, InterfaceError) as exc:
        raise IndexUnavailable(f"institutions unavailable: {exc.__class__.__name__}") from exc
    return disabled_at is not None


def peer_principal(db: Database, ae_title: str, institution: str) -> Principal:
    """The principal of a DIMSE peer. The peer registry binds its AE title to its host
    (checked when the association opens) and names its institution; the institution's
    consents apply once it is registered here too (``institutions add``)."""
    institution = institution.strip()
    inst_id = None
    if institution:
        with db.reading() as session:
            inst = session.scalar(select(Institution).where(Institution.name == institution))
        if inst is not None and inst.disabled_at is not None:
            institution = ""  # a disabled institution sees nothing
        elif inst is not None:
            inst_id = inst.id
    return Principal(
        kind=Kind.SYSTEM,
        id=0,
        name=ae_title.strip(),
        institution_id=inst_id,
        institution=institution,
    )


def disable_user(db: Database, user_id: int, now: dt.datetime | None = None) -> None:
    with db.writing() as session:
        row = session.get(User, user_id)
        if row is None:
            raise ConsentError("no such user")
        row.disabled_at = now or utcnow()


# -- administration: what the operator CLI and the admin API share ------------------------
@dataclass(frozen=True)
class InstitutionView:
    name: str
    issuer: str
    description: str
    disabled: bool
    clients: tuple[str, ...]  # its enabled DICOMweb client ids


@dataclass(frozen=True)
class UserView:
    username: str
    kind: str
    display_name: str
    institution: str
    role: str
    disabled: bool
    has_password: bool
    has_totp: bool


def list_institutions(db: Database) -> list[InstitutionView]:
    with db.reading() as session:
        insts = session.scalars(select(Institution).order_by(Institution.name)).all()
        systems = session.scalars(
            select(InstitutionSystem).where(InstitutionSystem.disabled_at.is_(None))
        ).all()
    return [
        InstitutionView(
            name=inst.name,
            issuer=inst.issuer,
            description=inst.description,
            disabled=inst.disabled_at is not None,
            clients=tuple(s.client_id for s in systems if s.institution_fk == inst.id),
        )
        for inst in insts
    ]


def disable_institution(db: Database, name: str, now: dt.datetime | None = None) -> None:
    """From the next request its staff and DICOMweb clients are refused and its DIMSE
    peers see nothing (``user_principal``, ``system_principal``, ``peer_principal``)."""
    with db.writing() as session:
        row = session.scalar(select(Institution).where(Institution.name == name.strip()))
        if row is None:
            raise ConsentError(f"no institution named {name!r}")
        if row.disabled_at is None:
            row.disabled_at = now or utcnow()


@dataclass(frozen=True)
class ClientView:
    """A DICOMweb client as operators see it: never its secret nor the secret's hash."""

    client_id: str
    institution: str
    description: str
    created_at: dt.datetime
    disabled: bool


def list_clients(db: Database, institution: str) -> list[ClientView]:
    """An institution's DICOMweb clients, disabled ones included."""
    inst_id = institution_id(db, institution)
    with db.reading() as session:
        rows = session.scalars(
            select(InstitutionSystem)
            .where(InstitutionSystem.institution_fk == inst_id)
            .order_by(InstitutionSystem.client_id)
        ).all()
    return [
        ClientView(
            client_id=row.client_id,
            institution=institution.strip(),
            description=row.description,
            created_at=row.created_at,
            disabled=row.disabled_at is not None,
        )
        for row in rows
    ]


def disable_client(
    db: Database, institution: str, client_id: str, now: dt.datetime | None = None
) -> None:
    """From the next request the client can get no token and the tokens it holds are
    refused (``authenticate_client`` and ``system_principal`` read ``disabled_at``)."""
    inst_id = institution_id(db, institution)
    with db.writing() as session:
        row = session.scalar(
            select(InstitutionSystem).where(
                InstitutionSystem.institution_fk == inst_id,
                InstitutionSystem.client_id == client_id.strip(),
            )
        )
        if row is None:
            raise ConsentError(f"no such client {client_id!r} of {institution.strip()!r}")
        if row.disabled_at is None:
            row.disabled_at = now or utcnow()


def list_users(db: Database) -> list[UserView]:
    with db.reading() as session:
        rows = session.execute(
            select(User, Institution.name)
            .outerjoin(Institution, Institution.id == User.institution_fk)
            .order_by(User.username)
        ).all()
    return [
        UserView(
            username=user.username,
            kind=user.kind,
            display_name=user.display_name,
            institution=inst or "",
            role=user.role,
            disabled=user.disabled_at is not None,
            has_password=bool(user.password_hash),
            has_totp=bool(user.totp_secret),
        )
        for user, inst in rows
    ]


def disable_username(db: Database, username: str) -> None:
    with db.reading() as session:
        user_id = session.scalar(select(User.id).where(User.username == username.strip()))
    if user_id is None:
        raise ConsentError(f"no user {username!r}")
    disable_user(db, user_id)
