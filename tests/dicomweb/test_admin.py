"""The operators' API (``/api/admin``) through the real app, and a peer it registers
talking DIMSE to a real served gateway (embedded, and production with a worker)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from consent.accounts import enable_totp, set_password
from consent.models import AuditRecord
from consent.principals import Kind, Role, add_institution, add_user
from dicomweb.app import create_app
from dicomweb.sessions import CSRF_HEADER
from gateway.archive import Archive
from gateway.config import Settings
from gateway.tasks.derived import PREPARE_SERIES
from tests.conftest import ServeStack
from tests.factories import ct_slice, uid
from tests.servers import running_gateway

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new long secret"
pytestmark = pytest.mark.production


@dataclass
class Admin:
    http: TestClient
    archive: Archive
    op_totp: pyotp.TOTP

    def login(self, username: str, code: str | None = None) -> dict[str, str]:
        body = {"username": username, "password": PASSWORD, "code": code}
        response = self.http.post("/api/session", json=body)
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def operator(self) -> dict[str, str]:
        return self.login("op", self.op_totp.now())

    def audit(self, door: str = "admin") -> list[AuditRecord]:
        self.http.app.state.gate.auditor.flush()
        with self.archive.db.reading() as session:
            return list(session.scalars(select(AuditRecord).where(AuditRecord.door == door)))


@pytest.fixture
def admin(settings: Settings, archive: Archive) -> Iterator[Admin]:
    db = archive.db
    add_institution(db, "North", issuer="NORTH")
    add_user(db, "op", Kind.OPERATOR)
    add_user(db, "alice", Kind.PATIENT)
    add_user(db, "north_rad", Kind.STAFF, institution="North", role=Role.RADIOLOGIST)
    for name in ("op", "alice", "north_rad"):
        set_password(db, name, PASSWORD)
    op_totp = pyotp.parse_uri(enable_totp(db, "op"))
    with TestClient(create_app(settings, archive)) as http:
        yield Admin(http, archive, op_totp)


@pytest.mark.fast
def test_operator_administers_institutions_peers_users(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    op = admin.operator()
    http = admin.http

    made = http.post("/api/admin/institutions", json={"name": "East", "issuer": "EAST"}, headers=op)
    assert made.status_code == 201, made.text
    names = [i["name"] for i in http.get("/api/admin/institutions", headers=op).json()]
    assert names == ["East", "North"]
    again = http.post("/api/admin/institutions", json={"name": "East"}, headers=op)
    assert again.status_code == 409 and "already exists" in again.json()["message"]

    peer = {"ae_title": "EASTPACS", "host": "127.0.0.1", "port": 11112, "institution": "East"}
    assert http.post("/api/admin/peers", json=peer, headers=op).status_code == 201
    assert http.post("/api/admin/peers", json=peer, headers=op).status_code == 409
    bad = http.post(
        "/api/admin/peers", json={**peer, "ae_title": "X", "tls_ca_file": "/x"}, headers=op
    )
    assert bad.status_code == 400 and "need --tls" in bad.json()["message"]
    listed = http.get("/api/admin/peers", headers=op).json()
    assert [(p["ae_title"], p["institution"], p["tls"]) for p in listed] == [
        ("EASTPACS", "East", False)
    ]

    user = {
        "username": "east_clerk",
        "kind": "staff",
        "institution": "East",
        "role": "clerk",
        "password": NEW_PASSWORD,
    }
    created = http.post("/api/admin/users", json=user, headers=op)
    assert created.status_code == 201, created.text
    assert created.json()["has_password"] and not created.json()["has_totp"]
    enrolled = http.post("/api/admin/users/east_clerk/totp", headers=op)
    assert enrolled.status_code == 200
    clerk_totp = pyotp.parse_uri(enrolled.json()["otpauth_uri"])
    signed = http.post(
        "/api/session",
        json={"username": "east_clerk", "password": NEW_PASSWORD, "code": clerk_totp.now()},
    )
    assert signed.status_code == 200
    accounts = http.get("/api/admin/users", headers=op)
    clerk = next(u for u in accounts.json() if u["username"] == "east_clerk")
    assert clerk["institution"] == "East" and clerk["role"] == "clerk" and clerk["has_totp"]
    assert http.post("/api/admin/users/east_clerk/disable", headers=op).status_code == 200
    refused = http.post(
        "/api/session",
        json={"username": "east_clerk", "password": NEW_PASSWORD, "code": clerk_totp.now()},
    )
    assert refused.status_code == 401

    assert http.post("/api/admin/institutions/East/disable", headers=op).status_code == 200
    east = next(
        i for i in http.get("/api/admin/institutions", headers=op).json() if i["name"] == "East"
    )
    assert east["disabled"]
    assert http.delete("/api/admin/peers/EASTPACS", headers=op).status_code == 200
    assert http.delete("/api/admin/peers/EASTPACS", headers=op).status_code == 404

    # No password, hash or TOTP secret in any answer but the enrollment, nor in the logs.
    secret = clerk_totp.secret
    for response in (created, accounts, signed):
        assert NEW_PASSWORD not in response.text and secret not in response.text
        assert "argon2" not in response.text
    assert NEW_PASSWORD not in caplog.text and secret not in caplog.text

    records = admin.audit()
    assert {r.principal_name for r in records} == {"op"}
    assert {r.outcome for r in records} == {"allowed"}
    operations = {r.operation for r in records}
    assert {
        "create_institution",
        "register_peer",
        "create_user",
        "reset_totp",
        "disable_user",
        "disable_institution",
        "remove_peer",
        "list_accounts",
    } <= operations
    assert any(r.detail == "peer EASTPACS at 127.0.0.1:11112" for r in records)


@pytest.mark.fast
def test_operator_manages_dicomweb_clients(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    http = admin.http
    op = admin.operator()
    clients = "/api/admin/institutions/North/clients"
    assert http.get(clients, headers=op).json() == []

    made = http.post(clients, json={"client_id": "north-viewer", "description": "PACS"}, headers=op)
    assert made.status_code == 201, made.text
    secret = made.json()["client_secret"]
    assert made.json()["client_id"] == "north-viewer" and made.json()["institution"] == "North"
    again = http.post(clients, json={"client_id": "north-viewer"}, headers=op)
    assert again.status_code == 409 and "already exists" in again.json()["message"]
    elsewhere = http.post(
        "/api/admin/institutions/Nowhere/clients", json={"client_id": "x"}, headers=op
    )
    assert elsewhere.status_code == 400 and "no institution" in elsewhere.json()["message"]

    listed = http.get(clients, headers=op)
    assert [(c["client_id"], c["description"], c["disabled"]) for c in listed.json()] == [
        ("north-viewer", "PACS", False)
    ]
    assert secret not in listed.text and "secret" not in listed.text
    assert "scrypt" not in listed.text and "$" not in listed.text
    institutions = http.get("/api/admin/institutions", headers=op).json()
    assert next(i for i in institutions if i["name"] == "North")["clients"] == ["north-viewer"]

    # The credentials work, and a token got with them works until the client is disabled.
    form = {"grant_type": "client_credentials", "client_id": "north-viewer"}
    issued = http.post("/api/token", data={**form, "client_secret": secret})
    assert issued.status_code == 200, issued.text
    north = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    assert http.get("/dicom-web/studies", headers=north).status_code in (200, 204)
    disabled = http.post(f"{clients}/north-viewer/disable", headers=op)
    assert disabled.status_code == 200 and disabled.json() == {"status": "disabled"}
    assert http.get("/dicom-web/studies", headers=north).status_code == 401
    refused = http.post("/api/token", data={**form, "client_secret": secret})
    assert refused.status_code == 401 and refused.json() == {"error": "invalid_client"}
    assert http.get(clients, headers=op).json()[0]["disabled"] is True
    missing = http.post(f"{clients}/nobody/disable", headers=op)
    assert missing.status_code == 404

    assert secret not in caplog.text
    records = admin.audit()
    assert {r.operation for r in records} >= {
        "list_institution_clients",
        "create_client",
        "disable_institution_client",
    }
    assert any(r.detail == "client north-viewer of North" for r in records)
    assert all(secret not in (r.detail or "") for r in records)


@pytest.mark.fast
def test_only_operators(admin: Admin) -> None:
    http = admin.http
    assert http.get("/api/admin/users").status_code == 401
    patient = admin.login("alice")
    rad_code = pyotp.parse_uri(enable_totp(admin.archive.db, "north_rad")).now()
    staff = admin.login("north_rad", rad_code)
    for headers in (patient, staff):
        assert http.get("/api/admin/users", headers=headers).status_code == 403
        assert http.get("/api/admin/peers", headers=headers).status_code == 403
        new = {"ae_title": "EVIL", "host": "127.0.0.1", "port": 104}
        assert http.post("/api/admin/peers", json=new, headers=headers).status_code == 403
        user = {"username": "mallory", "kind": "operator"}
        assert http.post("/api/admin/users", json=user, headers=headers).status_code == 403
        clients = "/api/admin/institutions/North/clients"
        assert http.get(clients, headers=headers).status_code == 403
        made = http.post(clients, json={"client_id": "mallory"}, headers=headers)
        assert made.status_code == 403 and "client_secret" not in made.text
        assert http.post(f"{clients}/x/disable", headers=headers).status_code == 403
    assert http.get("/api/admin/peers", headers=admin.operator()).json() == []
    denied = [r for r in admin.audit() if r.outcome == "denied"]
    assert {r.principal_name for r in denied} == {"alice", "north_rad"}
    assert {r.operation for r in denied} >= {"register_peer", "create_user", "create_client"}
    assert (
        admin.http.get("/api/admin/institutions/North/clients", headers=admin.operator()).json()
        == []
    )


@pytest.mark.fast
def test_cookie_session_needs_csrf(admin: Admin) -> None:
    http = admin.http
    signed = http.post(
        "/api/session/browser",
        json={"username": "op", "password": PASSWORD, "code": admin.op_totp.now()},
    )
    assert signed.status_code == 200, signed.text
    body = {"name": "West"}
    assert http.post("/api/admin/institutions", json=body).status_code == 403
    csrf = {CSRF_HEADER: signed.json()["csrf"]}
    assert http.post("/api/admin/institutions", json=body, headers=csrf).status_code == 201


@pytest.mark.fast
def test_openapi_documents_the_admin_api(admin: Admin) -> None:
    spec = admin.http.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/api/admin/institutions",
        "/api/admin/institutions/{name}/disable",
        "/api/admin/peers",
        "/api/admin/peers/{ae_title}",
        "/api/admin/users",
        "/api/admin/users/{username}/disable",
        "/api/admin/users/{username}/totp",
        "/api/admin/institutions/{name}/clients",
        "/api/admin/institutions/{name}/clients/{client_id}/disable",
    ):
        assert path in paths, path
    ok = paths["/api/admin/users"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["items"]["$ref"].endswith("/UserView")
    assert "password_hash" not in str(spec["components"]["schemas"]["UserView"])
    client_fields = spec["components"]["schemas"]["ClientView"]["properties"]
    assert not [name for name in client_fields if "secret" in name or "hash" in name]


@pytest.mark.integration
def test_peer_registered_over_the_api_can_echo_and_store(
    tmp_path: Path, serve_stack: ServeStack
) -> None:
    with running_gateway(tmp_path, serve_stack.env) as gw:
        # The operator is made in process (the CLI's `users` commands are tested in
        # tests/consent/test_cli.py): three CLI starts less.
        archive = Archive.open(serve_stack.settings(gw.data_dir), migrate_schema=True)
        try:
            add_user(archive.db, "op", Kind.OPERATOR)
            set_password(archive.db, "op", PASSWORD)
            uri = enable_totp(archive.db, "op")
        finally:
            archive.close()
        gw.start()
        ae = AE(ae_title="EASTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        ae.add_requested_context(Verification)
        unknown = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
        assert not unknown.is_established  # not a peer yet
        base = f"http://127.0.0.1:{gw.http_port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            body = {"username": "op", "password": PASSWORD, "code": pyotp.parse_uri(uri).now()}
            token = http.post("/api/session", json=body).json()["access_token"]
            op = {"Authorization": f"Bearer {token}"}
            made = http.post("/api/admin/institutions", json={"name": "East"}, headers=op)
            assert made.status_code == 201, made.text
            peer = {"ae_title": "EASTSCU", "host": "127.0.0.1", "port": 104, "institution": "East"}
            assert http.post("/api/admin/peers", json=peer, headers=op).status_code == 201

        ds = ct_slice(patient_id="E1", issuer="EAST", study_uid=uid(), rows=4, columns=4)
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        deadline = time.monotonic() + 15
        while True:  # the node may still hold "unknown" in its few-second registry cache
            assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
            if assoc.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert assoc.is_established, gw.log_text()
        try:
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert gw.stop() == 0, gw.log_text()
    serve_stack.wait_for_task(PREPARE_SERIES)  # production: the worker took the stored series
