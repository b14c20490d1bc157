"""studybridge scrub: missing and damaged blobs found, orphans listed and removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.archive import Archive
from gateway.ops.scrub import scrub
from tests.factories import ct_slice, write
from tests.gateway.archive.helpers import SOURCE, instances

pytestmark = [pytest.mark.production, pytest.mark.filterwarnings("ignore::UserWarning")]


def put_blob(archive: Archive, tmp_path: Path, key: str, data: bytes) -> None:
    path = tmp_path / "blob-src"
    path.write_bytes(data)
    archive.store.put_file(key, path, move=True)


def test_intact_archive_is_healthy(archive: Archive, tmp_path: Path):
    for i in range(3):
        archive.ingest_file(write(ct_slice(), tmp_path / f"{i}.dcm"), SOURCE)
    report = scrub(archive.db, archive.store, orphan_grace=0)
    assert report.healthy
    assert report.checked == 3
    assert report.bytes_checked == sum(row.size for row in instances(archive))
    assert report.orphans == []


def test_missing_and_damaged_blobs_are_reported(archive: Archive, tmp_path: Path):
    for i in range(3):
        archive.ingest_file(write(ct_slice(), tmp_path / f"{i}.dcm"), SOURCE)
    gone, damaged, _fine = instances(archive)
    archive.store.delete(gone.blob_key)
    with archive.store.open(damaged.blob_key) as fh:
        data = bytearray(fh.read())
    data[-1] ^= 0xFF  # one flipped bit in the pixel data
    archive.store.delete(damaged.blob_key)
    put_blob(archive, tmp_path, damaged.blob_key, bytes(data))

    report = scrub(archive.db, archive.store, orphan_grace=0)
    assert not report.healthy
    problems = {(p.kind, p.sop_uid) for p in report.problems}
    assert problems == {("missing", gone.sop_uid), ("corrupt", damaged.sop_uid)}
    assert report.checked == 3


def test_orphans_are_listed_and_removed_only_when_old(archive: Archive, tmp_path: Path):
    archive.ingest_file(write(ct_slice(), tmp_path / "a.dcm"), SOURCE)
    orphan = "studies/1.2.3/1.2.3.4/1.2.3.4.5.0123456789abcdef.dcm"
    put_blob(archive, tmp_path, orphan, b"left by a process that died before indexing")
    put_blob(archive, tmp_path, "quarantine/1.2.3.x.dcm", b"kept on purpose")

    young = scrub(archive.db, archive.store, orphan_grace=3600, delete_orphans=True)
    assert young.orphans == [] and archive.store.exists(orphan)  # within the grace period

    listed = scrub(archive.db, archive.store, orphan_grace=0)
    assert listed.orphans == [orphan] and listed.orphans_removed == 0
    assert archive.store.exists(orphan)

    removed = scrub(archive.db, archive.store, orphan_grace=0, delete_orphans=True)
    assert removed.orphans_removed == 1 and removed.healthy
    assert not archive.store.exists(orphan)
    assert archive.store.exists("quarantine/1.2.3.x.dcm")
    assert len(instances(archive)) == 1 and archive.store.exists(instances(archive)[0].blob_key)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_scrub_command_exit_codes(archive: Archive, tmp_path: Path, backend: str):
    archive.ingest_file(write(ct_slice(), tmp_path / "a.dcm"), SOURCE)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("STUDYBRIDGE_CONFIG", None)
    cmd = [sys.executable, "-m", "gateway.cli", "scrub", "--json", "--data-dir"]
    ok = subprocess.run(
        [*cmd, str(archive.settings.data_dir)], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["checked"] == 1
    archive.store.delete(instances(archive)[0].blob_key)
    bad = subprocess.run(
        [*cmd, str(archive.settings.data_dir)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["problems"][0]["kind"] == "missing"
