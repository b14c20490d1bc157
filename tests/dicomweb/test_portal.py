"""The portal API and the share-link landing page, through the real app (in-process)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest
from fastapi.testclient import TestClient

from consent.accounts import enable_totp, set_password
from consent.consents import to_fhir
from consent.patients import link_patient
from consent.principals import (
    Kind,
    Role,
    add_dicomweb_client,
    add_institution,
    add_user,
    user_principal,
)
from dicomweb.app import create_app
from gateway.archive import Archive, Source
from gateway.config import Settings
from tests.factories import ct_slice, uid, write

pytestmark = [pytest.mark.fast, pytest.mark.production]

PASSWORD = "correct horse battery"


@dataclass
class Portal:
    http: TestClient
    archive: Archive
    settings: Settings
    a: str  # Alice's study, sent by North
    b: str  # Bob's study, sent by North
    client_secret: str

    def login(self, username: str, code: str | None = None) -> dict[str, str]:
        body = {"username": username, "password": PASSWORD, "code": code}
        response = self.http.post("/api/session", json=body)
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
def portal(settings: Settings, archive: Archive, tmp_path: Path) -> Iterator[Portal]:
    studies = []
    for n, pid in enumerate(["P1", "P2"]):
        ds = ct_slice(patient_id=pid, issuer="NORTH", study_uid=uid(), rows=4, columns=4)
        archive.ingest_file(
            write(ds, tmp_path / f"{n}.dcm"), Source(door="test", institution="North")
        )
        studies.append(ds.StudyInstanceUID)
    db = archive.db
    add_institution(db, "North", issuer="NORTH")
    add_institution(db, "East", issuer="EAST")
    _id, secret = add_dicomweb_client(db, "North", "north-viewer")
    alice = add_user(db, "alice", Kind.PATIENT)
    op = add_user(db, "op", Kind.OPERATOR)
    add_user(db, "east_rad", Kind.STAFF, institution="East", role=Role.RADIOLOGIST)
    for name in ("alice", "op", "east_rad"):
        set_password(db, name, PASSWORD)
    settings.viewer_url = "https://viewer.example.org/viewer"
    with TestClient(create_app(settings, archive)) as http:
        link_patient(
            db,
            http.app.state.gate.auditor,
            account_id=alice,
            issuer="NORTH",
            patient_id="P1",
            by=user_principal(db, op),
            evidence="identity card checked at the desk",
        )
        yield Portal(http, archive, settings, studies[0], studies[1], secret)


def qido(portal: Portal, headers: dict[str, str]) -> set[str]:
    response = portal.http.get("/dicom-web/studies", headers=headers)
    if response.status_code == 204:
        return set()
    assert response.status_code == 200, response.text
    return {s["0020000D"]["Value"][0] for s in response.json()}


def test_share_link_round_trip_through_the_api(portal: Portal):
    alice = portal.login("alice")
    assert qido(portal, alice) == {portal.a}  # a patient sees their own studies
    created = portal.http.post(
        "/api/me/links", json={"study_uids": [portal.a], "single_use": True}, headers=alice
    )
    assert created.status_code == 200, created.text
    token = created.json()["token"]
    # The token rides in the fragment of the viewer's share page, never in a query.
    assert created.json()["url"].endswith(f"/viewer/share#{token}")
    assert created.headers["referrer-policy"] == "no-referrer"
    # No server-side landing page: the share token is only ever POSTed.
    assert portal.http.get("/api/s").status_code == 404
    for _ in range(2):  # describing (what link scanners and the page do) consumes nothing
        described = portal.http.post("/api/links/describe", json={"token": token})
        assert described.json()["status"] == "usable"
    # Exchange: a short-lived access token, scoped to the link's study.
    opened = portal.http.post("/api/links/exchange", json={"token": token})
    assert opened.status_code == 200, opened.text
    answer = opened.json()
    assert answer["study_uids"] == [portal.a]
    assert "token=sbat_" in answer["viewer"] and token not in answer["viewer"]
    holder = {"Authorization": f"Bearer {answer['access_token']}"}
    assert qido(portal, holder) == {portal.a}
    again = portal.http.post("/api/links/exchange", json={"token": token})
    assert again.status_code == 410 and again.json()["error"] == "used"
    # Revocation: the holder's token stops on the next request.
    [listed] = portal.http.get("/api/me/links", headers=alice).json()
    revoked = portal.http.delete(f"/api/me/links/{listed['id']}", headers=alice)
    assert "cannot be recalled" in revoked.json()["notice"]
    assert portal.http.get("/dicom-web/studies", headers=holder).status_code == 401


def test_access_code_answers(portal: Portal):
    alice = portal.login("alice")
    created = portal.http.post(
        "/api/me/links", json={"study_uids": [portal.a], "access_code": "4711"}, headers=alice
    ).json()
    wrong = portal.http.post(
        "/api/links/exchange", json={"token": created["token"], "access_code": "1234"}
    )
    assert wrong.status_code == 401
    assert wrong.json()["remaining"] == portal.settings.access_code_max_failures - 1
    right = portal.http.post(
        "/api/links/exchange", json={"token": created["token"], "access_code": "4711"}
    )
    assert right.status_code == 200
    unknown = portal.http.post("/api/links/exchange", json={"token": "sbl_" + "A" * 43})
    assert unknown.status_code == 404


def test_patients_cannot_share_what_is_not_theirs(portal: Portal):
    alice = portal.login("alice")
    refused = portal.http.post("/api/me/links", json={"study_uids": [portal.b]}, headers=alice)
    assert refused.status_code == 400 and "your own studies" in refused.json()["message"]
    assert portal.http.get("/api/me/links").status_code == 401


def test_client_credentials(portal: Portal):
    form = {
        "grant_type": "client_credentials",
        "client_id": "north-viewer",
        "client_secret": portal.client_secret,
    }
    issued = portal.http.post("/api/token", data=form)
    assert issued.status_code == 200 and issued.json()["token_type"] == "Bearer"
    north = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    assert qido(portal, north) == {portal.a, portal.b}
    bad = portal.http.post("/api/token", data={**form, "client_secret": "nope"})
    assert bad.status_code == 401 and bad.json() == {"error": "invalid_client"}


def test_staff_need_a_second_factor(portal: Portal):
    body = {"username": "east_rad", "password": PASSWORD}
    assert portal.http.post("/api/session", json=body).status_code == 401
    uri = enable_totp(portal.archive.db, "east_rad")
    totp = pyotp.parse_uri(uri)
    assert portal.http.post("/api/session", json={**body, "code": "000000"}).status_code == 401
    headers = portal.login("east_rad", totp.now())
    assert qido(portal, headers) == set()  # East sent nothing and has no consent
    wrong = portal.http.post("/api/session", json={**body, "password": "x" * 20})
    assert wrong.status_code == 401 and wrong.json()["message"] == "sign-in failed"


def test_consent_and_request_flow(portal: Portal):
    east_code = pyotp.parse_uri(enable_totp(portal.archive.db, "east_rad"))
    east = portal.login("east_rad", east_code.now())
    asked = portal.http.post(
        "/api/requests",
        json={"issuer": "NORTH", "patient_id": "P1", "reason": "second opinion"},
        headers=east,
    )
    assert asked.status_code == 200, asked.text
    alice = portal.login("alice")
    [pending] = portal.http.get("/api/me/requests", headers=alice).json()
    assert pending["institution"] == "East" and pending["reason"] == "second opinion"
    decided = portal.http.post(f"/api/me/requests/{pending['id']}/approve", headers=alice)
    assert decided.json()["consent"] is not None
    assert qido(portal, east) == {portal.a}
    [fhir] = portal.http.get("/api/me/consents", headers=alice).json()
    assert fhir["resourceType"] == "Consent" and fhir["provision"]["type"] == "permit"
    # The answer is the resource as made, whole (its OpenAPI model drops nothing).
    assert fhir == to_fhir(portal.archive.db, int(fhir["id"]))
    revoked = portal.http.delete(f"/api/me/consents/{fhir['id']}", headers=alice).json()
    assert revoked["status"] == "inactive"
    assert revoked == to_fhir(portal.archive.db, int(fhir["id"]))
    assert qido(portal, east) == set()
    # History: East's searches are not study accesses; its view of A would be.
    portal.http.get(f"/dicom-web/studies/{portal.a}/metadata", headers=east)
    history = portal.http.get("/api/me/history", headers=alice).json()
    assert {(h["who"], h["outcome"]) for h in history["accesses"]} >= {("east_rad", "denied")}


def test_break_glass_through_the_api(portal: Portal):
    east_code = pyotp.parse_uri(enable_totp(portal.archive.db, "east_rad"))
    east = portal.login("east_rad", east_code.now())
    short = {"issuer": "NORTH", "patient_id": "P1", "reason": "help"}
    assert portal.http.post("/api/break-glass", json=short, headers=east).status_code == 400
    body = {**short, "reason": "unconscious patient in the emergency room", "minutes": 30}
    grant = portal.http.post("/api/break-glass", json=body, headers=east)
    assert grant.status_code == 200, grant.text
    assert qido(portal, east) == {portal.a}
    alice = portal.login("alice")
    history = portal.http.get("/api/me/history", headers=alice).json()
    assert [g["reason"] for g in history["break_glass"]] == [body["reason"]]
    op_code = pyotp.parse_uri(enable_totp(portal.archive.db, "op"))
    op = portal.login("op", op_code.now())
    [pending] = portal.http.get("/api/break-glass", headers=op).json()
    reviewed = portal.http.post(
        f"/api/break-glass/{pending['id']}/review", json={"note": "justified"}, headers=op
    )
    assert reviewed.status_code == 200
    assert portal.http.get("/api/break-glass", headers=op).json() == []
    assert portal.http.get("/api/break-glass", headers=alice).status_code == 403


def test_tokens_stay_out_of_the_logs(portal: Portal):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        from consent import redact

        redact.install()
        alice = portal.login("alice")
        token = portal.http.post(
            "/api/me/links", json={"study_uids": [portal.a]}, headers=alice
        ).json()["token"]
        access = portal.http.post("/api/links/exchange", json={"token": token}).json()
        portal.http.get(
            "/dicom-web/studies", headers={"Authorization": "Bearer " + access["access_token"]}
        )
        logging.getLogger("test").info("opened %s/viewer/share#%s", "https://x", token)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    text = stream.getvalue()
    assert token not in text and access["access_token"] not in text
    assert alice["Authorization"].split()[1] not in text


def test_operators_link_a_guardian_who_then_sees_the_wards_study(portal: Portal):
    import datetime as dt

    from sqlalchemy import select

    from consent.models import User
    from consent.tokens import issue_for_user

    db = portal.archive.db
    add_user(db, "mom", Kind.PATIENT)
    set_password(db, "mom", PASSWORD)
    with db.reading() as session:
        op_id = session.scalar(select(User.id).where(User.username == "op"))
    op = {"Authorization": "Bearer " + issue_for_user(db, op_id, dt.timedelta(hours=1)).token}
    body = {
        "username": "mom",
        "issuer": "NORTH",
        "patient_id": "P2",  # Bob, a minor
        "evidence": "family register certificate checked by the operator",
        "relation": "guardian",
        "ends_at": "2099-01-01T00:00:00Z",
    }
    alice = portal.login("alice")
    assert portal.http.post("/api/patient-links", json=body, headers=alice).status_code == 403
    assert portal.http.post("/api/patient-links", json=body).status_code == 401
    unknown = portal.http.post("/api/patient-links", json={**body, "username": "x"}, headers=op)
    assert unknown.status_code == 404
    made = portal.http.post("/api/patient-links", json=body, headers=op)
    assert made.status_code == 200, made.text
    assert made.json()["relation"] == "guardian"
    mom = portal.login("mom")
    assert qido(portal, mom) == {portal.b}


def _opened_link(portal: Portal) -> tuple[str, dict[str, str]]:
    alice = portal.login("alice")
    token = portal.http.post(
        "/api/me/links", json={"study_uids": [portal.a]}, headers=alice
    ).json()["token"]
    opened = portal.http.post("/api/links/exchange", json={"token": token}).json()
    return token, {"Authorization": f"Bearer {opened['access_token']}"}


def test_a_share_exports_as_a_fhir_bundle(portal: Portal):
    from fhir.resources.R4B.bundle import Bundle

    share_token, holder = _opened_link(portal)
    response = portal.http.get("/api/manifest", headers=holder)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.headers["referrer-policy"] == "no-referrer"
    bundle = Bundle.model_validate(response.json())  # a valid FHIR R4 Bundle
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert sorted(kinds) == ["Endpoint", "ImagingStudy", "Patient"]
    endpoint = next(
        e.resource for e in bundle.entry if e.resource.get_resource_type() == "Endpoint"
    )
    assert (
        endpoint.address.endswith("/dicom-web") and endpoint.connectionType.code == "dicom-wado-rs"
    )
    study = next(
        e.resource for e in bundle.entry if e.resource.get_resource_type() == "ImagingStudy"
    )
    assert study.identifier[0].value == f"urn:oid:{portal.a}"
    assert study.numberOfSeries == 1 and study.numberOfInstances == 1
    # No credential travels in the manifest.
    assert "sbl_" not in response.text and "sbat_" not in response.text
    assert share_token not in response.text
    # Only what the caller may view: another study answers like a missing one.
    other = portal.http.get("/api/manifest", params={"study": portal.b}, headers=holder)
    nothing = portal.http.get("/api/manifest", params={"study": "1.2.3.4"}, headers=holder)
    assert other.status_code == nothing.status_code == 404
    assert portal.http.get("/api/manifest").status_code == 401
    alice = portal.login("alice")
    mine = portal.http.get("/api/manifest", params={"study": portal.a}, headers=alice)
    assert mine.status_code == 200


def test_an_iid_launch_url_carries_a_second_short_lived_token(portal: Portal):
    from urllib.parse import parse_qs, urlsplit

    share_token, holder = _opened_link(portal)
    portal.settings.iid_viewer_url = ""
    assert portal.http.post("/api/links/launch", headers=holder).status_code == 404
    portal.settings.iid_viewer_url = "https://viewer.example.org/IHEInvokeImageDisplay"
    alice = portal.login("alice")
    assert portal.http.post("/api/links/launch", headers=alice).status_code == 400
    launched = portal.http.post("/api/links/launch", headers=holder)
    assert launched.status_code == 200, launched.text
    url = urlsplit(launched.json()["url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == portal.settings.iid_viewer_url
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query["requestType"] == "STUDY" and query["studyUID"] == portal.a
    token = query["access_token"]
    assert token.startswith("sbat_") and token != holder["Authorization"].split()[1]
    assert share_token not in launched.text
    # It is a real access token of the link, scoped like it, and dies with it.
    assert qido(portal, {"Authorization": f"Bearer {token}"}) == {portal.a}
    link_id = portal.http.get("/api/me/links", headers=alice).json()[0]["id"]
    portal.http.delete(f"/api/me/links/{link_id}", headers=alice)
    gone = portal.http.get("/dicom-web/studies", headers={"Authorization": f"Bearer {token}"})
    assert gone.status_code == 401
