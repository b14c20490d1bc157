"""The consent schema: principals, patient links, consents, share links, tokens, audit.

These tables live on the archive's declarative ``Base`` (one schema, one Alembic
chain) but the archive never reads them: ``consent`` knows the archive's identifiers
(Study Instance UIDs, issuer + Patient ID, the source institution recorded on each
instance), not the other way round.

Secrets are never stored: share-link tokens and access tokens as SHA-256 hashes
(they carry 256 random bits, so a fast hash is enough), access codes and client
secrets with scrypt (they may be short). Rows that record a decision (consents,
links, grants) are revoked by setting ``revoked_at``, never deleted, so the history
a patient sees stays whole.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.archive.models import LO, UID, Base, UTCDateTime, utcnow

HASH = String(64)  # hex SHA-256


class Institution(Base):
    """A hospital or imaging centre. ``name`` is what instances record as their source
    institution at ingest (the peer registry's institution for DIMSE senders)."""

    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(LO, nullable=False, unique=True)
    # Issuer of Patient ID this institution assigns (for patient links and requests).
    issuer: Mapped[str] = mapped_column(LO, nullable=False, default="")
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class User(Base):
    """A person who signs in: patient, institution staff, operator or auditor."""

    __tablename__ = "users"
    # One account per OpenID Connect subject; local accounts leave it empty.
    __table_args__ = (
        Index(
            "ix_users_oidc_subject",
            "oidc_subject",
            unique=True,
            sqlite_where=text("oidc_subject <> ''"),
            postgresql_where=text("oidc_subject <> ''"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # consent.principals.Kind
    display_name: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    # Staff only: their institution and role (radiologist, clerk, institution_admin).
    institution_fk: Mapped[int | None] = mapped_column(
        ForeignKey("institutions.id"), nullable=True, index=True
    )
    role: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    # Local accounts (the embedded default); empty for accounts signing in via OIDC.
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    totp_secret: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    # OpenID Connect subject for accounts from an identity provider: "<issuer>#<sub>"
    # (an issuer URL has no fragment, so the first "#" separates them). Set by an
    # operator (`studybridge users bind-oidc`) or, for staff under the
    # institution-claim rule, at their first sign-in (consent.oidc).
    oidc_subject: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OIDCLogin(Base):
    """A sign-in through the OpenID Connect provider that has started, not finished.

    Kept on the server so that the callback can take it exactly once (the row is
    deleted as it is read) from any gateway process: the state travels only as its
    hash here, the browser holds a secret cookie whose hash must match, and the nonce
    and PKCE verifier never leave the server until the token request.
    """

    __tablename__ = "oidc_logins"

    state_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    browser_hash: Mapped[str] = mapped_column(HASH, nullable=False)
    nonce: Mapped[str] = mapped_column(String(64), nullable=False)
    code_verifier: Mapped[str] = mapped_column(String(128), nullable=False)
    redirect_uri: Mapped[str] = mapped_column(String(500), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


class InstitutionSystem(Base):
    """A machine acting for an institution over HTTP: a DICOMweb client with credentials.

    DIMSE peers are not here: the peer registry (``peers``) binds each AE title to its
    host and names its institution, and the DIMSE door acts on that.
    """

    __tablename__ = "institution_systems"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    institution_fk: Mapped[int] = mapped_column(
        ForeignKey("institutions.id"), nullable=False, index=True
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="dicomweb")
    client_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    secret_hash: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PatientLink(Base):
    """A patient account is the person behind an archive patient (issuer + Patient ID).

    Made only by an attestation (an institution admin vouching for its own issuer) or
    an operator's verification, with the evidence named; never by matching names.
    """

    __tablename__ = "patient_links"
    __table_args__ = (
        UniqueConstraint("user_fk", "issuer", "patient_id"),
        Index("ix_patient_links_issuer_patient_id", "issuer", "patient_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    issuer: Mapped[str] = mapped_column(LO, nullable=False)
    patient_id: Mapped[str] = mapped_column(LO, nullable=False)
    method: Mapped[str] = mapped_column(String(32), nullable=False)  # attestation | verification
    attested_by_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    evidence: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # self | guardian | legal-representative: a proxy acts for the patient (sees and
    # shares their studies) until ends_at (a minor comes of age, a court order ends).
    relation: Mapped[str] = mapped_column(
        String(32), nullable=False, default="self", server_default="self"
    )
    ends_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Consent(Base):
    """A patient's decision about one recipient organisation (FHIR Consent shaped)."""

    __tablename__ = "consents"
    __table_args__ = (Index("ix_consents_institution_fk_user_fk", "institution_fk", "user_fk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    institution_fk: Mapped[int] = mapped_column(ForeignKey("institutions.id"), nullable=False)
    decision: Mapped[str] = mapped_column(String(8), nullable=False)  # permit | deny
    # v3 PurposeOfUse code (TREAT, ETREAT, PATRQT, ...).
    purpose: Mapped[str] = mapped_column(String(16), nullable=False, default="TREAT")
    period_start: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    period_end: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # True: every study of the patient's linked IDs; False: the studies in consent_studies.
    all_studies: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    request_fk: Mapped[int | None] = mapped_column(ForeignKey("access_requests.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ConsentStudy(Base):
    __tablename__ = "consent_studies"

    consent_fk: Mapped[int] = mapped_column(ForeignKey("consents.id"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True, index=True)


class AccessRequest(Base):
    """An institution asks a patient (named by issuer + Patient ID) for access."""

    __tablename__ = "access_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    institution_fk: Mapped[int] = mapped_column(
        ForeignKey("institutions.id"), nullable=False, index=True
    )
    requested_by_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    issuer: Mapped[str] = mapped_column(LO, nullable=False)
    patient_id: Mapped[str] = mapped_column(LO, nullable=False)
    purpose: Mapped[str] = mapped_column(String(16), nullable=False, default="TREAT")
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # JSON list of Study Instance UIDs; empty list: all studies.
    study_uids: Mapped[str] = mapped_column(Text, nullable=False, default="[]")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    decided_by_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ShareLink(Base):
    """A patient's share link: the token's hash, its scope and its rules."""

    __tablename__ = "share_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(HASH, nullable=False, unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    label: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    can_download: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    single_use: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    access_code_hash: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    recipient_institution_fk: Mapped[int | None] = mapped_column(
        ForeignKey("institutions.id"), nullable=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    # Single-use links: when the one exchange happened.
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ShareLinkStudy(Base):
    __tablename__ = "share_link_studies"

    link_fk: Mapped[int] = mapped_column(ForeignKey("share_links.id"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)


class AuthFailure(Base):
    """One wrong secret (access code, password, client secret): counted per subject
    and per client address for lockout (``consent.throttle``)."""

    __tablename__ = "auth_failures"
    __table_args__ = (
        Index("ix_auth_failures_kind_subject_at", "kind", "subject", "at"),
        Index("ix_auth_failures_kind_client_at", "kind", "client", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    subject: Mapped[str] = mapped_column(String(128), nullable=False)
    client: Mapped[str] = mapped_column(String(64), nullable=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class AccessToken(Base):
    """A short-lived bearer token (opaque; looked up by hash on every request).

    Exactly one of link_fk, user_fk, system_fk names whose it is. A link's token
    carries the link's scope live: revoking the link stops its tokens at once.
    """

    __tablename__ = "access_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(HASH, nullable=False, unique=True)
    link_fk: Mapped[int | None] = mapped_column(
        ForeignKey("share_links.id"), nullable=True, index=True
    )
    user_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    system_fk: Mapped[int | None] = mapped_column(
        ForeignKey("institution_systems.id"), nullable=True
    )
    # For a link token presented by a signed-in staff member (recipient binding).
    acting_user_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    client: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A browser session opened by an OpenID Connect sign-in: its sign-out also offers
    # the provider's end_session_endpoint (RP-initiated logout).
    via_oidc: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )


class BreakGlass(Base):
    """Emergency access to one patient's studies: declared, time-limited, reviewed."""

    __tablename__ = "break_glass"
    __table_args__ = (Index("ix_break_glass_issuer_patient_id", "issuer", "patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    issuer: Mapped[str] = mapped_column(LO, nullable=False)
    patient_id: Mapped[str] = mapped_column(LO, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reviewed_by_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    review_note: Mapped[str] = mapped_column(Text, nullable=False, default="")


class AuditRecord(Base):
    """One audited access attempt (or a window's repeats of it), hash-chained.

    Each writing process appends to its own chain (``chain``, ``seq`` 1, 2, ...) so
    gateways never wait on one another; ``hash`` covers ``prev_hash`` and every
    other column (see consent.audit).
    """

    __tablename__ = "audit_records"
    __table_args__ = (
        UniqueConstraint("chain", "seq"),
        Index("ix_audit_records_study_uid_at", "study_uid", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain: Mapped[str] = mapped_column(String(64), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    prev_hash: Mapped[str] = mapped_column(HASH, nullable=False)
    hash: Mapped[str] = mapped_column(HASH, nullable=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    last_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    principal_kind: Mapped[str] = mapped_column(String(16), nullable=False)
    principal_id: Mapped[str] = mapped_column(String(64), nullable=False)
    principal_name: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    institution: Mapped[str] = mapped_column(LO, nullable=False, default="")
    door: Mapped[str] = mapped_column(String(16), nullable=False)
    operation: Mapped[str] = mapped_column(String(32), nullable=False)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    purpose: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    client: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    break_glass: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="")
