"""Stateless gateways: two `studybridge serve` sharing one PostgreSQL and one blob store.

The same study is pushed to both at once by two dcmtk storescu senders and one
STOW-RS client. The index must then hold exactly one consistent copy (one patient,
one study, its series, each instance once, each with its blob, no orphan blob),
and every instance must be retrievable, byte for byte, from either gateway.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, func, select

from gateway.archive.models import IngestEvent, Instance, Patient, Series, Study
from tests.conftest import truncate_pg
from tests.factories import ct_series, uid
from tests.servers import Gateway, dataset_bytes, require_tool, run_tool, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

BOUNDARY = "sb-scale-7d1c"


def stow_body(files: list[Path]) -> bytes:
    chunks = []
    for path in files:
        chunks.append(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
        )
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


@pytest.fixture
def two_gateways(pg_url: str, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    require_tool("storescu")
    truncate_pg(pg_url)
    env = {
        "STUDYBRIDGE_DATABASE_URL": pg_url,
        "STUDYBRIDGE_BLOB_DIR": str(tmp_path / "shared-blobs"),
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running_gateway(tmp_path / "a", env) as one, running_gateway(tmp_path / "b", env) as two:
        one.cli("peers", "add", "STORESCU", "--host", "127.0.0.1", "--port", "104")
        one.start("--dimse-workers", "2")
        two.start("--dimse-workers", "2")
        yield one, two
        assert one.stop() == 0, one.log_text()
        assert two.stop() == 0, two.log_text()


def storescu(gw: Gateway, files: list[Path]):
    return run_tool(
        [
            require_tool("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            gw.ae_title,
            "127.0.0.1",
            str(gw.dimse_port),
            *map(str, files),
        ],
        timeout=300,
    )


def test_two_gateways_one_index_one_copy(
    two_gateways: tuple[Gateway, Gateway], pg_url: str, tmp_path: Path
):
    one, two = two_gateways
    study = uid()
    files = ct_series(tmp_path / "s1", 30, study_uid=study, patient_id="SCALE-1") + ct_series(
        tmp_path / "s2", 30, study_uid=study, patient_id="SCALE-1", series_number=2
    )
    body = stow_body(files)
    start = threading.Barrier(3)
    results: dict[str, object] = {}

    def push(name: str, action):
        start.wait()
        results[name] = action()

    senders = [
        threading.Thread(target=push, args=("dimse-1", lambda: storescu(one, files))),
        threading.Thread(target=push, args=("dimse-2", lambda: storescu(two, files))),
        threading.Thread(
            target=push,
            args=(
                "stow",
                lambda: httpx.post(
                    f"http://127.0.0.1:{two.http_port}/dicom-web/studies",
                    content=body,
                    headers={
                        "Content-Type": f'multipart/related; type="application/dicom"; '
                        f"boundary={BOUNDARY}",
                        "Accept": "application/dicom+json",
                    },
                    timeout=300,
                ),
            ),
        ),
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join(400)
    for name in ("dimse-1", "dimse-2"):
        result = results[name]
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "Failed" not in result.stderr, result.stderr
    stow = results["stow"]
    assert stow.status_code == 200, stow.text
    assert len(stow.json()["00081199"]["Value"]) == len(files)

    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:

            def count(model) -> int:
                return conn.scalar(select(func.count()).select_from(model))

            assert (count(Patient), count(Study), count(Series), count(Instance)) == (
                1,
                1,
                2,
                len(files),
            )
            assert count(IngestEvent) == 0  # no conflicts, no mismatches: same bytes
            rows = conn.execute(select(Instance.sop_uid, Instance.blob_key)).all()
    finally:
        engine.dispose()
    blob_root = tmp_path / "shared-blobs"
    stored = sorted(str(p.relative_to(blob_root)) for p in (blob_root / "studies").rglob("*.dcm"))
    assert stored == sorted(key for _sop, key in rows)  # one blob each, no orphan

    expected = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[str(ds.SOPInstanceUID)] = (str(ds.SeriesInstanceUID), dataset_bytes(path))
    for gw in (one, two):
        with httpx.Client(base_url=f"http://127.0.0.1:{gw.http_port}/dicom-web") as client:
            for sop, (series, data) in expected.items():
                answer = client.get(
                    f"/studies/{study}/series/{series}/instances/{sop}",
                    headers={
                        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
                    },
                )
                assert answer.status_code == 200, answer.text
                assert data in answer.content
            found = client.get(
                "/studies",
                params={"StudyInstanceUID": study, "includefield": "00201208"},
            ).json()
            assert found[0]["00201208"]["Value"] == [len(files)]
