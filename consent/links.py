"""Share links: a patient hands a study to the next hospital instead of a CD.

A link is a token (256 bits, ``sbl_`` prefix) shown once to its creator; the
database keeps its SHA-256. The link travels in a URL *fragment*
(``https://bridge/viewer/share#sbl_...``), which browsers never send to servers or
put in ``Referer``; the viewer's share-link page posts it to ``exchange`` and
receives a short-lived access token scoped to the link's studies. Describing a link
(``describe``) never consumes a single-use link, and fetching the page reaches no
server code, so mail scanners that pre-fetch links do no harm.

Operators see links (``find_links``: never a token, only its hash is stored) and
revoke them (``revoke_any_link``) with ``studybridge links``.

Rules checked on every exchange: not revoked, not expired, not locked out (wrong
access codes counted per link and per client address in a sliding window), the
access code, the recipient institution (the presenter must be signed in as staff or
a system of it), and single use (consumed atomically by the one exchange that wins).
A revoked or expired link stops its access tokens on their next request too, since
those are resolved through the link (``consent.tokens.resolve``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, not_, or_, select, update

from consent.access import permitted_studies
from consent.crypto import hash_secret, new_token, token_hash, verify_secret
from consent.models import (
    AccessToken,
    Institution,
    ShareLink,
    ShareLinkStudy,
    User,
)
from consent.notify import LinkOpened, LogNotifier, Notifier
from consent.principals import ConsentError, Kind, Operation, Principal
from consent.throttle import ACCESS_CODE, Throttle
from consent.tokens import LINK_PREFIX, IssuedToken, issue_for_link
from gateway.archive.db import Database
from gateway.archive.models import utcnow
from gateway.config import Settings

REVOKE_NOTICE = (
    "The link no longer works, from the next request on. Copies already downloaded "
    "or forwarded with it cannot be recalled."
)


class LinkRefused(Exception):
    """An exchange is refused; ``reason`` is a short code, the message safe to show.
    For a wrong access code, ``remaining`` is how many more wrong codes lock the link
    (or this address) out."""

    def __init__(self, reason: str, message: str, *, remaining: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.remaining = remaining


@dataclass(frozen=True)
class LinkPolicy:
    default_lifetime: dt.timedelta
    max_lifetime: dt.timedelta
    token_lifetime: dt.timedelta
    max_failures: int
    max_failures_per_client: int
    lockout: dt.timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkPolicy:
        return cls(
            default_lifetime=dt.timedelta(days=settings.share_link_default_days),
            max_lifetime=dt.timedelta(days=settings.share_link_max_days),
            token_lifetime=dt.timedelta(minutes=settings.access_token_minutes),
            max_failures=settings.access_code_max_failures,
            max_failures_per_client=settings.access_code_max_failures_per_client,
            lockout=dt.timedelta(minutes=settings.access_code_lockout_minutes),
        )

    def throttle(self) -> Throttle:
        return Throttle(ACCESS_CODE, self.max_failures, self.max_failures_per_client, self.lockout)


@dataclass(frozen=True)
class LinkRules:
    can_download: bool = False
    single_use: bool = False
    access_code: str | None = None
    recipient_institution: str | None = None
    lifetime: dt.timedelta | None = None
    label: str = ""


@dataclass(frozen=True)
class LinkInfo:
    """What a link's landing page may show before any exchange (no study data)."""

    status: str  # usable | expired | revoked | used
    needs_access_code: bool
    single_use: bool
    can_download: bool
    recipient_institution: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class LinkView:
    id: int
    label: str
    study_uids: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime
    can_download: bool
    single_use: bool
    has_access_code: bool
    recipient_institution: str
    used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    owner: str = ""  # the patient's username
    status: str = ""  # usable | expired | revoked | used
    # Exchanges so far (access tokens issued) and the last one: how often it was opened.
    opened: int = 0
    last_opened_at: dt.datetime | None = None


def create_link(
    db: Database,
    owner: Principal,
    study_uids: list[str],
    rules: LinkRules,
    policy: LinkPolicy,
    now: dt.datetime | None = None,
) -> tuple[int, str]:
    """Create a link for the owner's studies; returns (link id, token shown once)."""
    now = now or utcnow()
    if owner.kind is not Kind.PATIENT:
        raise ConsentError("only patients create share links for their studies")
    wanted = sorted({u.strip() for u in study_uids if u and u.strip()})
    if not wanted:
        raise ConsentError("a share link names at least one study")
    mine = permitted_studies(db, owner, Operation.VIEW, wanted, now)
    if set(wanted) - mine:
        # Same answer whether the study exists or belongs to someone else.
        raise ConsentError("a share link can only name your own studies")
    lifetime = rules.lifetime or policy.default_lifetime
    if lifetime <= dt.timedelta(0) or lifetime > policy.max_lifetime:
        raise ConsentError(f"a share link lives at most {policy.max_lifetime.days} days")
    code_hash = ""
    if rules.access_code is not None:
        code = rules.access_code.strip()
        if len(code) < 4:
            raise ConsentError("an access code has at least 4 characters")
        code_hash = hash_secret(code)
    token = LINK_PREFIX + new_token()
    with db.writing() as session:
        recipient = None
        if rules.recipient_institution:
            recipient = session.scalar(
                select(Institution.id).where(Institution.name == rules.recipient_institution)
            )
            if recipient is None:
                raise ConsentError(f"no institution named {rules.recipient_institution!r}")
        link = ShareLink(
            token_hash=token_hash(token),
            user_fk=owner.id,
            label=rules.label[:200],
            can_download=rules.can_download,
            single_use=rules.single_use,
            access_code_hash=code_hash,
            recipient_institution_fk=recipient,
            created_at=now,
            expires_at=now + lifetime,
        )
        session.add(link)
        session.flush()
        session.add_all([ShareLinkStudy(link_fk=link.id, study_uid=uid) for uid in wanted])
        return link.id, token


