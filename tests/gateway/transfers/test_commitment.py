"""Storage Commitment (PS3.4 Annex J) against a running ``studybridge serve``.

pynetdicom plays the clinic's PACS asking for commitment: stored instances come
back in Referenced SOP Sequence, an instance never sent in Failed SOP Sequence
(0x0112). The report arrives on the same association while it is open, and on a
new association to the registered peer when the requester released it. On the
embedded stack and on production (PostgreSQL, S3, Redis and a worker).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

from gateway.tasks.derived import PREPARE_SERIES
from tests.conftest import ServeStack
from tests.factories import ct_series, uid
from tests.servers import free_port, require_tool, run_tool, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTANCE = "1.2.840.10008.1.20.1.1"


def _request(sops: list[str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid()
    items = []
    for sop in sops:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = sop
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class _Reports:
    def __init__(self) -> None:
        self.got: list[tuple[int, Dataset, str]] = []
        self.arrived = threading.Event()

    def handler(self, event: evt.Event) -> tuple[int, None]:
        self.got.append(
            (
                event.event_type,
                event.event_information,
                "new" if event.assoc.is_acceptor else "same",
            )
        )
        self.arrived.set()
        return 0x0000, None


def test_commitment_same_and_new_association(tmp_path: Path, serve_stack: ServeStack) -> None:
    storescu = require_tool("storescu")
    paths = ct_series(tmp_path / "s", 2)
    held = [_sop(p) for p in paths]
    never_sent = uid()
    pacs_port = free_port()
    with running_gateway(tmp_path, serve_stack.env) as gw:
        gw.cli(
            "peers", "add", "PACS", "--host", "127.0.0.1", "--port", str(pacs_port),
            "--institution", "Test Hospital",
        )  # fmt: skip
        created = gw.cli(
            "transfer", "create", "--institution", "Lac", "--issuer", "LAC", "--ae", "PACS",
            "--json",
        )  # fmt: skip
        transfer_id = json.loads(created.stdout)["id"]
        gw.start("--dimse-workers", "1")
        done = run_tool(
            [storescu, "-aet", "PACS", "-aec", "STUDYBRIDGE", "127.0.0.1", str(gw.dimse_port)]
            + [str(p) for p in paths]
        )
        assert done.returncode == 0, done.stderr

        # 1. The requester keeps its association open: the report comes on it.
        reports = _Reports()
        ae = AE(ae_title="PACS")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(
            "127.0.0.1",
            gw.dimse_port,
            ae_title="STUDYBRIDGE",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
        )
        assert assoc.is_established
        request = _request([*held, never_sent])
        status, _reply = assoc.send_n_action(request, 1, StorageCommitmentPushModel, INSTANCE)
        assert status.Status == 0x0000
        assert reports.arrived.wait(20), "no N-EVENT-REPORT on the association"
        assoc.release()
        event_type, info, how = reports.got[0]
        assert how == "same" and event_type == 2
        assert info.TransactionUID == request.TransactionUID
        assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
            held
        )
        [failed] = info.FailedSOPSequence
        assert failed.ReferencedSOPInstanceUID == never_sent and failed.FailureReason == 0x0112

        # 2. The requester releases at once: the report comes on a new association
        #    to its registered address, where we take the SCP role.
        reports2 = _Reports()
        listener = AE(ae_title="PACS")
        listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        server = listener.start_server(
            ("127.0.0.1", pacs_port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports2.handler)],
        )
        try:
            assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title="STUDYBRIDGE")
            request = _request(held)
            status, _reply = assoc.send_n_action(request, 1, StorageCommitmentPushModel, INSTANCE)
            assoc.release()
            assert status.Status == 0x0000
            # A report racing the release on the old association waits 5 s for an answer.
            assert reports2.arrived.wait(30), "no N-EVENT-REPORT on a new association"
        finally:
            server.shutdown()
        event_type, info, how = reports2.got[0]
        assert how == "new" and event_type == 1
        assert info.TransactionUID == request.TransactionUID
        assert len(info.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in info

        # A malformed request (no Transaction UID) is refused in the N-ACTION response.
        assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title="STUDYBRIDGE")
        bad = _request(held)
        del bad.TransactionUID
        status, _reply = assoc.send_n_action(bad, 1, StorageCommitmentPushModel, INSTANCE)
        assoc.release()
        assert status.Status == 0x0115
        assert gw.stop() == 0

        # The results outlive the gateway: the transfer report lists both answers.
        report = json.loads(gw.cli("transfer", "report", str(transfer_id), "--json").stdout)
        first, second = report["commitments"]
        assert (first["committed"], first["failed"], first["event_type"]) == (2, 1, 2)
        assert first["report"]["status"] == "sent"
        assert first["report"]["how"] == "same-association"
        assert first["report"]["to"].startswith("PACS at 127.0.0.1:")
        assert first["failures"] == [
            {"sop_uid": never_sent, "sop_class_uid": CTImageStorage, "failure_reason": 0x0112}
        ]
        assert (second["committed"], second["failed"], second["event_type"]) == (2, 0, 1)
        assert second["report"]["how"] == "new-association"
        assert second["report"]["to"] == f"PACS at 127.0.0.1:{pacs_port}"
        assert second["transaction_uid"] == request.TransactionUID
        text = gw.cli("transfer", "report", str(transfer_id)).stdout
        assert "storage commitment" in text and never_sent in text
    serve_stack.wait_for_task(PREPARE_SERIES)  # production: the worker took the pushed series
