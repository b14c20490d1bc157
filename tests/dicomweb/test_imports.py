"""POST /api/imports: a zip uploaded over HTTP goes through the importer and the one
ingest (live uvicorn server, both index backends, httpx as the client)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest

from gateway.transfers.records import create_transfer, get_transfer
from tests.dicomweb.conftest import TEST_INSTITUTION, LiveServer
from tests.factories import ct_series

pytestmark = [pytest.mark.integration, pytest.mark.production]


def _zip(tmp: Path) -> tuple[bytes, list[Path]]:
    paths = ct_series(tmp / "disc", 3, patient_id="Z1")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in paths:
            zf.write(p, f"DICOM/{p.name}")
        zf.writestr("README.TXT", "not dicom")
    return buf.getvalue(), paths


def test_zip_upload_imports_and_reports_each_file(live_server: LiveServer) -> None:
    body, paths = _zip(live_server.tmp_path)
    archive = live_server.archive
    # The caller (TEST_INSTITUTION's client) uploads for its own institution's transfer.
    tid = create_transfer(
        archive.db, institution=TEST_INSTITUTION, reason="closure", issuer="LAC"
    ).id
    url = f"{live_server.url}/api/imports"
    headers = {"Content-Type": "application/zip"}
    r = httpx.post(url, content=body, headers=headers, params={"transfer": tid}, timeout=60)
    assert r.status_code == 200, r.text
    report = r.json()
    outcomes = {i["name"]: i["outcome"] for i in report["files"]}
    assert sorted(o for n, o in outcomes.items() if n.startswith("DICOM/")) == ["stored"] * 3
    assert outcomes["README.TXT"].startswith("skipped")
    assert get_transfer(archive.db, tid).status == "receiving"
    sop = str(pydicom.dcmread(paths[0]).SOPInstanceUID)
    with archive.db.read_conn() as conn:
        from sqlalchemy import text

        row = conn.execute(
            text(
                "SELECT transfer_id, received_issuer, source_institution"
                " FROM instances WHERE sop_uid = :s"
            ),
            {"s": sop},
        ).one()
    assert tuple(row) == (tid, "LAC", TEST_INSTITUTION)
    # The same zip again: duplicates, nothing stored twice.
    again = httpx.post(url, content=body, headers=headers, timeout=60).json()
    assert (
        sorted(i["outcome"] for i in again["files"] if i["name"].startswith("DICOM/"))
        == ["duplicate"] * 3
    )

    bad = httpx.post(url, content=b"PK not really", headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid-zip"
    assert httpx.post(url, content=body, timeout=30).status_code == 415
    missing = httpx.post(url, content=body, headers=headers, params={"transfer": 999}, timeout=30)
    assert missing.status_code == 404
    live_server.settings.import_max_bytes = 100
    assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 413
    assert not list(live_server.settings.staging_dir.glob("upload-*"))
