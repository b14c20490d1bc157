"""Share links bound to a recipient institution: its staff reach the link's studies
through the one access decision (inbox, QIDO-RS, WADO-RS, the media zip) with the
link's rights and for its lifetime, without the token or access code; in-process."""

from __future__ import annotations

import datetime as dt

import pyotp
import pytest
from sqlalchemy import select, update

from consent.access import permitted_studies
from consent.accounts import enable_totp, set_password
from consent.models import AuditRecord, ShareLink
from consent.principals import Kind, Operation, Role, add_institution, add_user, peer_principal
from tests.dicomweb.test_portal import PASSWORD, Portal, portal, qido

pytestmark = [pytest.mark.fast, pytest.mark.production]
__all__ = ["portal"]


def staff_login(p: Portal, username: str, institution: str | None = None) -> dict[str, str]:
    if institution is not None:
        add_user(p.archive.db, username, Kind.STAFF, institution=institution, role=Role.RADIOLOGIST)
        set_password(p.archive.db, username, PASSWORD)
    totp = pyotp.parse_uri(enable_totp(p.archive.db, username))
    return p.login(username, totp.now())


def share(p: Portal, alice: dict[str, str], **rules: object) -> tuple[int, str]:
    body = {"study_uids": [p.a], "days": 2, "recipient_institution": "East", **rules}
    made = p.http.post("/api/me/links", json=body, headers=alice)
    assert made.status_code == 200, made.text
    return made.json()["id"], made.json()["token"]


def inbox(p: Portal, headers: dict[str, str]) -> list[dict]:
    answer = p.http.get("/api/inbox", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["studies"]


def set_link(p: Portal, link_id: int, **values: object) -> None:
    with p.archive.db.writing() as session:
        session.execute(update(ShareLink).where(ShareLink.id == link_id).values(**values))


def test_recipient_staff_read_shared_study_until_revoked(portal: Portal):
    add_institution(portal.archive.db, "West", issuer="WEST")
    alice = portal.login("alice")
    link_id, token = share(portal, alice)
    east = staff_login(portal, "east_rad")
    west = staff_login(portal, "west_rad", institution="West")
    metadata = f"/dicom-web/studies/{portal.a}/metadata"

    # East's staff: the inbox lists it with the link's expiry; DICOMweb reads it.
    listed = inbox(portal, east)
    assert [(s["study_uid"], s["reason"]) for s in listed] == [(portal.a, "share-link")]
    with portal.archive.db.reading() as session:
        expires = session.get(ShareLink, link_id).expires_at
    assert dt.datetime.fromisoformat(listed[0]["shared_until"]) == expires
    assert qido(portal, east) == {portal.a}
    assert portal.http.get(metadata, headers=east).status_code == 200
    # A view-only link gives no download; allowing it does.
    media = f"/api/studies/{portal.a}/media"
    assert portal.http.get(media, headers=east).status_code == 403
    set_link(portal, link_id, can_download=True)
    assert portal.http.get(media, headers=east).status_code == 200

    # Another institution's staff neither see it nor learn it exists.
    assert inbox(portal, west) == []
    assert qido(portal, west) == set()
    refused = portal.http.get(metadata, headers=west)
    missing = portal.http.get("/dicom-web/studies/1.2.826.0.1.99/metadata", headers=west)
    assert refused.status_code == missing.status_code == 404
    assert refused.json().get("error") == missing.json().get("error")

    # Reads under the grant are audited with the link's id as the reason, never the token.
    portal.http.app.state.gate.auditor.flush()
    with portal.archive.db.reading() as session:
        rows = session.execute(
            select(AuditRecord.operation, AuditRecord.outcome, AuditRecord.detail).where(
                AuditRecord.principal_name == "east_rad", AuditRecord.study_uid == portal.a
            )
        ).all()
    assert ("view", "allowed", f"share link {link_id}") in rows
    assert all(token not in detail for _op, _out, detail in rows)

    # The institution's DIMSE peers follow the same decision (C-FIND, C-MOVE/C-GET).
    db = portal.archive.db
    east_pacs = peer_principal(db, "EASTPACS", "East")
    west_pacs = peer_principal(db, "WESTPACS", "West")
    assert permitted_studies(db, east_pacs, Operation.DOWNLOAD, [portal.a]) == {portal.a}
    set_link(portal, link_id, can_download=False)
    assert permitted_studies(db, east_pacs, Operation.SEARCH, [portal.a]) == {portal.a}
    assert permitted_studies(db, east_pacs, Operation.DOWNLOAD, [portal.a]) == set()
    assert permitted_studies(db, west_pacs, Operation.SEARCH, [portal.a]) == set()

    # Revoking takes effect on the very next request.
    assert portal.http.delete(f"/api/me/links/{link_id}", headers=alice).status_code == 200
    assert inbox(portal, east) == []
    assert qido(portal, east) == set()
    assert portal.http.get(metadata, headers=east).status_code == 404
    assert permitted_studies(db, east_pacs, Operation.SEARCH, [portal.a]) == set()


@pytest.mark.parametrize(
    ("rules", "values"),
    [
        ({}, {"expires_at": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)}),  # expired
        ({"single_use": True}, {}),  # one holder's exchange, no standing grant
        ({"recipient_institution": None}, {}),  # bound to no institution
    ],
    ids=["expired", "single-use", "no-recipient"],
)
def test_links_that_grant_the_institution_nothing(portal: Portal, rules, values):
    link_id, _token = share(portal, portal.login("alice"), **rules)
    if values:
        set_link(portal, link_id, **values)
    east = staff_login(portal, "east_rad")
    assert inbox(portal, east) == []
    assert qido(portal, east) == set()
    metadata = f"/dicom-web/studies/{portal.a}/metadata"
    assert portal.http.get(metadata, headers=east).status_code == 404
