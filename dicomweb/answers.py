"""The portal API's JSON answers as pydantic models, so ``/openapi.json`` documents them.

The routes (``dicomweb.portal``, ``dicomweb.portal_studies``, ``dicomweb.sessions``,
``dicomweb.downloads``)
still build plain dicts; FastAPI checks each answer against the route's model and
writes it out through it, so a model must name exactly the keys the route answers
(a key missing here would silently vanish from the answer). Times are the strings the
routes write (``datetime.isoformat()``, with ``+00:00``): typed ``str`` here, because a
``datetime`` field would be re-written by pydantic (``Z``) and change the answers.
Secrets answered once (a share link's token, an access token) are documented as such.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

ISO = "ISO 8601 date and time (UTC, +00:00)"


# -- tokens and sessions -----------------------------------------------------------------
class TokenAnswer(BaseModel):
    access_token: str = Field(description="Opaque (sbat_...); send as Authorization: Bearer")
    token_type: str = Field(description="Bearer")
    expires_in: int = Field(description="Seconds left")
    expires_at: str = Field(description=ISO)


class ViewerToken(BaseModel):
    access_token: str = Field(description="Short-lived, of the signed-in account")
    token_type: str
    expires_at: str = Field(description=ISO)


class Account(BaseModel):
    username: str
    display_name: str
    kind: str = Field(description="patient, staff, operator or auditor")
    institution: str = Field(description="Staff only; empty otherwise")
    role: str = Field(description="Staff only; empty otherwise")


class BrowserSignedIn(BaseModel):
    account: Account
    csrf: str = Field(description="Send as X-CSRF-Token on every state-changing request")
    expires_at: str = Field(description=ISO)


class BrowserSession(BaseModel):
    account: Account
    csrf: str = Field(description="Send as X-CSRF-Token on every state-changing request")


class SignedOut(BaseModel):
    status: str = Field(description="signed out")
    end_session_url: str | None = Field(
        default=None,
        description="Only for a session opened through OpenID Connect whose provider has "
        "an end_session_endpoint: send the browser there to sign out at the provider too",
    )


# -- share links -------------------------------------------------------------------------
class LinkDescription(BaseModel):
    status: str = Field(description="usable, expired, revoked or used")
    needs_access_code: bool
    single_use: bool
    can_download: bool
    recipient_institution: str = Field(description="Empty when not bound to one")
    expires_at: str = Field(description=ISO)


class LinkExchanged(TokenAnswer):
    dicomweb: str = Field(description="DICOMweb base URL to use the token with")
    study_uids: list[str]
    viewer: str | None = Field(
        default=None, description="Only when an external viewer is configured: its launch URL"
    )


class ShareLink(BaseModel):
    id: int
    label: str
    study_uids: list[str]
    created_at: str = Field(description=ISO)
    expires_at: str = Field(description=ISO)
    can_download: bool
    single_use: bool
    has_access_code: bool
    recipient_institution: str
    used_at: str | None = Field(description=ISO)
    revoked_at: str | None = Field(description=ISO)


class NewShareLink(BaseModel):
    id: int
    token: str = Field(description="Shown once, never again: only its hash is stored")
    url: str = Field(description="The share page, with the token in the fragment")
    qr_svg: str = Field(description="The URL as a QR code (SVG document)")


class Notice(BaseModel):
    notice: str


class LinkLaunch(BaseModel):
    url: str = Field(description="The IID viewer's URL, with a short-lived access token")
    expires_at: str = Field(description=ISO)


# -- consents, requests, history, break-glass ---------------------------------------------
class FhirConsent(BaseModel):
    """A consent as a FHIR R4 Consent resource (``consent.consents.to_fhir``); the
    nested elements are FHIR's own (CodeableConcept, Reference, Period)."""

    resourceType: str = Field(description="Consent")
    id: str
    status: str = Field(description="active or inactive (revoked or ended)")
    scope: dict[str, Any] = Field(description="patient-privacy")
    category: list[dict[str, Any]] = Field(description="LOINC 59284-0")
    patient: dict[str, Any] = Field(
        description="identifier: the account; extension: its linked Patient IDs"
    )
    dateTime: str = Field(description=ISO)
    policyRule: dict[str, Any] = Field(description="OPTIN or OPTOUT")
    provision: dict[str, Any] = Field(
        description="type (permit, deny), period, actor (the institution), purpose, and "
        "data (the studies) unless it covers all studies"
    )


class AccessRequest(BaseModel):
    id: int
    institution: str
    purpose: str
    reason: str
    study_uids: list[str]
    created_at: str = Field(description=ISO)


class RequestDecided(BaseModel):
    request: int
    decision: str = Field(description="approve or decline")
    consent: int | None = Field(description="The consent the decision made")


class Created(BaseModel):
    id: int


class PatientLinkMade(BaseModel):
    id: int
    relation: str


class Access(BaseModel):
    at: str = Field(description=ISO)
    last_at: str = Field(description=ISO)
    count: int = Field(description="Repeats of the same access in the audit window")
    who: str
    kind: str
    institution: str
    door: str
    operation: str
    study_uid: str
    outcome: str
    purpose: str
    break_glass: bool


class BreakGlassGrant(BaseModel):
    id: int
    issuer: str
    patient_id: str
    reason: str
    started_at: str = Field(description=ISO)
    expires_at: str = Field(description=ISO)
    ended_at: str | None = Field(description=ISO)
    reviewed_at: str | None = Field(description=ISO)
    review_note: str


class History(BaseModel):
    accesses: list[Access]
    break_glass: list[BreakGlassGrant]


class Status(BaseModel):
    status: str


# -- study lists --------------------------------------------------------------------------
class PortalStudy(BaseModel):
    study_uid: str
    date: str = Field(description="StudyDate (YYYYMMDD, the sender's local date)")
    time: str
    description: str
    accession: str
    modalities: list[str]
    series: int
    instances: int
    patient_name: str
    patient_id: str
    issuer: str
    institution: str = Field(description="The institution that sent it")
    closed: bool = Field(description="That institution closed (a closure transfer)")


class InstitutionStudies(BaseModel):
    institution: str
    closed: bool
    studies: list[PortalStudy]


class MyStudies(BaseModel):
    institutions: list[InstitutionStudies]
    truncated: bool = Field(description="More studies exist than were listed")


class InboxStudy(PortalStudy):
    shared_until: str | None = Field(description=f"Share links only: {ISO}")
    reason: str = Field(description="consent, share-link or break-glass")


class Inbox(BaseModel):
    institution: str
    studies: list[InboxStudy]
    truncated: bool = Field(description="More studies exist than were listed")


# -- the viewer's study actions (dicomweb.downloads) -------------------------------------
class ForwardTarget(BaseModel):
    ae_title: str = Field(description="A DICOM peer of the caller's institution")
    description: str


class StudyActions(BaseModel):
    view: bool
    download: bool
    forward: list[ForwardTarget] = Field(description="Where 'send to our PACS' may go")


class InstitutionChoice(BaseModel):
    name: str
    description: str
    closed: bool
