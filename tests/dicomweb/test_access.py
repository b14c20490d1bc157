"""Access control on the DICOMweb door: one principal per request, scope in every route.

North sent study A, South sent study B. North's client token and a share-link token
for A must reach A and never B, nor learn that B exists: for every endpoint, B is
answered exactly like a study that does not exist (status and body, UIDs aside),
and searches count only what the principal may see.
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from consent.audit import iter_records
from consent.links import LinkPolicy, LinkRules, create_link, exchange, revoke_link
from consent.models import AuditRecord
from consent.patients import link_patient
from consent.principals import (
    Kind,
    Principal,
    add_dicomweb_client,
    add_institution,
    add_user,
    user_principal,
)
from consent.tokens import issue_for_system
from dicomweb.app import create_app
from gateway.archive import Archive, Source
from gateway.archive.models import Instance
from gateway.config import Settings
from gateway.transfers.records import create_transfer
from tests.dicomweb.conftest import _serve
from tests.factories import ct_slice, uid, write

pytestmark = [pytest.mark.integration, pytest.mark.production]

POLICY = LinkPolicy(
    default_lifetime=dt.timedelta(days=7),
    max_lifetime=dt.timedelta(days=30),
    token_lifetime=dt.timedelta(minutes=60),
    max_failures=5,
    max_failures_per_client=10,
    lockout=dt.timedelta(minutes=15),
)


@dataclass(frozen=True)
class Refs:
    study: str
    series: str
    sop: str


@dataclass
class Secured:
    url: str
    archive: Archive
    settings: Settings
    app: object
    a: Refs
    b: Refs
    north: str  # North's DICOMweb client token
    link: str  # a view-only share link's access token for A
    link_id: int
    alice: Principal
    tmp_path: Path

    def get(self, path: str, token: str | None, **kw) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(self.url + path, headers=headers, timeout=30, **kw)


def _ingest(archive: Archive, folder: Path, institution: str, patient: str, n: int) -> Refs:
    study, series = uid(), uid()
    sops = []
    for i in range(1, n + 1):
        ds = ct_slice(
            patient_id=patient,
            issuer="NORTH",
            study_uid=study,
            series_uid=series,
            instance_number=i,
            rows=8,
            columns=8,
        )
        path = write(ds, folder / f"{institution}-{i}.dcm")
        archive.ingest_file(path, Source(door="test", institution=institution))
        sops.append(ds.SOPInstanceUID)
    return Refs(study, series, sops[0])


@pytest.fixture
def secured(settings: Settings, archive: Archive, tmp_path: Path) -> Iterator[Secured]:
    a = _ingest(archive, tmp_path / "a", "North", "P1", 2)
    b = _ingest(archive, tmp_path / "b", "South", "P2", 2)
    db = archive.db
    add_institution(db, "North", issuer="NORTH")
    add_institution(db, "South", issuer="SOUTH")
    north_client, _secret = add_dicomweb_client(db, "North", "north-viewer")
    north = issue_for_system(db, north_client, dt.timedelta(hours=1)).token
    alice_id = add_user(db, "alice", Kind.PATIENT)
    admin = add_user(db, "admin", Kind.OPERATOR)
    app = create_app(settings, archive)
    gate = app.state.gate
    link_patient(
        db,
        gate.auditor,
        account_id=alice_id,
        issuer="NORTH",
        patient_id="P1",
        by=user_principal(db, admin),
        evidence="identity card checked by the operator",
    )
    alice = user_principal(db, alice_id)
    link_id, share = create_link(db, alice, [a.study], LinkRules(), POLICY)
    link = exchange(db, share, POLICY, client="127.0.0.1").token
    server, thread, port = _serve(app)
    try:
        yield Secured(
            f"http://127.0.0.1:{port}{settings.dicomweb_prefix.rstrip('/')}",
            archive,
            settings,
            app,
            a,
            b,
            north,
            link,
            link_id,
            alice,
            tmp_path,
        )
    finally:
        server.should_exit = True
        thread.join(15)


def _routes(r: Refs) -> list[tuple[str, dict]]:
    inst = f"/studies/{r.study}/series/{r.series}/instances/{r.sop}"
    wado = f"/wado?requestType=WADO&studyUID={r.study}&seriesUID={r.series}&objectUID={r.sop}"
    return [
        (f"/studies/{r.study}", {}),
        (f"/studies/{r.study}/series/{r.series}", {}),
        (inst, {}),
        (f"/studies/{r.study}/metadata", {}),
        (f"/studies/{r.study}/series/{r.series}/metadata", {}),
        (f"{inst}/metadata", {}),
        (f"{inst}/frames/1", {}),
        (f"{inst}/rendered", {}),
        (f"{inst}/frames/1/rendered", {}),
        (f"/studies/{r.study}/rendered", {}),
        (f"/studies/{r.study}/series/{r.series}/rendered", {}),
        (f"{inst}/bulk/7FE00010", {}),
        (f"/studies/{r.study}/thumbnail", {}),
        (f"/studies/{r.study}/series/{r.series}/thumbnail", {}),
        (f"{inst}/thumbnail", {}),
        (f"{inst}/frames/1/thumbnail", {}),
        (wado + "&contentType=application/dicom", {}),
        (wado + "&contentType=image/jpeg", {}),
        # Requests that fail validation must fail the same way for B and for nothing.
        (f"/studies/{r.study}/metadata", {"headers": {"Accept": "image/png"}}),
        (f"{inst}/frames/0", {}),
        (wado, {}),  # no contentType: DICOM for a DICOM instance
    ]


def _searches(r: Refs) -> list[str]:
    return [
        f"/studies?StudyInstanceUID={r.study}",
        f"/studies/{r.study}/series",
        f"/studies/{r.study}/instances",
        f"/studies/{r.study}/series/{r.series}/instances",
        f"/series?StudyInstanceUID={r.study}",
        f"/series?SeriesInstanceUID={r.series}",
        f"/instances?SOPInstanceUID={r.sop}",
        f"/instances?StudyInstanceUID={r.study}",
    ]


def _masked(response: httpx.Response, r: Refs) -> tuple[int, str, str]:
    text = response.text
    for value, name in ((r.study, "<study>"), (r.series, "<series>"), (r.sop, "<sop>")):
        text = text.replace(value, name)
    return response.status_code, response.headers.get("content-type", ""), text


@pytest.mark.parametrize("who", ["north", "link"])
def test_a_token_for_a_never_reaches_b_nor_learns_it_exists(secured: Secured, who: str):
    token = getattr(secured, who)
    nothing = Refs(uid(), uid(), uid())
    for (path_b, kw), (path_n, kw_n) in zip(_routes(secured.b), _routes(nothing), strict=True):
        got_b = _masked(secured.get(path_b, token, **kw), secured.b)
        got_n = _masked(secured.get(path_n, token, **kw_n), nothing)
        assert got_b == got_n, path_b
        assert got_b[0] in (400, 404, 406), path_b
    for path_b, path_n in zip(_searches(secured.b), _searches(nothing), strict=True):
        got_b = secured.get(path_b, token)
        assert got_b.status_code == 204, path_b
        assert _masked(got_b, secured.b) == _masked(secured.get(path_n, token), nothing)


def test_the_same_token_reaches_a(secured: Secured):
    for path, kw in _routes(secured.a)[:18]:
        response = secured.get(path, secured.north, **kw)
        assert response.status_code == 200, (path, response.text)


def test_searches_count_only_what_the_principal_may_see(secured: Secured):
    studies = secured.get(
        "/studies?includefield=NumberOfStudyRelatedInstances", secured.north
    ).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [secured.a.study]
    assert studies[0]["00201208"]["Value"] == [2]
    assert secured.get("/studies?limit=1&offset=1", secured.north).status_code == 204
    instances = secured.get("/instances", secured.north).json()
    assert len(instances) == 2
    assert len(secured.get("/series", secured.link).json()) == 1
    assert secured.get("/instances?limit=1&offset=1", secured.link).status_code == 200
    assert secured.get("/instances?limit=1&offset=2", secured.link).status_code == 204


def test_view_only_link_cannot_download(secured: Secured):
    inst = f"/studies/{secured.a.study}/series/{secured.a.series}/instances/{secured.a.sop}"
    assert secured.get(f"{inst}/metadata", secured.link).status_code == 200
    assert secured.get(f"{inst}/frames/1", secured.link).status_code == 200
    for path in (
        f"/studies/{secured.a.study}",
        inst,
        f"/wado?requestType=WADO&studyUID={secured.a.study}&seriesUID={secured.a.series}"
        f"&objectUID={secured.a.sop}&contentType=application/dicom",
    ):
        response = secured.get(path, secured.link)
        assert response.status_code == 403, path
        assert "download" in response.json()["message"]


def test_requests_without_a_valid_token_are_refused(secured: Secured):
    response = secured.get("/studies", None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert secured.get("/studies", None, headers={"Authorization": "Basic eDp5"}).status_code == 401
    assert secured.get("/studies", "sbat_" + "x" * 43).status_code == 401
    # A token in the query string is not a credential (it would end up in logs).
    assert secured.get(f"/studies?token={secured.north}", None).status_code == 401
    # Revoking the link stops its token on the very next request.
    assert secured.get("/studies", secured.link).status_code == 200
    revoke_link(secured.archive.db, secured.alice, secured.link_id)
    assert secured.get("/studies", secured.link).status_code == 401


def test_demo_profile_serves_anonymous_requests_loudly(secured: Secured, caplog):
    secured.settings.profile = "demo"
    try:
        response = secured.get("/studies", None)
    finally:
        secured.settings.profile = "default"
    assert response.status_code == 200
    assert {s["0020000D"]["Value"][0] for s in response.json()} == {
        secured.a.study,
        secured.b.study,
    }
    assert secured.get("/studies", None).status_code == 401


def _stow(secured: Secured, token: str, ds) -> httpx.Response:
    path = write(ds, secured.tmp_path / "stow" / f"{ds.SOPInstanceUID}.dcm")
    boundary = "sbboundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return httpx.post(
        secured.url + "/studies",
        content=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=30,
    )


def test_stow_needs_permission_and_records_the_institution(secured: Secured):
    ds = ct_slice(patient_id="P9", issuer="NORTH", rows=4, columns=4)
    assert _stow(secured, secured.link, ds).status_code == 403
    response = _stow(secured, secured.north, ds)
    assert response.status_code == 200, response.text
    with secured.archive.db.reading() as session:
        stored = session.scalar(select(Instance).where(Instance.sop_uid == ds.SOPInstanceUID))
    assert stored.source_institution == "North"
    found = secured.get(f"/studies?StudyInstanceUID={ds.StudyInstanceUID}", secured.north)
    assert found.status_code == 200
    # Adding an instance to South's study would make it North's: refused, B stays hidden.
    intruder = ct_slice(
        patient_id="P2", issuer="NORTH", study_uid=secured.b.study, rows=4, columns=4
    )
    response = _stow(secured, secured.north, intruder)
    assert response.status_code == 409
    assert secured.get(f"/studies/{secured.b.study}/metadata", secured.north).status_code == 404


def test_zip_upload_needs_permission_and_adds_only_to_visible_studies(secured: Secured):
    own = ct_slice(patient_id="P9", issuer="NORTH", rows=4, columns=4)
    intruder = ct_slice(
        patient_id="P2", issuer="NORTH", study_uid=secured.b.study, rows=4, columns=4
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, ds in (("OWN", own), ("INTRUDER", intruder)):
            zf.write(write(ds, secured.tmp_path / "zip" / f"{name}.dcm"), f"DICOM/{name}")
    url = secured.url.removesuffix(secured.settings.dicomweb_prefix.rstrip("/")) + "/api/imports"

    def upload(token: str | None, **params: object) -> httpx.Response:
        headers = {"Content-Type": "application/zip"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.post(url, content=buf.getvalue(), headers=headers, params=params, timeout=60)

    assert upload(None).status_code == 401
    assert upload(secured.link).status_code == 403  # a link holder may not store
    assert upload(secured.north, institution="South").status_code == 403
    south = create_transfer(secured.archive.db, institution="South", reason="closure", issuer="S")
    assert upload(secured.north, transfer=south.id).status_code == 404  # not North's
    response = upload(secured.north)
    assert response.status_code == 200, response.text
    files = {f["name"]: f for f in response.json()["files"]}
    assert files["DICOM/OWN"]["outcome"] == "stored"
    assert files["DICOM/INTRUDER"]["outcome"] == "failed"
    assert files["DICOM/INTRUDER"]["code"] == "not-authorized"
    with secured.archive.db.reading() as session:
        stored = session.scalar(select(Instance).where(Instance.sop_uid == own.SOPInstanceUID))
        assert stored.source_institution == "North"
        assert (
            session.scalar(select(Instance).where(Instance.sop_uid == intruder.SOPInstanceUID))
            is None
        )
    assert secured.get(f"/studies/{secured.b.study}/metadata", secured.north).status_code == 404
    secured.app.state.gate.auditor.flush()
    stores = {
        (r.study_uid, r.outcome)
        for r in iter_records(secured.archive.db)
        if r.door == "import" and r.operation == "store" and r.study_uid
    }
    assert stores == {(own.StudyInstanceUID, "allowed"), (secured.b.study, "denied")}


def test_every_attempt_is_audited_and_frames_aggregate(secured: Secured):
    inst = f"/studies/{secured.a.study}/series/{secured.a.series}/instances/{secured.a.sop}"
    for _ in range(20):
        assert secured.get(f"{inst}/frames/1", secured.north).status_code == 200
    secured.get(f"/studies/{secured.b.study}/metadata", secured.north)
    secured.get("/studies?PatientID=P*", secured.north)
    secured.app.state.gate.auditor.flush()
    rows = [r for r in iter_records(secured.archive.db) if r.door == "dicomweb"]
    views = [r for r in rows if r.operation == "view" and r.study_uid == secured.a.study]
    assert sorted(r.count for r in views) == [1, 19]
    assert all(r.principal_name == "north-viewer" and r.institution == "North" for r in views)
    denied = [r for r in rows if r.study_uid == secured.b.study]
    assert [(r.operation, r.outcome) for r in denied] == [("view", "denied")]
    searches = [r for r in rows if r.operation == "search"]
    assert any("PatientID=P*" in r.detail for r in searches)
    with secured.archive.db.reading() as session:
        assert all(
            secured.north not in (r.detail or "") for r in session.scalars(select(AuditRecord))
        )


def test_national_ids_are_masked_unless_the_role_needs_them(secured: Secured):
    from consent.principals import Role
    from consent.tokens import issue_for_user

    rrn = "900101-1234567"
    ds = ct_slice(patient_id=rrn, issuer="NORTH", rows=4, columns=4)
    secured.archive.ingest_file(
        write(ds, secured.tmp_path / "rrn.dcm"), Source(door="test", institution="North")
    )
    db = secured.archive.db
    hour = dt.timedelta(hours=1)
    rad = issue_for_user(
        db, add_user(db, "rad", Kind.STAFF, institution="North", role=Role.RADIOLOGIST), hour
    ).token
    clerk = issue_for_user(
        db, add_user(db, "clerk", Kind.STAFF, institution="North", role=Role.CLERK), hour
    ).token
    study = ds.StudyInstanceUID
    for path in (f"/studies?StudyInstanceUID={study}", f"/studies/{study}/metadata"):
        for token, sees in ((secured.north, True), (clerk, True), (rad, False)):
            for encoding in ("identity", "gzip"):  # masked before compression
                response = secured.get(path, token, headers={"Accept-Encoding": encoding})
                assert response.status_code == 200, (path, response.text)
                assert (rrn in response.text) is sees, (path, token, encoding)
                if not sees:
                    assert "900101-1******" in response.text


def test_study_media_zip_needs_download_permission(secured: Secured):
    root = secured.url.removesuffix(secured.settings.dicomweb_prefix.rstrip("/"))

    def media(study: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{root}/api/studies/{study}/media", headers=headers, timeout=60)

    got = media(secured.a.study, secured.north)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "application/zip"
    assert "attachment" in got.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
        names = zf.namelist()
    assert names[:2] == ["DICOMDIR", "README.TXT"] and len(names) == 4  # two instances
    # View-only share link: refused plainly; another sender's study: like a missing one.
    refused = media(secured.a.study, secured.link)
    assert refused.status_code == 403 and "download" in refused.json()["message"]
    hidden, missing = media(secured.b.study, secured.north), media(uid(), secured.north)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"] == missing.json()["error"]
    assert media(secured.a.study, None).status_code == 401
    assert media("not-a-uid", secured.north).status_code == 400
