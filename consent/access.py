"""The one access decision: may this principal do this operation to these studies?

Every door asks here, and the answer is a SQL condition on ``studies`` rows
(``study_filter``) that the one query engine applies inside its query (through
``Query.study_scope``), so paging and counts only ever see permitted studies. A
retrieve checks the studies its instances belong to with the same condition
(``permitted_studies``); a study the principal may not see is answered exactly like
one that does not exist.

Default deny. The rules:

- an institution (its staff and its systems) sees the studies it sent: instances
  record their source institution at ingest, and each study its senders
  (``study_sources``);
- it sees a patient's studies the patient consented to (a permit consent naming the
  institution, in its period, not revoked, for all studies or the named ones; a deny
  consent overrides permits but not the institution's own studies);
- a patient sees the studies of the archive patients linked to their account, and so
  does a guardian or legal representative linked by proxy (until the link ends);
- a share link's holder sees the link's studies while the link is live (view; whole
  instances only if the link allows download);
- an institution (its staff and its systems, who may also exchange such a link) sees
  the studies of a live share link bound to it as recipient (not single-use, not
  expired, not revoked), with the link's rights, for its lifetime: a signed-in member
  of the recipient institution is the intended recipient, so no token or access code
  is needed (``shared_with``);
- a user with a live break-glass grant sees that patient's studies (flagged);
- operators and auditors administer but read no images (break-glass aside);
- the demo principal (demo profile only) sees everything.

``Gate`` puts the decision and the audit trail together for the doors.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Alias,
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Session

from consent.audit import Attempt, Auditor
from consent.models import (
    BreakGlass,
    Consent,
    ConsentStudy,
    PatientLink,
    ShareLink,
    ShareLinkStudy,
)
from consent.principals import Kind, Operation, Principal, Role
from gateway.archive.db import Database
from gateway.archive.errors import NotAuthorized
from gateway.archive.models import Patient, Study, StudySource, UTCDateTime, utcnow

log = logging.getLogger(__name__)

_READS = {Operation.SEARCH, Operation.VIEW, Operation.DOWNLOAD}
# Staff roles that may store (send studies in); radiologists read.
_STORING_ROLES = {Role.CLERK.value, Role.INSTITUTION_ADMIN.value}


def study_filter(
    principal: Principal, operation: Operation, now: dt.datetime | None = None
) -> ColumnElement[bool]:
    """Condition on ``Study`` rows this principal may ``operation`` at ``now`` (by
    default: when the statement runs)."""
    if now is not None:
        return _study_filter(principal, operation, now)
    return _cached_filter(_scope_key(principal), operation)


# A rule's time: a datetime, or ``_NOW``.
_Now = dt.datetime | BindParameter[dt.datetime]

# The current time as the statement runs: a condition built once per principal and
# operation then serves every request (building it took ~1 ms of Python per request,
# and a statement reusing it also reuses SQLAlchemy's cache key).
_NOW = bindparam("scope_now", callable_=utcnow, type_=UTCDateTime())


def _scope_key(principal: Principal) -> tuple[Kind, int, int | None, str, bool]:
    # What a principal's scope depends on (its name does not).
    return (
        principal.kind,
        principal.id,
        principal.institution_id,
        principal.institution,
        principal.can_download,
    )


@functools.lru_cache(maxsize=1024)
def _cached_rules(
    key: tuple[Kind, int, int | None, str, bool], operation: Operation, probe: bool
) -> tuple[ColumnElement[bool], ...]:
    kind, principal_id, institution_id, institution, can_download = key
    principal = Principal(
        kind=kind,
        id=principal_id,
        name="",
        institution_id=institution_id,
        institution=institution,
        can_download=can_download,
    )
    return tuple(_study_rules(principal, operation, _NOW, probe=probe))


@functools.lru_cache(maxsize=1024)
def _cached_filter(
    key: tuple[Kind, int, int | None, str, bool], operation: Operation
) -> ColumnElement[bool]:
    return _either(_cached_rules(key, operation, True))


def _either(rules: Sequence[ColumnElement[bool]]) -> ColumnElement[bool]:
    return rules[0] if len(rules) == 1 else or_(*rules)


def _study_filter(principal: Principal, operation: Operation, now: _Now) -> ColumnElement[bool]:
    return _either(_study_rules(principal, operation, now, probe=True))


def study_rules(principal: Principal, operation: Operation) -> tuple[ColumnElement[bool], ...]:
    """The rules whose union is ``study_filter``, each written so the database can
    also drive a query from it (the studies an institution sent as a join, not a
    probe): the query engine reads a page per rule when its keys select little."""
    return _cached_rules(_scope_key(principal), operation, False)


def _study_rules(
    principal: Principal, operation: Operation, now: _Now, *, probe: bool
) -> list[ColumnElement[bool]]:
    kind = principal.kind
    if kind is Kind.DEMO:
        return [true()]
    if operation not in _READS:
        return [false()]  # storing is a permission of the principal (may_store), not a scope
    if kind is Kind.PATIENT:
        return [_patient_studies(principal.id, now)]
    if kind is Kind.LINK:
        if operation is Operation.DOWNLOAD and not principal.can_download:
            return [false()]
        return [_link_studies(principal.id, now)]
    if kind in (Kind.STAFF, Kind.SYSTEM):
        if not principal.institution:
            return [false()]
        rules = [_sent_by(principal.institution, probe=probe)]
        if principal.institution_id is not None:
            rules.append(_consented_to(principal.institution_id, now))
            rules.append(_shared_with(principal.institution_id, operation, now))
        if kind is Kind.STAFF:
            rules.append(_break_glass_studies(principal.id, now))
        return rules
    if kind is Kind.OPERATOR:
        return [_break_glass_studies(principal.id, now)]
    return [false()]  # auditors, and any kind added later until it gets a rule


def break_glass_filter(principal: Principal, now: dt.datetime | None = None) -> ColumnElement[bool]:
    """Studies this principal reaches through a live break-glass grant (for flagging)."""
    if principal.kind not in (Kind.STAFF, Kind.OPERATOR):
        return false()
    return _break_glass_studies(principal.id, now or utcnow())


def received_filter(principal: Principal, now: dt.datetime | None = None) -> ColumnElement[bool]:
    """Studies an institution's staff see through someone else's decision, not because
    the institution sent them: a patient's consent or share link bound to the
    institution, or the user's own live break-glass grant (an inbox). Always within
    ``study_filter`` for searching."""
    if principal.kind is not Kind.STAFF or principal.institution_id is None:
        return false()
    now = now or utcnow()
    return and_(
        or_(
            _consented_to(principal.institution_id, now),
            _shared_with(principal.institution_id, Operation.SEARCH, now),
            _break_glass_studies(principal.id, now),
        ),
        not_(_sent_by(principal.institution)),
    )


def shared_with(
    db: Database,
    principal: Principal,
    operation: Operation,
    study_uids: Iterable[str],
    now: dt.datetime | None = None,
) -> dict[str, list[tuple[int, dt.datetime]]]:
    """For each of ``study_uids`` the staff or system principal reaches through share
    links bound to its institution: those links' (id, expiry), for the audit and the
    inbox. The same rows ``study_filter`` grants by, not a second rule."""
    with db.reading() as session:
        return _shared_with_in(session, principal, operation, study_uids, now or utcnow())


def _shared_with_in(
    session: Session,
    principal: Principal,
    operation: Operation,
    study_uids: Iterable[str],
    now: dt.datetime,
) -> dict[str, list[tuple[int, dt.datetime]]]:
    wanted = sorted({u for u in study_uids if u})
    if not wanted or principal.kind not in (Kind.STAFF, Kind.SYSTEM):
        return {}
    if principal.institution_id is None or not principal.institution:
        return {}
    stmt, s = _recipient_links(principal.institution_id, operation, now)
    found: dict[str, list[tuple[int, dt.datetime]]] = {}
    rows = session.execute(
        stmt.with_only_columns(s.c.study_uid, ShareLink.id, ShareLink.expires_at)
        .where(s.c.study_uid.in_(wanted))
        .order_by(ShareLink.id)
    ).all()
    for uid, link_id, expires_at in rows:
        found.setdefault(uid, []).append((link_id, expires_at))
    return found


def may_store(principal: Principal) -> bool:
    """Whether the principal may send instances in (STOW-RS; C-STORE is decided by the
    peer registry). What it stores is recorded as sent by its institution."""
    if principal.kind is Kind.DEMO:
        return True
    if principal.kind is Kind.SYSTEM:
        return bool(principal.institution)
    if principal.kind is Kind.STAFF:
        return principal.institution_id is not None and principal.role in _STORING_ROLES
    return False


# Who sees national identification numbers (gateway.ops.national_ids) unmasked: the
# institution's systems (their interfaces match patients by them), its registration
# clerks and admins. Radiologists, patients, link holders, operators and auditors see
# them masked: reading images or a history does not need them.
_NATIONAL_ID_ROLES = {Role.CLERK.value, Role.INSTITUTION_ADMIN.value}


def sees_national_ids(principal: Principal) -> bool:
    if principal.kind in (Kind.DEMO, Kind.SYSTEM):
        return True
    return principal.kind is Kind.STAFF and principal.role in _NATIONAL_ID_ROLES


def may_add_to_study(db: Database, principal: Principal, study_uid: str) -> bool:
    """Whether ``principal`` may store instances into ``study_uid``: a new study, or one
    it already sees. Storing into another sender's study would otherwise make that
    study visible to it (an institution sees what it sent)."""
    if principal.kind is Kind.DEMO:
        return True
    with db.reading() as session:
        found = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if found is None:
            return True
        if principal.kind in (Kind.STAFF, Kind.SYSTEM) and principal.institution:
            # The common case, a sender adding to a study it sent: one primary-key probe
            # of the rule that decides it (the whole condition took ~26 ms per
            # association and study on a loaded machine).
            sent = session.scalar(
                select(_SOURCE.c.study_fk).where(
                    _SOURCE.c.study_fk == found, _SOURCE.c.institution == principal.institution
                )
            )
            if sent is not None:
                return True
        return bool(_permitted_in(session, principal, Operation.SEARCH, [study_uid], None))


def permitted_studies(
    db: Database,
    principal: Principal,
    operation: Operation,
    study_uids: Iterable[str],
    now: dt.datetime | None = None,
) -> set[str]:
    """Which of ``study_uids`` (existing or not) the principal may ``operation``."""
    wanted = sorted({u for u in study_uids if u})
    if not wanted:
        return set()
    with db.reading() as session:
        return _permitted_in(session, principal, operation, wanted, now)


def _permitted_in(
    session: Session,
    principal: Principal,
    operation: Operation,
    wanted: list[str],
    now: dt.datetime | None,
) -> set[str]:
    condition = study_filter(principal, operation, now)
    return set(
        session.scalars(select(Study.study_uid).where(Study.study_uid.in_(wanted), condition)).all()
    )


# -- the rules as SQL --------------------------------------------------------------------
# Every subquery works on aliases: the engine's outer query already has studies,
# series and instances in its FROM list, and SQLAlchemy would otherwise correlate.
# Table aliases made once, not ORM ``aliased()`` per request: adapting ORM attributes
# to a fresh alias took 10-40 ms of Python per scoped query, longer than running it.
# One alias serves several subqueries of a statement: they are siblings, never nested
# in one another, so none correlates to another's.
_S = Study.__table__.alias("scope_studies")
_P = Patient.__table__.alias("scope_patients")
_LINK = PatientLink.__table__.alias("scope_patient_links")
_SOURCE = StudySource.__table__.alias("scope_study_sources")


def _linked_patient_studies(user_fk: object, now: _Now) -> tuple[Select[Any], Alias, Alias]:
    # A patient's own links, and a guardian's or legal representative's (proxy links)
    # until they end: the proxy acts for the patient in every rule below.
    s, p, link = _S, _P, _LINK
    join = (
        select(s.c.id)
        .join(p, s.c.patient_fk == p.c.id)
        .join(
            link,
            and_(
                link.c.issuer == p.c.issuer,
                link.c.patient_id == p.c.patient_id,
                p.c.unidentified_study_uid == "",
            ),
        )
        .where(
            link.c.user_fk == user_fk,
            link.c.revoked_at.is_(None),
            or_(link.c.ends_at.is_(None), link.c.ends_at > now),
        )
    )
    return join, s, link


def _patient_studies(user_id: int, now: _Now) -> ColumnElement[bool]:
    stmt, _s, _link = _linked_patient_studies(user_id, now)
    return Study.id.in_(stmt)


def _live_link_studies(now: _Now) -> tuple[Select[Any], Alias]:
    # Live share links' studies, and only while they are still the owner's (a revoked
    # patient link takes its studies out of every share link made from it).
    stmt, s, link = _linked_patient_studies(ShareLink.user_fk, now)
    stmt = (
        stmt.join(ShareLink, ShareLink.user_fk == link.c.user_fk)
        .join(
            ShareLinkStudy,
            and_(ShareLinkStudy.link_fk == ShareLink.id, ShareLinkStudy.study_uid == s.c.study_uid),
        )
        .where(ShareLink.revoked_at.is_(None), ShareLink.expires_at > now)
    )
    return stmt, s


def _link_studies(link_id: int, now: _Now) -> ColumnElement[bool]:
    stmt, _s = _live_link_studies(now)
    return Study.id.in_(stmt.where(ShareLink.id == link_id))


def _recipient_links(
    institution_id: int, operation: Operation, now: _Now
) -> tuple[Select[Any], Alias]:
    # Links bound to the institution as recipient. A single-use link is for one
    # exchange by one holder, so it grants the institution nothing standing.
    stmt, s = _live_link_studies(now)
    stmt = stmt.where(
        ShareLink.recipient_institution_fk == institution_id,
        ShareLink.single_use.is_(False),
    )
    if operation is Operation.DOWNLOAD:
        stmt = stmt.where(ShareLink.can_download.is_(True))
    return stmt, s


def _shared_with(institution_id: int, operation: Operation, now: _Now) -> ColumnElement[bool]:
    stmt, _s = _recipient_links(institution_id, operation, now)
    return Study.id.in_(stmt)


def _sent_by(institution: str, *, probe: bool = True) -> ColumnElement[bool]:
    # The study's senders as recorded at ingest (``study_sources``). As a probe: one
    # primary-key probe per candidate study. Through the instances instead (a probe
    # of series and instances per study, or a hash over every instance the
    # institution sent) a scoped QIDO took 22-270 ms at 100,000 studies; IN over
    # every study it sent, built in full per request, 170-600 ms. Fenced with OFFSET 0
    # so PostgreSQL keeps it a probe: otherwise it hashed every study the institution
    # sent before reading a page of the newest (KIM* with limit=100: 158 ms for an
    # institution that sent all 100,000 studies, 11 ms probing; 23 against 30 ms
    # when it sent a tenth). Not a probe (``probe=False``): a semi-join the database
    # may drive from, reading the institution's studies newest first from the
    # (institution, study) index, for a page of a query whose keys select little.
    if not probe:
        return Study.id.in_(select(_SOURCE.c.study_fk).where(_SOURCE.c.institution == institution))
    return (
        select(_SOURCE.c.study_fk)
        .where(_SOURCE.c.study_fk == Study.id, _SOURCE.c.institution == institution)
        .offset(0)
        .exists()
    )


def _consented_to(institution_id: int, now: _Now) -> ColumnElement[bool]:
    # Studies some live consent to the institution covers and no live deny consent
    # does: one pass over the patients' consents, grouped per study (a permit set and
    # a deny set as two subqueries cost PostgreSQL 0.5 ms more planning per query).
    stmt, s, link = _linked_patient_studies(Consent.user_fk, now)
    listed = exists().where(
        ConsentStudy.consent_fk == Consent.id, ConsentStudy.study_uid == s.c.study_uid
    )
    stmt = (
        stmt.join(Consent, Consent.user_fk == link.c.user_fk)
        .where(
            Consent.institution_fk == institution_id,
            Consent.decision.in_(("permit", "deny")),
            Consent.revoked_at.is_(None),
            Consent.period_start <= now,
            or_(Consent.period_end.is_(None), Consent.period_end > now),
            or_(Consent.all_studies, listed),
        )
        .group_by(s.c.id)
        .having(func.max(case((Consent.decision == "deny", 1), else_=0)) == 0)
    )
    return Study.id.in_(stmt)


def _break_glass_studies(user_id: int, now: _Now) -> ColumnElement[bool]:
    s, p = _S, _P
    stmt = (
        select(s.c.id)
        .join(p, s.c.patient_fk == p.c.id)
        .join(
            BreakGlass,
            and_(
                BreakGlass.issuer == p.c.issuer,
                BreakGlass.patient_id == p.c.patient_id,
                p.c.unidentified_study_uid == "",
            ),
        )
        .where(
            BreakGlass.user_fk == user_id,
            BreakGlass.ended_at.is_(None),
            BreakGlass.started_at <= now,
            BreakGlass.expires_at > now,
        )
    )
    return Study.id.in_(stmt)


# -- decision plus audit, for the doors ----------------------------------------------------
class SearchScope:
    """A search's ``Query.study_scope``: called, the condition on ``Study`` rows;
    ``rules()``, the same scope as rules whose union it is (see ``study_rules``)."""

    __slots__ = ("principal",)

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    def __call__(self) -> ColumnElement[bool]:
        return study_filter(self.principal, Operation.SEARCH)

    def rules(self) -> tuple[ColumnElement[bool], ...]:
        return study_rules(self.principal, Operation.SEARCH)


class Gate:
    """What a door calls: scopes for queries and checks for retrieves, each audited."""

    def __init__(self, db: Database, auditor: Auditor) -> None:
        self.db = db
        self.auditor = auditor

    def search_scope(
        self,
        principal: Principal,
        *,
        door: str,
        client: str = "",
        purpose: str = "",
        detail: str = "",
    ) -> SearchScope:
        """The ``Query.study_scope`` for a search, which is audited as attempted."""
        self.auditor.record(
            Attempt(
                principal=principal,
                door=door,
                operation=Operation.SEARCH.value,
                outcome="allowed",
                purpose=purpose,
                client=client,
                detail=detail,
            )
        )
        return SearchScope(principal)

    def check(
        self,
        principal: Principal,
        operation: Operation,
        study_uids: Iterable[str],
        *,
        door: str,
        client: str = "",
        purpose: str = "",
    ) -> set[str]:
        """The permitted subset of ``study_uids``; every study's outcome is audited."""
        wanted = sorted({u for u in study_uids if u})
        now = utcnow()
        allowed: set[str] = set()
        flagged: set[str] = set()
        shared: dict[str, list[tuple[int, dt.datetime]]] = {}
        # One connection for the decision, its flags and its reasons: each more cost
        # a retrieve its own pre-ping, BEGIN and ROLLBACK round trips on PostgreSQL.
        with self.db.reading() as session:
            if wanted:
                allowed = _permitted_in(session, principal, operation, wanted, None)
            if allowed and principal.kind in (Kind.STAFF, Kind.OPERATOR):
                flagged = set(
                    session.scalars(
                        select(Study.study_uid).where(
                            Study.study_uid.in_(sorted(allowed)),
                            break_glass_filter(principal, now),
                        )
                    ).all()
                )
            # Access under a recipient-bound share link names the link (its id, never
            # its token) as the reason.
            if allowed:
                shared = _shared_with_in(session, principal, operation, allowed, now)
        for uid in wanted:
            links = shared.get(uid, [])
            self.auditor.record(
                Attempt(
                    principal=principal,
                    door=door,
                    operation=operation.value,
                    outcome="allowed" if uid in allowed else "denied",
                    study_uid=uid,
                    purpose=purpose or ("ETREAT" if uid in flagged else ""),
                    client=client,
                    break_glass=uid in flagged,
                    detail=", ".join(f"share link {i}" for i, _ in links),
                )
            )
        return allowed

    def check_delivery(
        self,
        principal: Principal,
        receiver: Principal,
        study_uids: Iterable[str],
        *,
        door: str,
        operation: str,
        client: str = "",
    ) -> set[str]:
        """Of ``study_uids`` (which ``principal`` may download), those it may also send
        to ``receiver``, another system (a C-MOVE destination, a forwarding target, as
        ``peer_principal`` sees it): a study goes there only if the receiver's
        institution may download it itself, or the receiver belongs to the principal's
        own institution. Every study's outcome is audited (destination in the detail)."""
        wanted = sorted({u for u in study_uids if u})
        same = bool(receiver.institution) and receiver.institution == principal.institution
        allowed = (
            set(wanted)
            if same
            else permitted_studies(self.db, receiver, Operation.DOWNLOAD, wanted)
        )
        to = f"to {receiver.name} ({receiver.institution or 'no institution'})"
        refusal = (
            f"{receiver.name}'s institution ({receiver.institution or 'none registered'}) "
            "may not receive this study (no consent or share for it)"
        )
        for uid in wanted:
            self.auditor.record(
                Attempt(
                    principal=principal,
                    door=door,
                    operation=operation,
                    outcome="allowed" if uid in allowed else "denied",
                    study_uid=uid,
                    client=client,
                    detail=to if uid in allowed else f"{to}: {refusal}",
                )
            )
        return allowed

    def check_store(
        self, principal: Principal, *, door: str, client: str = "", study_uid: str = ""
    ) -> bool:
        allowed = may_store(principal)
        self.auditor.record(
            Attempt(
                principal=principal,
                door=door,
                operation=Operation.STORE.value,
                outcome="allowed" if allowed else "denied",
                study_uid=study_uid,
                client=client,
            )
        )
        return allowed


