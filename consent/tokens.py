"""Short-lived access tokens: opaque, random, looked up by hash on every request.

Why opaque and not JWT: every request must see a revocation at once (a revoked share
link stops on the next request), so the server consults the database per request
anyway; a self-contained signed token would add a signing key to guard and an
algorithm header to police (``alg: none``, RS/HS confusion) and buy nothing. An
opaque token is one indexed lookup of its SHA-256.

Tokens carry a prefix (``sbat_`` access token, ``sbl_`` share link) so log redaction
can recognise them wherever they appear.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select, update

from consent.crypto import new_token, token_hash, verify_secret
from consent.models import AccessToken, InstitutionSystem, ShareLink, User
from consent.principals import (
    Kind,
    Principal,
    system_principal_from,
    system_source,
    user_principal_from,
    user_principal_in,
    user_source,
)
from gateway.archive.db import Database
from gateway.archive.models import utcnow

ACCESS_PREFIX = "sbat_"
LINK_PREFIX = "sbl_"


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown to the client once, never stored
    id: int
    expires_at: dt.datetime


def _issue(
    db: Database,
    ttl: dt.timedelta,
    *,
    client: str = "",
    link_fk: int | None = None,
    user_fk: int | None = None,
    system_fk: int | None = None,
    acting_user_fk: int | None = None,
    expires_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
    via_oidc: bool = False,
) -> IssuedToken:
    now = now or utcnow()
    token = ACCESS_PREFIX + new_token()
    expires = now + ttl
    if expires_at is not None:
        expires = min(expires, expires_at)
    with db.writing() as session:
        row = AccessToken(
            token_hash=token_hash(token),
            link_fk=link_fk,
            user_fk=user_fk,
            system_fk=system_fk,
            acting_user_fk=acting_user_fk,
            client=client[:64],
            created_at=now,
            expires_at=expires,
            via_oidc=via_oidc,
        )
        session.add(row)
        session.flush()
        return IssuedToken(token, row.id, expires)


def issue_for_user(
    db: Database, user_id: int, ttl: dt.timedelta, *, client: str = "", via_oidc: bool = False
) -> IssuedToken:
    """A token for a signed-in user (the sign-in itself is the caller's business);
    ``via_oidc`` marks one an OpenID Connect sign-in opened."""
    return _issue(db, ttl, client=client, user_fk=user_id, via_oidc=via_oidc)


def issue_for_system(
    db: Database, system_id: int, ttl: dt.timedelta, *, client: str = ""
) -> IssuedToken:
    return _issue(db, ttl, client=client, system_fk=system_id)


def issue_for_link(
    db: Database,
    link_id: int,
    ttl: dt.timedelta,
    *,
    link_expires_at: dt.datetime,
    client: str = "",
    acting_user_id: int | None = None,
    now: dt.datetime | None = None,
) -> IssuedToken:
    """Only ``consent.links`` calls this (exchange, launch_token), after checking the
    link's rules."""
    return _issue(
        db,
        ttl,
        client=client,
        link_fk=link_id,
        acting_user_fk=acting_user_id,
        expires_at=link_expires_at,
        now=now,
    )


def authenticate_client(db: Database, client_id: str, secret: str) -> int | None:
    """The system id of a DICOMweb client whose secret matches (client credentials)."""
    with db.reading() as session:
        row = session.scalar(
            select(InstitutionSystem).where(
                InstitutionSystem.kind == "dicomweb", InstitutionSystem.client_id == client_id
            )
        )
    if row is None or row.disabled_at is not None or not row.secret_hash:
        return None
    return row.id if verify_secret(secret, row.secret_hash) else None


def resolve(db: Database, token: str, now: dt.datetime | None = None) -> Principal | None:
    """The principal behind a bearer token, or None (unknown, expired or revoked)."""
    if not token.startswith(ACCESS_PREFIX) or len(token) > 200:
        return None
    now = now or utcnow()
    tokens = AccessToken.__table__
    user_columns, source = user_source(tokens, tokens.c.user_fk == User.__table__.c.id)
    system_columns, source = system_source(
        source, tokens.c.system_fk == InstitutionSystem.__table__.c.id
    )
    # The token and a user's or system's principal in one statement: this runs on
    # every request.
    stmt = (
        select(
            tokens.c.id,
            tokens.c.revoked_at,
            tokens.c.expires_at,
            tokens.c.link_fk,
            tokens.c.acting_user_fk,
            tokens.c.user_fk,
            tokens.c.system_fk,
            *user_columns,
            *system_columns,
        )
        .select_from(source)
        .where(tokens.c.token_hash == token_hash(token))
    )
    with db.read_conn() as conn:
        row = conn.execute(stmt).first()
        if row is None or row.revoked_at is not None or row.expires_at <= now:
            return None
        user_values = row[7 : 7 + len(user_columns)]
        system_values = row[7 + len(user_columns) :]
        if row.link_fk is not None:
            link = conn.execute(
                select(
                    ShareLink.id, ShareLink.revoked_at, ShareLink.expires_at, ShareLink.can_download
                ).where(ShareLink.id == row.link_fk)
            ).first()
            if link is None or link.revoked_at is not None or link.expires_at <= now:
                return None
            acting = (
                user_principal_in(conn, row.acting_user_fk)
                if row.acting_user_fk is not None
                else None
            )
            return Principal(
                kind=Kind.LINK,
                id=link.id,
                name=acting.name if acting else f"link-{link.id}",
                institution_id=acting.institution_id if acting else None,
                institution=acting.institution if acting else "",
                can_download=link.can_download,
                token_id=row.id,
            )
        if row.user_fk is not None:
            return user_principal_from(user_values, token_id=row.id)
        if row.system_fk is not None:
            return system_principal_from(system_values, token_id=row.id)
    return None


def refusal(db: Database, token: str, now: dt.datetime | None = None) -> str:
    """Why ``resolve`` refuses a token, for its holder: ``revoked`` (the token, or the
    share link it came from), ``expired``, or ``invalid`` (unknown, malformed). The
    holder learns only what became of a token they hold."""
    if not token.startswith(ACCESS_PREFIX) or len(token) > 200:
        return "invalid"
    now = now or utcnow()
    with db.reading() as session:
        row = session.scalar(select(AccessToken).where(AccessToken.token_hash == token_hash(token)))
        if row is None:
            return "invalid"
        link = session.get(ShareLink, row.link_fk) if row.link_fk is not None else None
        if row.revoked_at is not None or (link is not None and link.revoked_at is not None):
            return "revoked"
        if row.expires_at <= now or (link is not None and link.expires_at <= now):
            return "expired"
    return "invalid"


def revoke_token(db: Database, token_id: int, now: dt.datetime | None = None) -> bool:
    """Revoke a token; returns whether an OpenID Connect sign-in had issued it."""
    with db.writing() as session:
        session.execute(
            update(AccessToken)
            .where(AccessToken.id == token_id, AccessToken.revoked_at.is_(None))
            .values(revoked_at=now or utcnow())
        )
        via_oidc = session.scalar(select(AccessToken.via_oidc).where(AccessToken.id == token_id))
    return bool(via_oidc)
