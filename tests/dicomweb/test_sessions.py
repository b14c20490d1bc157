"""Browser sessions of the portal pages and their study lists (cookie, CSRF, viewer
token, a patient's studies by institution, an institution's inbox), in-process."""

from __future__ import annotations

import datetime as dt

import pyotp
import pytest

from consent.accounts import enable_totp
from dicomweb.sessions import COOKIE, CSRF_HEADER
from gateway.archive import Source
from gateway.transfers.records import create_transfer
from tests.dicomweb.test_portal import PASSWORD, Portal, portal, qido
from tests.factories import ct_slice, uid, write

pytestmark = [pytest.mark.fast, pytest.mark.production]
__all__ = ["portal"]  # the fixture, shared with test_portal


def browser_login(p: Portal, username: str, code: str | None = None) -> dict[str, str]:
    body = {"username": username, "password": PASSWORD, "code": code}
    answer = p.http.post("/api/session/browser", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_cookie_session_with_csrf(portal: Portal):
    answer = portal.http.post(
        "/api/session/browser", json={"username": "alice", "password": PASSWORD}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "sbat_" not in answer.text  # the page's scripts never see the session token
    assert body["account"]["kind"] == "patient" and body["account"]["username"] == "alice"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=sbat_")
    for flag in ("HttpOnly", "SameSite=strict", "Path=/api"):
        assert flag.lower() in cookie.lower()
    assert "secure" not in cookie.lower()  # plain HTTP here; HTTPS adds Secure
    assert answer.headers["referrer-policy"] == "no-referrer"
    # Reads with the cookie alone; state changes need the CSRF token too.
    assert portal.http.get("/api/me/links").status_code == 200
    new = {"study_uids": [portal.a], "days": 1}
    refused = portal.http.post("/api/me/links", json=new)
    assert refused.status_code == 403 and refused.json()["error"] == "csrf"
    wrong = portal.http.post("/api/me/links", json=new, headers={CSRF_HEADER: "0" * 64})
    assert wrong.status_code == 403
    made = portal.http.post("/api/me/links", json=new, headers={CSRF_HEADER: body["csrf"]})
    assert made.status_code == 200, made.text
    link = made.json()
    assert link["url"].endswith("#" + link["token"])
    assert link["qr_svg"].startswith("<svg") and link["token"] not in link["qr_svg"]
    # A page reload asks who it is and gets the same CSRF token.
    again = portal.http.get("/api/session/browser")
    assert again.status_code == 200 and again.json()["csrf"] == body["csrf"]
    # The viewer's own short-lived Bearer token sees what the patient sees.
    viewer = portal.http.post("/api/session/viewer-token", headers={CSRF_HEADER: body["csrf"]})
    assert viewer.status_code == 200, viewer.text
    session_ends = dt.datetime.fromisoformat(body["expires_at"])
    viewer_ends = dt.datetime.fromisoformat(viewer.json()["expires_at"])
    assert viewer_ends <= session_ends and viewer_ends - dt.datetime.now(dt.UTC) < dt.timedelta(
        minutes=16
    )
    bearer = {"Authorization": f"Bearer {viewer.json()['access_token']}"}
    assert qido(portal, bearer) == {portal.a}
    # DICOMweb never takes the cookie.
    assert portal.http.get("/dicom-web/studies").status_code == 401
    # Signing out revokes the session's token.
    out = portal.http.delete("/api/session/browser", headers={CSRF_HEADER: body["csrf"]})
    assert out.status_code == 200
    portal.http.cookies.set(COOKIE, cookie.split(";")[0].split("=", 1)[1], path="/api")
    ended = portal.http.get("/api/me/links")
    assert ended.status_code == 401 and ended.json()["error"] == "session-ended"


def test_staff_sign_in_in_two_steps(portal: Portal):
    body = {"username": "east_rad", "password": PASSWORD}
    totp = pyotp.parse_uri(enable_totp(portal.archive.db, "east_rad"))
    step1 = portal.http.post("/api/session/browser", json=body)
    assert step1.status_code == 401 and step1.json()["error"] == "code-required"
    assert "set-cookie" not in step1.headers
    bad = portal.http.post("/api/session/browser", json={**body, "code": "000000"})
    assert bad.status_code == 401 and bad.json()["error"] == "sign-in-failed"
    wrong = portal.http.post("/api/session/browser", json={**body, "password": "x" * 20})
    assert wrong.json()["error"] == "sign-in-failed"  # a wrong password asks for no code
    ok = browser_login(portal, "east_rad", totp.now())
    assert ok["account"] == {
        "username": "east_rad",
        "display_name": "east_rad",
        "kind": "staff",
        "institution": "East",
        "role": "radiologist",
    }


def test_studies_by_institution_with_closed_clinics(portal: Portal, tmp_path):
    # Alice (NORTH P1) also has a study from a clinic that closed and handed over.
    ds = ct_slice(patient_id="P1", issuer="NORTH", study_uid=uid(), rows=4, columns=4)
    portal.archive.ingest_file(
        write(ds, tmp_path / "old.dcm"), Source(door="test", institution="Old Clinic")
    )
    create_transfer(portal.archive.db, institution="Old Clinic", reason="closure", issuer="NORTH")
    browser_login(portal, "alice")
    listed = portal.http.get("/api/me/studies")
    assert listed.status_code == 200, listed.text
    groups = listed.json()["institutions"]
    assert [(g["institution"], g["closed"]) for g in groups] == [
        ("North", False),
        ("Old Clinic", True),
    ]
    north = groups[0]["studies"]
    assert [s["study_uid"] for s in north] == [portal.a]  # Bob's study is not Alice's
    assert north[0]["modalities"] == ["CT"] and north[0]["instances"] == 1
    assert groups[1]["studies"][0]["study_uid"] == ds.StudyInstanceUID
    insts = portal.http.get("/api/institutions").json()
    assert {"name": "East", "description": "", "closed": False} in insts


def test_inbox_lists_consented_studies_not_own(portal: Portal, tmp_path):
    # East sent a study of its own; Alice consents to East for her North study.
    ds = ct_slice(patient_id="E9", issuer="EAST", study_uid=uid(), rows=4, columns=4)
    portal.archive.ingest_file(
        write(ds, tmp_path / "e.dcm"), Source(door="test", institution="East")
    )
    alice = portal.login("alice")
    granted = portal.http.post("/api/me/consents", json={"institution": "East"}, headers=alice)
    assert granted.status_code == 200, granted.text
    totp = pyotp.parse_uri(enable_totp(portal.archive.db, "east_rad"))
    browser_login(portal, "east_rad", totp.now())
    inbox = portal.http.get("/api/inbox")
    assert inbox.status_code == 200, inbox.text
    assert inbox.json()["institution"] == "East"
    studies = inbox.json()["studies"]
    assert [(s["study_uid"], s["reason"], s["institution"]) for s in studies] == [
        (portal.a, "consent", "North")
    ]
    # Patients have no inbox; staff have no "my studies".
    assert portal.http.get("/api/me/studies").status_code == 403
    portal.http.cookies.clear()
    browser_login(portal, "alice")
    assert portal.http.get("/api/inbox").status_code == 403
