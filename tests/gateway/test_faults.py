"""Faults of the production backends: PostgreSQL restarted in the middle of a push.

The test runs a private PostgreSQL cluster (``initdb`` as the ``postgres`` user, on a
spare port) so the shared server other tests use is never disturbed. While it is
down, the sender gets retryable failures (0xA701, out of resources: index); once it
is back, the same gateway processes (no restart) store again, and every instance
that was acknowledged before, during or after the outage is in the index with its
blob.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, select, text

from gateway.archive.models import Instance
from tests.factories import ct_slice, uid
from tests.servers import free_port, missing, running_gateway, wait_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

RETRYABLE = {0xA700, 0xA701}


def _missing(message: str) -> None:
    missing(message)


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    _missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    raise AssertionError("unreachable")


@dataclass
class PrivatePostgres:
    bindir: Path
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [
                "runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"),
                "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                *args,
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start(self) -> None:
        self.pg_ctl(
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
            "start",
        )
        wait_port(self.port, 30)

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        _missing("a private PostgreSQL cluster needs root (to run initdb as postgres)")
    try:
        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        _missing("no postgres system user to run a private cluster")
    bindir = _pg_bindir()
    # Outside pytest's root-only temp folder: the postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="sb-pg-", dir="/tmp"))
    os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
    cluster = PrivatePostgres(bindir, root, free_port())
    subprocess.run(
        ["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(cluster.data),
         "-A", "trust", "-U", "postgres", "-N"],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_restart_mid_push_loses_no_acknowledged_instance(tmp_path: Path):
    with private_postgres() as pg:
        admin = create_engine(pg.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text('CREATE DATABASE "sb"'))
        admin.dispose()
        url = pg.url("sb")
        with running_gateway(tmp_path, {"STUDYBRIDGE_DATABASE_URL": url}) as gw:
            # The demo profile (unknown calling AEs accepted) without --demo's seeded studies,
            # which this test's instance count must not include.
            gw.env["STUDYBRIDGE_PROFILE"] = "demo"
            gw.start("--dimse-workers", "2")
            study, series = uid(), uid()
            datasets = [
                ct_slice(study_uid=study, series_uid=series, instance_number=i, rows=32, columns=32)
                for i in range(1, 91)
            ]
            ae = AE(ae_title="PYSCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            statuses: dict[str, int] = {}
            assoc = None

            def send(ds) -> int:
                nonlocal assoc
                for _ in range(3):
                    if assoc is None or not assoc.is_established:
                        assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
                        if not assoc.is_established:
                            assoc = None
                            time.sleep(0.5)
                            continue
                    answer = assoc.send_c_store(ds)
                    if answer and "Status" in answer:
                        return int(answer.Status)
                    assoc = None  # aborted: associate again
                raise AssertionError("the gateway stopped answering")

            for ds in datasets[:30]:
                statuses[ds.SOPInstanceUID] = send(ds)
            pg.stop()
            down = []
            for ds in datasets[30:60]:
                statuses[ds.SOPInstanceUID] = send(ds)
                down.append(statuses[ds.SOPInstanceUID])
                # Spread over longer than the per-process peer cache (5 s), so lookups
                # that must reach the index while it is away are exercised too.
                time.sleep(0.25)
            pg.start()
            for ds in datasets[60:]:
                statuses[ds.SOPInstanceUID] = send(ds)
            if assoc is not None:
                assoc.release()

            assert all(s == 0 for s in list(statuses.values())[:30])
            # While the index was away: retryable failures, never success or a hard error.
            assert set(down) <= RETRYABLE, {hex(s) for s in down}
            assert all(s in RETRYABLE | {0} for s in statuses.values())
            # Back up: the same processes store again (pooled connections replaced).
            after = [statuses[ds.SOPInstanceUID] for ds in datasets[60:]]
            assert after[-10:] == [0] * 10, [hex(s) for s in after]
            assert gw.proc.poll() is None

            acknowledged = {sop for sop, s in statuses.items() if s == 0}
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    rows = dict(conn.execute(select(Instance.sop_uid, Instance.blob_key)).all())
            finally:
                engine.dispose()
            assert acknowledged <= set(rows)
            blobs = gw.data_dir / "blobs"
            assert all((blobs / key).is_file() for key in rows.values())

            # The sender retries what failed: now everything is stored, once.
            for ds in datasets:
                if statuses[ds.SOPInstanceUID] != 0:
                    assert send(ds) == 0
            if assoc is not None:
                assoc.release()
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    count = conn.scalar(text("SELECT count(*) FROM instances"))
            finally:
                engine.dispose()
            assert count == len(datasets)
            assert gw.stop() == 0
