"""A receiving process killed in the middle of an ingest never leaves an index row
without its blob, and the instance sent again is stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.archive import Archive, Outcome
from tests.conftest import backend_env
from tests.factories import ct_slice, write
from tests.gateway.archive.helpers import SOURCE, blob_keys, instances

pytestmark = pytest.mark.production

# Runs in a child process: ingest one file and die (SIGKILL, no cleanup) at `point`.
_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from gateway.archive import Archive, Source, db
    from gateway.config import Settings

    args = json.loads(sys.argv[1])
    settings = Settings(data_dir=args["data_dir"])  # index and store: STUDYBRIDGE_*
    archive = Archive.open(settings)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if args["point"] == "after-blob":  # the blob store in use: files or S3
        # Dies once the blob is durable: when placed (S3: stored), or after the flush
        # that the index write waits for (files).
        store = type(archive.store)
        place, sync = store.place_file, store.sync
        def place_then_die(self, *a, **kw):
            placed = place(self, *a, **kw)
            if placed.durable:
                die()
            return placed
        def sync_then_die(self, *a, **kw):
            sync(self, *a, **kw)
            die()
        store.place_file, store.sync = place_then_die, sync_then_die
    else:  # inside the index transaction, its rows written, before the commit
        grouped = db.Database.write_grouped
        def write_then_die(self, work, **kw):
            return grouped(self, lambda conn: (work(conn), die()), **kw)
        db.Database.write_grouped = write_then_die
    archive.ingest_file(Path(args["path"]), Source(door="test"), owned=True)
    """
)


@pytest.mark.parametrize("point", ["after-blob", "before-commit"])
def test_killed_mid_ingest_leaves_no_row_and_a_resend_is_stored(
    archive: Archive, tmp_path: Path, point: str
) -> None:
    ds = ct_slice()
    staged = write(ds, archive.settings.staging_dir / "in.dcm")
    args = {
        "data_dir": str(archive.settings.data_dir),
        "path": str(staged),
        "point": point,
    }
    env = {
        **os.environ,
        **backend_env(archive.settings),
        "PYTHONPATH": str(Path(__file__).parents[3]),
    }
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True, timeout=120
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    # The blob was durable before anything was indexed: an orphan now, no row.
    assert instances(archive) == []
    assert len(blob_keys(archive)) == 1
    # The sender, never answered, sends it again: stored, one blob, indexed.
    result = archive.ingest_file(write(ds, tmp_path / "again.dcm"), SOURCE)
    assert result.outcome is Outcome.STORED
    rows = instances(archive)
    assert [r.sop_uid for r in rows] == [ds.SOPInstanceUID]
    assert rows[0].blob_key in blob_keys(archive)
