"""``/api/transfers`` and ``/api/jobs`` (both index backends): operators and the
institutions' staff only, each call audited; forwarding through the API is the same
access decision as on the CLI and runs as a task to a real PACS (dcmtk storescp).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from consent.models import AuditRecord
from consent.principals import Kind, Role, add_institution, add_user
from consent.tokens import issue_for_user
from gateway.peers import PeerRegistry
from gateway.transfers.records import create_transfer
from tests.dicomweb.conftest import TEST_INSTITUTION, LiveServer
from tests.factories import ct_slice, uid
from tests.servers import free_port, storescp

pytestmark = [pytest.mark.integration, pytest.mark.production]


def _token(server: LiveServer, username: str, kind: Kind, institution: str | None = None) -> str:
    user_id = add_user(
        server.archive.db,
        username,
        kind,
        institution=institution,
        role=Role.CLERK if kind is Kind.STAFF else None,
    )
    return issue_for_user(server.archive.db, user_id, dt.timedelta(hours=1)).token


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_transfers_and_jobs_api(live_server: LiveServer, tmp_path: Path) -> None:
    server, db = live_server, live_server.archive.db
    study = uid()
    server.ingest(*(ct_slice(study_uid=study, instance_number=i) for i in (1, 2)))
    add_institution(db, "Lac")
    op = _token(server, "op", Kind.OPERATOR)
    clerk = _token(server, "clerk", Kind.STAFF, TEST_INSTITUTION)
    lac = _token(server, "lacstaff", Kind.STAFF, "Lac")
    patient = _token(server, "pat", Kind.PATIENT)
    theirs = create_transfer(db, institution="Lac", reason="closure", issuer="LAC").id
    ours = create_transfer(db, institution=TEST_INSTITUTION, reason="closure", issuer="TH").id
    api = f"{server.url}/api"

    with httpx.Client(timeout=30) as http:
        # Institutions' machines, patients and anonymous callers are refused.
        assert http.get(f"{api}/transfers").status_code == 403  # the DICOMweb client
        assert http.get(f"{api}/jobs", headers=_as(patient)).status_code == 403
        anon = http.get(f"{api}/transfers", headers={"X-Test-Anonymous": "1"})
        assert anon.status_code == 401

        listed = http.get(f"{api}/transfers", headers=_as(op)).json()
        assert [t["id"] for t in listed] == [theirs, ours]
        mine = http.get(f"{api}/transfers", headers=_as(clerk)).json()
        assert [t["institution"] for t in mine] == [TEST_INSTITUTION]
        assert http.get(f"{api}/transfers/{theirs}", headers=_as(clerk)).status_code == 404
        shown = http.get(f"{api}/transfers/{ours}", headers=_as(clerk)).json()
        assert shown["status"] == "open" and shown["issuer"] == "TH"
        answer = http.get(f"{api}/transfers/{ours}/report", headers=_as(clerk))
        assert answer.headers["cache-control"] == "no-store"
        report = answer.json()
        assert report["transfer_id"] == ours and report["commitments"] == []
        assert http.get(f"{api}/transfers/999/report", headers=_as(op)).status_code == 404

        with storescp(tmp_path, "HOSP") as (port, received):
            peers = PeerRegistry(db)
            peers.add("HOSP", "127.0.0.1", port, institution=TEST_INSTITUTION)
            peers.add("LACPACS", "127.0.0.1", free_port(), institution="Lac")
            # Lac's staff do not see the study: it answers like one that does not exist.
            body = {"study_uid": study, "peer": "HOSP"}
            refused = http.post(f"{api}/jobs", json=body, headers=_as(lac))
            assert refused.status_code == 404, refused.text
            # Lac may not have it: no pushing it into Lac's PACS.
            to_lac = http.post(f"{api}/jobs", json={**body, "peer": "LACPACS"}, headers=_as(clerk))
            assert to_lac.status_code == 403 and "may not receive" in to_lac.json()["message"]
            bad = http.post(f"{api}/jobs", json={**body, "peer": "GHOST"}, headers=_as(clerk))
            assert bad.status_code == 404

            created = http.post(f"{api}/jobs", json=body, headers=_as(clerk))
            assert created.status_code == 202, created.text
            job = created.json()
            assert job["requested_by"] == "clerk"
            assert created.headers["location"].endswith(f"/api/jobs/{job['id']}")
            assert created.headers["cache-control"] == "no-store"
            deadline = time.monotonic() + 60
            while job["status"] != "done" and time.monotonic() < deadline:
                time.sleep(0.2)
                job = http.get(created.headers["location"], headers=_as(clerk)).json()
            assert job["status"] == "done" and job["instances"]["sent"] == 2
            assert len([p for p in received.iterdir() if p.is_file()]) == 2

        detailed = http.get(f"{api}/jobs/{job['id']}?items=true", headers=_as(op)).json()
        assert [i["status"] for i in detailed["items"]] == ["sent", "sent"]
        assert http.get(f"{api}/jobs/{job['id']}", headers=_as(lac)).status_code == 404
        assert http.get(f"{api}/jobs", headers=_as(lac)).json() == []
        assert [j["id"] for j in http.get(f"{api}/jobs", headers=_as(clerk)).json()] == [job["id"]]

        paths = http.get(f"{server.url}/openapi.json").json()["paths"]
        for path in ("/api/transfers", "/api/transfers/{transfer_id}/report", "/api/jobs",
                     "/api/jobs/{job_id}"):  # fmt: skip
            assert path in paths

    with db.reading() as session:
        rows = session.execute(
            select(AuditRecord.principal_name, AuditRecord.operation, AuditRecord.outcome).where(
                AuditRecord.door == "api"
            )
        ).all()
    trail = {tuple(r) for r in rows}
    assert ("clerk", "transfer-show", "denied") in trail
    assert ("clerk", "transfer-report", "allowed") in trail
    assert ("clerk", "forward", "allowed") in trail
    assert ("lacstaff", "forward", "denied") in trail
    assert ("pat", "GET /api/jobs", "denied") in trail
