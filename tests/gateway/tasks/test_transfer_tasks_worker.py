"""Closure-transfer and forwarding tasks through a Redis broker and a real worker.

The same task code runs in-process without a broker (``tasks run``, the ``serve``
resumer: tests/gateway/transfers, tests/gateway/forward); here ``studybridge worker``
(Celery on Redis, its own queue) runs them, submitted like the periodic resumer
submits them:

- ``studybridge.transfer_pull``: the worker asks dcmtk's dcmqrscp (the closing
  clinic's PACS) by C-MOVE for what the transfer misses; the instances come in
  through a running ``studybridge serve`` tagged to the transfer;
- ``studybridge.transfer_finalize``: the worker reconciles and signs the receipt;
- ``studybridge.forward``: the worker pushes a study to dcmtk's storescp.
"""

from __future__ import annotations

import json

import pydicom
import pytest

from gateway.archive import Archive
from gateway.forward.jobs import create_job, get_job
from gateway.forward.tasks import FORWARD
from gateway.peers import PeerRegistry
from gateway.tasks.dispatch import CeleryDispatcher
from gateway.transfers.expected import ExpectedLine, store_expected
from gateway.transfers.finalize import latest_receipt
from gateway.transfers.records import create_transfer
from gateway.transfers.report import reconcile
from gateway.transfers.tasks import TRANSFER_FINALIZE, TRANSFER_PULL
from tests.factories import ct_series
from tests.gateway.tasks.test_worker import (
    broker_settings,
    cleanup_queue,
    env_for,
    require_broker,
    wait_for,
    worker,
)
from tests.servers import dcmqrscp, require_tool, run_tool, running_gateway, storescp

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def test_pull_finalize_and_forward_run_in_a_worker(tmp_path):
    storescu = require_tool("storescu")
    settings = broker_settings(tmp_path, require_broker("redis"))
    a = ct_series(tmp_path / "A", 2, patient_id="LAC-1", study_date="20230110")
    b = ct_series(tmp_path / "B", 1, patient_id="LAC-2", study_date="20230615")
    study_a, study_b = (str(pydicom.dcmread(p[0]).StudyInstanceUID) for p in (a, b))
    env = env_for(settings)
    with (
        cleanup_queue(settings),
        running_gateway(tmp_path, env) as gw,
        dcmqrscp(tmp_path, move_destinations={"STUDYBRIDGE": gw.dimse_port}) as (qr_port, _),
        storescp(tmp_path, "HOSP") as (hosp_port, received),
    ):
        assert gw.data_dir == settings.data_dir
        sent = run_tool([storescu, "-aec", "CLINIC", "127.0.0.1", str(qr_port), *map(str, a + b)])
        assert sent.returncode == 0, sent.stderr
        archive = Archive.open(settings, migrate_schema=True)
        try:
            peers = PeerRegistry(archive.db)
            peers.add("CLINIC", "127.0.0.1", qr_port)
            peers.add("HOSP", "127.0.0.1", hosp_port)
            tid = create_transfer(
                archive.db, institution="Lac", reason="closure", issuer="LAC", source_ae="CLINIC"
            ).id
            store_expected(
                archive.db,
                tid,
                [ExpectedLine(study_a, "", 2), ExpectedLine(study_b, "", 1)],
                origin="manifest",
            )
            assert len(reconcile(archive.db, tid).missing) == 2
            gw.start("--dimse-workers", "1")
            dispatcher = CeleryDispatcher(settings)
            with worker(settings, tmp_path / "worker.log") as w:
                dispatcher.submit(TRANSFER_PULL, transfer_id=tid, budget=60)
                assert dispatcher.flush(20) and dispatcher.failures == 0
                wait_for(lambda: reconcile(archive.db, tid).complete, 90, "the pulled studies")
                wait_for(lambda: w.succeeded(TRANSFER_PULL) == 1, 30, "the pull task")

                dispatcher.submit(TRANSFER_FINALIZE, transfer_id=tid)
                assert dispatcher.flush(20)
                wait_for(lambda: latest_receipt(archive.db, tid) is not None, 60, "the receipt")
                receipt = json.loads(latest_receipt(archive.db, tid) or "{}")["receipt"]
                assert receipt["status"] == "complete"
                assert receipt["counts"]["instances"] == 3

                job = create_job(archive, study_a, "HOSP")
                dispatcher.submit(FORWARD, job_id=job.id, budget=60)
                assert dispatcher.flush(20)
                wait_for(lambda: get_job(archive, job.id).status == "done", 60, "the forward")
                wait_for(lambda: w.succeeded(FORWARD) == 1, 30, "the forward task")
                assert w.succeeded(TRANSFER_FINALIZE) == 1
            dispatcher.close()
            assert get_job(archive, job.id).counts == {"pending": 0, "sent": 2, "failed": 0}
            assert len([p for p in received.iterdir() if p.is_file()]) == 2
        finally:
            archive.close()
        assert gw.stop() == 0, gw.log_text()