def _find(session: object, token: str) -> ShareLink | None:
    if not token.startswith(LINK_PREFIX) or len(token) > 200:
        return None
    return session.scalar(  # type: ignore[attr-defined]
        select(ShareLink).where(ShareLink.token_hash == token_hash(token))
    )


def _status(link: ShareLink, now: dt.datetime) -> str:
    if link.revoked_at is not None:
        return "revoked"
    if link.expires_at <= now:
        return "expired"
    if link.single_use and link.used_at is not None:
        return "used"
    return "usable"


def describe(db: Database, token: str, now: dt.datetime | None = None) -> LinkInfo | None:
    """The landing page's view of a link: read-only, never consumes it."""
    now = now or utcnow()
    with db.reading() as session:
        link = _find(session, token)
        if link is None:
            return None
        recipient = (
            session.get(Institution, link.recipient_institution_fk)
            if link.recipient_institution_fk
            else None
        )
        return LinkInfo(
            status=_status(link, now),
            needs_access_code=bool(link.access_code_hash),
            single_use=link.single_use,
            can_download=link.can_download,
            recipient_institution=recipient.name if recipient else "",
            expires_at=link.expires_at,
        )


def exchange(
    db: Database,
    token: str,
    policy: LinkPolicy,
    *,
    client: str,
    access_code: str | None = None,
    presenter: Principal | None = None,
    notifier: Notifier | None = None,
    now: dt.datetime | None = None,
) -> IssuedToken:
    """Trade a share-link token for an access token scoped to the link's studies."""
    now = now or utcnow()
    client = client[:64]
    with db.reading() as session:
        link = _find(session, token)
        if link is None:
            raise LinkRefused("unknown", "this link is not valid")
        status = _status(link, now)
        if status != "usable":
            raise LinkRefused(status, f"this link is {status}")
        link_id, owner, expires = link.id, link.user_fk, link.expires_at
        code_hash, single_use = link.access_code_hash, link.single_use
        recipient = link.recipient_institution_fk
    throttle = policy.throttle()
    standing = throttle.standing(db, str(link_id), client, now)
    if standing.locked_by == "subject":
        raise LinkRefused("locked", "too many wrong access codes for this link; try again later")
    if standing.locked_by:
        raise LinkRefused("locked", "too many wrong access codes from this address; try later")
    if code_hash and (not access_code or not verify_secret(access_code.strip(), code_hash)):
        throttle.failed(db, str(link_id), client, now)
        # 0: this was the last try; the next exchange is refused as locked.
        raise LinkRefused(
            "access-code", "the access code is not right", remaining=standing.remaining - 1
        )
    acting_user = None
    if recipient is not None:
        if (
            presenter is None
            or presenter.kind not in (Kind.STAFF, Kind.SYSTEM)
            or presenter.institution_id != recipient
        ):
            raise LinkRefused(
                "recipient", "this link is for another institution: sign in as its staff"
            )
        acting_user = presenter.id if presenter.kind is Kind.STAFF else None
    if single_use:
        with db.writing() as session:
            won = session.execute(
                update(ShareLink)
                .where(ShareLink.id == link_id, ShareLink.used_at.is_(None))
                .values(used_at=now)
            ).rowcount
        if not won:
            raise LinkRefused("used", "this link is used")
    issued = issue_for_link(
        db,
        link_id,
        policy.token_lifetime,
        link_expires_at=expires,
        client=client,
        acting_user_id=acting_user,
        now=now,
    )
    (notifier or LogNotifier()).link_opened(
        LinkOpened(
            link_id=link_id,
            owner_user_id=owner,
            at=now,
            client=client,
            opened_by=presenter.name if presenter else "anonymous holder",
        )
    )
    return issued


def revoke_link(
    db: Database, owner: Principal, link_id: int, now: dt.datetime | None = None
) -> str:
    """Revoke one of the owner's links (and its access tokens); returns the notice."""
    if owner.kind is not Kind.PATIENT:
        raise ConsentError("no such share link")
    return _revoke(db, link_id, owner.id, now or utcnow())


