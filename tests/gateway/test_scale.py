"""Stateless gateways: two `studybridge serve` sharing one PostgreSQL and one blob store.

The same study is pushed to both at once by two dcmtk storescu senders and one
STOW-RS client. The index must then hold exactly one consistent copy (one patient,
one study, its series, each instance once, each with its blob, no orphan blob),
and every instance must be retrievable, byte for byte, from either gateway.

Two stacks: a shared folder with in-process tasks, and the production one without
containers: PostgreSQL, SeaweedFS S3, Redis, two gateways and one
`studybridge worker`, which prepares each series' metadata and thumbnails once.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, func, select

from gateway.archive import Archive
from gateway.archive.metadata import cache_key, series_marker, study_series
from gateway.archive.models import IngestEvent, Instance, Patient, Series, Study
from gateway.config import Settings
from gateway.tasks.derived import PREPARE_SERIES
from tests.conftest import truncate_pg
from tests.factories import ct_series, uid
from tests.s3server import seaweedfs
from tests.servers import (
    Gateway,
    Worker,
    dataset_bytes,
    production_env,
    require_tool,
    run_tool,
    running_gateway,
    running_worker,
)

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


@dataclass
class Stack:
    one: Gateway
    two: Gateway
    settings: Settings  # what a process of this installation reads (for checks)
    worker: Worker | None = None


@pytest.fixture(params=["shared-folder", "production"])
def stack(request: pytest.FixtureRequest, pg_url: str, tmp_path: Path) -> Iterator[Stack]:
    require_tool("storescu")
    truncate_pg(pg_url)
    env = {"STUDYBRIDGE_DATABASE_URL": pg_url}
    with contextlib.ExitStack() as stack:
        if request.param == "production":
            s3 = stack.enter_context(seaweedfs(tmp_path / "s3"))
            env = production_env(pg_url, s3.env(bucket=f"sb-scale-{uuid.uuid4().hex[:8]}"))
        else:
            env["STUDYBRIDGE_BLOB_DIR"] = str(tmp_path / "shared-blobs")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        one = stack.enter_context(running_gateway(tmp_path / "a", env))
        two = stack.enter_context(running_gateway(tmp_path / "b", env))
        one.cli(
            "peers",
            "add",
            "STORESCU",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
            "--institution",
            "Test Hospital",
        )
        worker = None
        if request.param == "production":
            worker_env = {**one.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
            worker = stack.enter_context(
                running_worker(tmp_path / "w" / "var", worker_env, tmp_path / "worker.log")
            )
        one.start("--dimse-workers", "2")
        two.start("--dimse-workers", "2")
        fields = {
            k.removeprefix("STUDYBRIDGE_").lower(): v
            for k, v in env.items()
            if k.startswith("STUDYBRIDGE_")
        }
        settings = Settings(data_dir=tmp_path / "check", **fields)
        yield Stack(one, two, settings, worker)
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


def test_two_gateways_one_index_one_copy(stack: Stack, pg_url: str, tmp_path: Path):
    one, two = stack.one, stack.two
    study = uid()
    files = ct_series(tmp_path / "s1", 30, study_uid=study, patient_id="SCALE-1") + ct_series(
        tmp_path / "s2", 30, study_uid=study, patient_id="SCALE-1", series_number=2
    )
    body = stow_body(files)
    # Every sender acts for the one institution (the DIMSE peer is registered for it):
    # a study another institution created could not be added to (consent.access).
    auth = {"Authorization": f"Bearer {one.access_token('Test Hospital')}"}
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
                        **auth,
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
    archive = Archive.open(stack.settings)
    try:
        stored = sorted(archive.store.iter_keys("studies/"))
        assert stored == sorted(key for _sop, key in rows)  # one blob each, no orphan
        if stack.worker is not None:
            check_prepared_by_worker(stack.worker, archive, study)
    finally:
        archive.close()

    expected = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[str(ds.SOPInstanceUID)] = (str(ds.SeriesInstanceUID), dataset_bytes(path))
    for gw in (one, two):
        with httpx.Client(
            base_url=f"http://127.0.0.1:{gw.http_port}/dicom-web", headers=auth
        ) as client:
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


def check_prepared_by_worker(worker: Worker, archive: Archive, study: str) -> None:
    """The worker built each series' metadata and thumbnail (one current copy each)."""
    series_uids = study_series(archive.db, study)

    def prepared(series: str) -> bool:
        key = cache_key(study, series, series_marker(archive.db, study, series))
        return archive.store.exists(key) and any(
            archive.store.iter_keys(f"thumbnails/{study}/{series}/")
        )

    deadline = time.monotonic() + 120
    while not all(prepared(series) for series in series_uids):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    # Each gateway process coalesced on its own, so the task may have run more than
    # once per series; it still leaves one current copy.
    time.sleep(3)
    assert worker.succeeded(PREPARE_SERIES) >= len(series_uids)
    for series in series_uids:
        key = cache_key(study, series, series_marker(archive.db, study, series))
        assert sorted(archive.store.iter_keys(f"metadata/{study}/{series}/")) == [key]
