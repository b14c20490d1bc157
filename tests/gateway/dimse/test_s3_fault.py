"""Fault: the S3 object store dies in the middle of a storescu push.

A gateway on PostgreSQL + S3 (a private SeaweedFS, so the session's server is not
disturbed) receives a push from dcmtk's storescu; once a few instances are in, the
object store is killed. The instance being stored then gets a retryable failure
status (Out of Resources, A7xx) and storescu stops; every instance answered with
success is indexed with an intact blob (scrub), nothing is indexed without one.
Once the store is back the sender resends everything: all instances are stored
once (the earlier ones as duplicates) and retrievable byte for byte.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, text

from gateway.archive import Archive, Level, RetrieveRequest
from gateway.config import Settings
from gateway.ops.scrub import scrub
from tests.conftest import truncate_pg
from tests.factories import ct_series, dataset_bytes
from tests.s3server import SeaweedFS, require_weed
from tests.servers import require_tool, run_tool, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]
COUNT = 60


def push(gw, files: list[Path]):
    return run_tool(
        [require_tool("storescu"), "-aet", "STORESCU", "-v", "127.0.0.1", str(gw.dimse_port)]
        + [str(f) for f in files]
    )


def test_s3_dies_during_push_is_retryable_and_loses_nothing(tmp_path: Path, pg_url: str):
    truncate_pg(pg_url)
    s3 = SeaweedFS(root=tmp_path / "seaweedfs", weed=require_weed())
    s3.start()
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    env = {**s3.env(prefix=prefix), "STUDYBRIDGE_DATABASE_URL": pg_url}
    settings = Settings(
        data_dir=tmp_path / "var", database_url=pg_url, **s3.settings(prefix=prefix)
    )
    files = ct_series(tmp_path / "study", COUNT)
    index = create_engine(pg_url)

    def indexed() -> int:
        with index.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())

    def kill_s3_after_some() -> None:
        deadline = time.monotonic() + 60
        while indexed() < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        s3.stop()

    try:
        with running_gateway(tmp_path, env) as gw:
            gw.cli(
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
            gw.start("--dimse-workers", "2")

            killer = threading.Thread(target=kill_s3_after_some)
            killer.start()
            result = push(gw, files)
            killer.join()
            log = result.stdout + result.stderr
            statuses = re.findall(r"Received Store Response \(([^)]*)\)", log)
            succeeded = sum(1 for s in statuses if s == "Success")
            assert statuses[-1] == "Refused: OutOfResources", log  # retryable: A7xx
            assert 5 <= succeeded < COUNT, log
            # Exactly what was acknowledged is indexed: nothing lost, nothing extra.
            assert indexed() == succeeded

            s3.start()
            result = push(gw, files)  # the sender retries the whole study
            assert result.returncode == 0, result.stderr
            assert "OutOfResources" not in result.stdout + result.stderr
            assert indexed() == COUNT
            assert gw.stop() == 0, gw.log_text()

        archive = Archive.open(settings)
        try:
            report = scrub(archive.db, archive.store, orphan_grace=0)
            assert report.healthy and report.checked == COUNT, report.problems
            assert report.orphans == []  # no half-written blob left from the failed PUT
            for path in files[:: COUNT // 6]:
                sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                (inst,) = archive.find_instances(RetrieveRequest(level=Level.IMAGE, sop_uids=[sop]))
                with archive.store.open(inst.blob_key) as fh:
                    fh.seek(inst.dataset_offset)
                    assert fh.read() == dataset_bytes(path)
        finally:
            archive.close()
    finally:
        s3.stop()
        index.dispose()