class StudyAdmission:
    """Which studies one sender (a DIMSE association, a STOW-RS request, an upload) may
    add instances to: each study decided once (``may_add_to_study``) and audited once,
    so the receive path pays a dictionary lookup per instance. Used as the archive's
    ``Source.admit`` hook (``__call__`` raises ``NotAuthorized``) or asked (``allows``)."""

    def __init__(self, gate: Gate, principal: Principal, *, door: str, client: str = "") -> None:
        self.gate = gate
        self.principal = principal
        self.door = door
        self.client = client
        self._decided: dict[str, bool] = {}

    def allows(self, study_uid: str) -> bool:
        allowed = self._decided.get(study_uid)
        if allowed is None:
            allowed = may_add_to_study(self.gate.db, self.principal, study_uid)
            self._decided[study_uid] = allowed
            self.gate.auditor.record(
                Attempt(
                    principal=self.principal,
                    door=self.door,
                    operation=Operation.STORE.value,
                    outcome="allowed" if allowed else "denied",
                    study_uid=study_uid,
                    client=self.client,
                )
            )
        return allowed

    def __call__(self, study_uid: str) -> None:
        if not self.allows(study_uid):
            if self.principal.kind is Kind.SYSTEM and not self.principal.institution:
                # A peer registered without an institution sees nothing, not even what
                # it sent: say what to fix (the Error Comment is 64 characters).
                raise NotAuthorized("sender has no institution; study exists; not stored")
            raise NotAuthorized("the study belongs to another sender; not stored")