def revoke_any_link(db: Database, link_id: int, now: dt.datetime | None = None) -> str:
    """An operator's revocation (a link sent to the wrong person, a lost phone), from
    ``studybridge links revoke``; the caller audits it. Returns the notice."""
    return _revoke(db, link_id, None, now or utcnow())


def _revoke(db: Database, link_id: int, owner_id: int | None, now: dt.datetime) -> str:
    with db.writing() as session:
        link = session.get(ShareLink, link_id)
        if link is None or (owner_id is not None and link.user_fk != owner_id):
            raise ConsentError("no such share link")
        if link.revoked_at is None:
            link.revoked_at = now
        session.execute(
            update(AccessToken)
            .where(AccessToken.link_fk == link_id, AccessToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    return REVOKE_NOTICE


def list_links(db: Database, owner: Principal) -> list[LinkView]:
    """The owner's links, newest first."""
    return _views(db, [ShareLink.user_fk == owner.id], utcnow())


def find_links(
    db: Database,
    *,
    username: str | None = None,
    link_id: int | None = None,
    live_only: bool = False,
    now: dt.datetime | None = None,
) -> list[LinkView]:
    """Operators' view of links (``studybridge links``): every link, one patient's, or
    one link, newest first. Never the token: only its hash is stored."""
    now = now or utcnow()
    conditions: list[ColumnElement[bool]] = []
    if username is not None:
        conditions.append(User.username == username)
    if link_id is not None:
        conditions.append(ShareLink.id == link_id)
    if live_only:
        conditions += [
            ShareLink.revoked_at.is_(None),
            ShareLink.expires_at > now,
            or_(ShareLink.used_at.is_(None), not_(ShareLink.single_use)),
        ]
    return _views(db, conditions, now)


def _views(db: Database, conditions: list[ColumnElement[bool]], now: dt.datetime) -> list[LinkView]:
    with db.reading() as session:
        rows = session.execute(
            select(ShareLink, User.username)
            .join(User, User.id == ShareLink.user_fk)
            .where(*conditions)
            .order_by(ShareLink.id.desc())
        ).all()
        ids = [link.id for link, _owner in rows]
        studies: dict[int, list[str]] = {}
        opened: dict[int, tuple[int, dt.datetime | None]] = {}
        if ids:
            for link_fk, uid in session.execute(
                select(ShareLinkStudy.link_fk, ShareLinkStudy.study_uid)
                .where(ShareLinkStudy.link_fk.in_(ids))
                .order_by(ShareLinkStudy.study_uid)
            ):
                studies.setdefault(link_fk, []).append(uid)
            for link_fk, count, last in session.execute(
                select(AccessToken.link_fk, func.count(), func.max(AccessToken.created_at))
                .where(AccessToken.link_fk.in_(ids))
                .group_by(AccessToken.link_fk)
            ):
                opened[link_fk] = (count, last)
        names = dict(session.execute(select(Institution.id, Institution.name)).all())
        return [
            LinkView(
                id=link.id,
                label=link.label,
                study_uids=studies.get(link.id, []),
                created_at=link.created_at,
                expires_at=link.expires_at,
                can_download=link.can_download,
                single_use=link.single_use,
                has_access_code=bool(link.access_code_hash),
                recipient_institution=names.get(link.recipient_institution_fk, ""),
                used_at=link.used_at,
                revoked_at=link.revoked_at,
                owner=owner,
                status=_status(link, now),
                opened=opened.get(link.id, (0, None))[0],
                last_opened_at=opened.get(link.id, (0, None))[1],
            )
            for link, owner in rows
        ]


def launch_token(
    db: Database,
    holder: Principal,
    policy: LinkPolicy,
    *,
    client: str = "",
    now: dt.datetime | None = None,
) -> IssuedToken:
    """A second short-lived access token of the link a holder opened, for an external
    viewer's launch URL (IHE IID style). Never the share token, and not the holder's
    own access token: the one that travels in a URL is told apart in the audit trail
    and dies with the link like any other."""
    now = now or utcnow()
    if holder.kind is not Kind.LINK:
        raise ConsentError("launch URLs are made for share links")
    with db.reading() as session:
        link = session.get(ShareLink, holder.id)
        if link is None or _status(link, now) not in ("usable", "used"):
            raise ConsentError("no such share link")
        expires = link.expires_at
    return issue_for_link(
        db, holder.id, policy.token_lifetime, link_expires_at=expires, client=client, now=now
    )


def studies_of_link(db: Database, link_id: int) -> list[str]:
    with db.reading() as session:
        return list(
            session.scalars(
                select(ShareLinkStudy.study_uid)
                .where(ShareLinkStudy.link_fk == link_id)
                .order_by(ShareLinkStudy.study_uid)
            )
        )


def link_studies(db: Database, issued: IssuedToken) -> list[str]:
    """The Study Instance UIDs an access token exchanged for a link reaches."""
    with db.reading() as session:
        link_fk = session.scalar(select(AccessToken.link_fk).where(AccessToken.id == issued.id))
    return [] if link_fk is None else studies_of_link(db, link_fk)
