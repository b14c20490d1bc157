"""Fault: the S3 object store goes down during a storescu push.

A gateway on PostgreSQL + S3 (a private SeaweedFS, so the session's server is not
disturbed) receives a push from dcmtk's storescu while the object store is stopped.
Every instance must get a retryable failure status (Out of Resources, A7xx), nothing
may be indexed without its blob, and once the store is back the same push succeeds
with every instance retrievable byte for byte.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pydicom
import pytest

from gateway.archive import Archive, Level, RetrieveRequest
from gateway.config import Settings
from tests.conftest import truncate_pg
from tests.factories import ct_series, dataset_bytes
from tests.s3server import SeaweedFS, require_weed
from tests.servers import require_tool, run_tool, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]


def push(gw, files: list[Path]):
    return run_tool(
        [
            require_tool("storescu"),
            "-aet",
            "STORESCU",
            "-v",
            "127.0.0.1",
            str(gw.dimse_port),
            *map(str, files),
        ]
    )


def stored(gw) -> int:
    return int(json.loads(gw.cli("stats", "--json").stdout)["instances"])


def test_s3_down_during_push_is_retryable_and_loses_nothing(tmp_path: Path, pg_url: str):
    truncate_pg(pg_url)
    s3 = SeaweedFS(root=tmp_path / "seaweedfs", weed=require_weed())
    s3.start()
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    env = {**s3.env(prefix=prefix), "STUDYBRIDGE_DATABASE_URL": pg_url}
    first = ct_series(tmp_path / "first", 5)
    second = ct_series(tmp_path / "second", 8)
    try:
        with running_gateway(tmp_path, env) as gw:
            gw.cli("peers", "add", "STORESCU", "--host", "127.0.0.1", "--port", "104")
            gw.start("--dimse-workers", "2")
            result = push(gw, first)
            assert result.returncode == 0, result.stderr
            assert stored(gw) == 5

            s3.stop()
            result = push(gw, second)
            log = result.stdout + result.stderr
            statuses = re.findall(r"Received Store Response \(([^)]*)\)", log)
            # storescu stops at the first refusal; that refusal is Out of Resources
            # (A7xx), so the sender keeps its data and may retry.
            assert statuses and all("OutOfResources" in s for s in statuses), log
            assert stored(gw) == 5  # nothing indexed without its blob

            s3.start()
            result = push(gw, second)
            assert result.returncode == 0, result.stderr
            assert stored(gw) == 13
            gw_settings = Settings(
                data_dir=gw.data_dir, database_url=pg_url, **s3.settings(prefix=prefix)
            )
            assert gw.stop() == 0, gw.log_text()
    finally:
        s3.stop()

    # Every instance, from both pushes, is there byte for byte after a restart of S3.
    s3.start()
    try:
        archive = Archive.open(gw_settings)
        try:
            for path in first + second:
                sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                (inst,) = archive.find_instances(RetrieveRequest(level=Level.IMAGE, sop_uids=[sop]))
                with archive.store.open(inst.blob_key) as fh:
                    fh.seek(inst.dataset_offset)
                    assert fh.read() == dataset_bytes(path)
            keys = sorted(archive.store.iter_keys("studies/"))
            assert len(keys) == 13  # no stray blob from the failed attempts
        finally:
            archive.close()
    finally:
        s3.stop()
