"""The viewer's study actions: the PDI zip download (also as a browser form) and "send
to our PACS" (a forwarding job) through the real app (in-process)."""

from __future__ import annotations

import datetime as dt
import io
import time
import zipfile
from pathlib import Path

import pydicom
import pyotp
import pytest
from pydicom.fileset import FileSet

from consent.accounts import enable_totp, set_password
from consent.audit import iter_records
from consent.principals import Kind, Role, add_user
from consent.tokens import refusal
from gateway.forward.jobs import get_job
from gateway.peers import PeerRegistry
from tests.dicomweb import test_portal
from tests.dicomweb.test_portal import PASSWORD, Portal
from tests.servers import storescp

portal = test_portal.portal  # the portal API's fixture: institutions, accounts, two studies

pytestmark = [pytest.mark.fast, pytest.mark.production]


def _link_holder(portal: Portal, *, can_download: bool) -> dict[str, str]:
    alice = portal.login("alice")
    body = {"study_uids": [portal.a], "can_download": can_download}
    token = portal.http.post("/api/me/links", json=body, headers=alice).json()["token"]
    opened = portal.http.post("/api/links/exchange", json={"token": token}).json()
    return {"Authorization": f"Bearer {opened['access_token']}"}


def _audited(portal: Portal, operation: str) -> list[tuple[str, str]]:
    portal.http.app.state.gate.auditor.flush()
    return [
        (r.study_uid, r.outcome)
        for r in iter_records(portal.archive.db)
        if r.operation == operation
    ]


def test_view_only_links_get_no_download(portal: Portal):
    holder = _link_holder(portal, can_download=False)
    actions = portal.http.get(f"/api/studies/{portal.a}/actions", headers=holder).json()
    assert actions == {"view": True, "download": False, "forward": []}
    refused = portal.http.get(f"/api/studies/{portal.a}/media", headers=holder)
    assert refused.status_code == 403 and "viewing, not downloading" in refused.json()["message"]
    token = holder["Authorization"].split()[1]
    form = portal.http.post(f"/api/studies/{portal.a}/media", data={"access_token": token})
    assert form.status_code == 403
    # Another patient's study is indistinguishable from a missing one.
    other = portal.http.get(f"/api/studies/{portal.b}/media", headers=holder)
    missing = portal.http.get("/api/studies/1.2.3.4/media", headers=holder)
    assert other.status_code == missing.status_code == 404
    assert other.json()["message"].replace(portal.b, "X") == missing.json()["message"].replace(
        "1.2.3.4", "X"
    )
    assert portal.http.get(f"/api/studies/{portal.b}/actions", headers=holder).json() == {
        "view": False,
        "download": False,
        "forward": [],
    }
    assert (portal.a, "denied") in _audited(portal, "download")


def test_download_is_a_pdi_zip(portal: Portal, tmp_path: Path):
    holder = _link_holder(portal, can_download=True)
    actions = portal.http.get(f"/api/studies/{portal.a}/actions", headers=holder).json()
    assert actions["download"] is True
    answer = portal.http.get(f"/api/studies/{portal.a}/media", headers=holder)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert "attachment" in answer.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(answer.content)) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "cd")
    assert names[0] == "DICOMDIR" and all(
        n in ("DICOMDIR", "README.TXT") or n.startswith("DICOM/") for n in names
    )
    fs = FileSet(pydicom.dcmread(tmp_path / "cd" / "DICOMDIR"))
    assert [i.StudyInstanceUID for i in fs] == [portal.a]
    # The browser's way: the token in a form body, never in the URL.
    token = holder["Authorization"].split()[1]
    form = portal.http.post(f"/api/studies/{portal.a}/media", data={"access_token": token})
    assert form.status_code == 200 and zipfile.ZipFile(io.BytesIO(form.content)).testzip() is None
    assert token not in str(form.url)
    assert portal.http.post(f"/api/studies/{portal.a}/media").status_code == 415
    nothing = portal.http.post(f"/api/studies/{portal.a}/media", data={"access_token": ""})
    assert nothing.status_code == 401
    bad = portal.http.post(f"/api/studies/{portal.a}/media", data={"access_token": "sbat_x"})
    assert bad.status_code == 401
    assert (portal.a, "allowed") in _audited(portal, "download")


@pytest.mark.integration
def test_staff_send_a_study_to_their_own_pacs(portal: Portal, tmp_path: Path):
    db = portal.archive.db
    add_user(db, "north_rad", Kind.STAFF, institution="North", role=Role.RADIOLOGIST)
    set_password(db, "north_rad", PASSWORD)
    north = portal.login("north_rad", pyotp.parse_uri(enable_totp(db, "north_rad")).now())
    with storescp(tmp_path, "NORTHPACS") as (port, received):
        registry = PeerRegistry(db)
        registry.add("NORTHPACS", "127.0.0.1", port, institution="North", description="PACS")
        registry.add("EASTPACS", "127.0.0.1", port, institution="East")
        actions = portal.http.get(f"/api/studies/{portal.a}/actions", headers=north).json()
        assert actions["download"] is True
        assert actions["forward"] == [{"ae_title": "NORTHPACS", "description": "PACS"}]
        # What the viewer's Send button posts: a forwarding job (dicomweb.custody).
        other = portal.http.post(
            "/api/jobs", json={"study_uid": portal.a, "peer": "EASTPACS"}, headers=north
        )
        assert other.status_code == 403
        sent = portal.http.post(
            "/api/jobs", json={"study_uid": portal.a, "peer": "NORTHPACS"}, headers=north
        )
        assert sent.status_code == 202, sent.text
        job = sent.json()["id"]
        deadline = time.monotonic() + 60
        while get_job(portal.archive, job).status != "done" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert get_job(portal.archive, job).status == "done"
        [file] = [p for p in received.rglob("*") if p.is_file()]
        assert pydicom.dcmread(file).StudyInstanceUID == portal.a
    # A view-only link holder, or a patient, is offered no peer.
    holder = _link_holder(portal, can_download=False)
    assert (
        portal.http.get(f"/api/studies/{portal.a}/actions", headers=holder).json()["forward"] == []
    )
    refused = portal.http.post(
        "/api/jobs", json={"study_uid": portal.a, "peer": "NORTHPACS"}, headers=holder
    )
    assert refused.status_code == 403
    assert any(op == portal.a for op, _ in _audited(portal, "forward"))


def test_a_refused_token_says_what_became_of_it(portal: Portal):
    """The viewer tells "revoked" and "expired" apart from an unknown token."""
    alice = portal.login("alice")
    body = {"study_uids": [portal.a]}
    created = portal.http.post("/api/me/links", json=body, headers=alice).json()
    token = portal.http.post("/api/links/exchange", json={"token": created["token"]}).json()
    holder = {"Authorization": f"Bearer {token['access_token']}"}
    assert portal.http.get(f"/api/studies/{portal.a}/actions", headers=holder).status_code == 200
    portal.http.delete(f"/api/me/links/{created['id']}", headers=alice)
    refused = portal.http.get("/dicom-web/studies", headers=holder)
    assert refused.status_code == 401 and refused.json()["error"] == "token-revoked"
    unknown = portal.http.get("/dicom-web/studies", headers={"Authorization": "Bearer sbat_x"})
    assert unknown.status_code == 401 and unknown.json()["error"] == "invalid-token"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    fresh = portal.http.post("/api/me/links", json=body, headers=alice).json()
    issued = portal.http.post("/api/links/exchange", json={"token": fresh["token"]}).json()
    assert refusal(portal.archive.db, issued["access_token"], later) == "expired"
    # (refusal is asked only after resolve refused a token: a valid one has no reason)
