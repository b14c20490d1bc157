"""Forwarding to a receiving PACS with real peers.

dcmtk's storescp plays the receiving hospital's PACS: a reconciled copy arrives with
the hospital's identifiers and the originals in Other Patient IDs Sequence, while
the archived copy stays byte-identical; an unreconciled copy is sent byte for byte;
a compressed instance is decompressed for a PACS that takes no compressed syntax.
A pynetdicom SCP that drops the association and then runs out of resources mid-push
shows the job (run by the ``studybridge.forward`` task) retrying and finishing with
every instance received exactly once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from gateway.archive import Archive, Source
from gateway.config import Settings
from gateway.forward.jobs import create_job, get_job, items
from gateway.forward.tasks import forward as forward_task
from gateway.peers import PeerRegistry
from gateway.tasks.registry import TaskContext
from tests.factories import ct_series
from tests.servers import dataset_bytes, free_port, running_gateway, storescp

pytestmark = [pytest.mark.integration]


def _blob_hashes(data_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((data_dir / "blobs").rglob("*.dcm"))
    }


def _received(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]


def test_reconciled_forward_and_archive_copy_unchanged(tmp_path: Path) -> None:
    sources = ct_series(tmp_path / "study", 3, patient_id="LAC-1")
    study_uid = str(pydicom.dcmread(sources[0]).StudyInstanceUID)
    with running_gateway(tmp_path) as gw, storescp(tmp_path, "HOSP") as (port, out):
        gw.cli(
            "import", str(tmp_path / "study"), "--issuer", "LAC", "--institution", "Test Hospital"
        )
        clerk = gw.staff()
        gw.cli(
            "peers",
            "add",
            "HOSP",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--institution",
            "Test Hospital",
        )
        before = _blob_hashes(gw.data_dir)
        done = gw.cli(
            "forward", study_uid, "--to", "HOSP", "--patient-id", "H-77", "--issuer", "HOSPITAL",
            "--accession", "A99", "--json", *clerk,
        )  # fmt: skip
        job = json.loads(done.stdout)
        assert job["status"] == "done" and job["instances"] == {
            "pending": 0,
            "sent": 3,
            "failed": 0,
        }
        got = _received(out)
        assert len(got) == 3
        for ds in got:
            assert (ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber) == (
                "H-77",
                "HOSPITAL",
                "A99",
            )
            [other] = ds.OtherPatientIDsSequence
            assert (other.PatientID, other.IssuerOfPatientID) == ("LAC-1", "LAC")
            [history] = ds.OriginalAttributesSequence
            assert history.ReasonForTheAttributeModification == "COERCE"
            modified = history.ModifiedAttributesSequence[0]
            assert modified.PatientID == "LAC-1" and modified.AccessionNumber == "ACC001"
        # The archive's copies are byte-identical to what was imported.
        assert _blob_hashes(gw.data_dir) == before
        originals = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in sources}
        for blob in (gw.data_dir / "blobs").rglob("*.dcm"):
            assert dataset_bytes(blob) == originals[pydicom.dcmread(blob).SOPInstanceUID]
        # A plain forward (no reconciliation) sends the stored bytes as they are.
        for p in out.iterdir():
            p.unlink()
        gw.cli("forward", study_uid, "--to", "HOSP", *clerk)
        for p in out.iterdir():
            assert dataset_bytes(p) == originals[pydicom.dcmread(p).SOPInstanceUID]
        listed = json.loads(gw.cli("jobs", "--json").stdout)
        assert [j["status"] for j in listed] == ["done", "done"]


def test_compressed_instance_is_decompressed_for_a_pacs_without_it(tmp_path: Path) -> None:
    src = tmp_path / "jpeg" / "sc.dcm"
    src.parent.mkdir()
    shutil.copy(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), src)
    study_uid = str(pydicom.dcmread(src).StudyInstanceUID)
    with (
        running_gateway(tmp_path) as gw,
        storescp(tmp_path, "PLAIN", accept_all=False) as (port, out),
    ):
        gw.cli("import", str(src.parent), "--institution", "Test Hospital")
        gw.cli(
            "peers",
            "add",
            "PLAIN",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--institution",
            "Test Hospital",
        )
        gw.cli("forward", study_uid, "--to", "PLAIN", "--patient-id", "P-9", *gw.staff())
        [ds] = _received(out)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert ds.PatientID == "P-9"
        assert ds.pixel_array.shape == pydicom.dcmread(src).pixel_array.shape


class _FlakyPACS:
    """A pynetdicom Storage SCP that aborts the first association at its 3rd
    instance, answers 0xA700 (out of resources) to the 4th on the second, and then
    takes everything."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.associations = 0
        self.seen_in_assoc = 0
        self.lock = threading.Lock()

    def on_open(self, event: evt.Event) -> None:
        with self.lock:
            self.associations += 1
            self.seen_in_assoc = 0

    def on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.seen_in_assoc += 1
            n, assoc_no = self.seen_in_assoc, self.associations
        if assoc_no == 1 and n == 3:
            threading.Thread(target=event.assoc.abort, daemon=True).start()
            threading.Event().wait(1.0)
            return 0xA700
        if assoc_no == 2 and n == 2:
            return 0xA700
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000


def test_pacs_dropping_and_refusing_mid_push(settings: Settings, tmp_path: Path) -> None:
    archive = Archive.open(settings, migrate_schema=True)
    pacs = _FlakyPACS()
    port = free_port()
    ae = AE(ae_title="FLAKY")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, pacs.on_store), (evt.EVT_ESTABLISHED, pacs.on_open)],
    )
    try:
        paths = ct_series(tmp_path / "s", 5)
        for p in paths:
            archive.ingest_file(p, Source(door="import"))
        study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
        PeerRegistry(archive.db).add("FLAKY", "127.0.0.1", port, institution="Test Hospital")
        job = create_job(archive, study_uid, "FLAKY")
        # Run as the background task does (a worker, or `studybridge tasks run`).
        result = forward_task(TaskContext(archive, settings), backoff=0.1)
        assert result == {str(job.id): {"status": "done", "pending": 0, "sent": 5, "failed": 0}}
        info = get_job(archive, job.id)
    finally:
        server.shutdown()
        archive.close()
    assert info.status == "done" and info.attempts == 3
    assert info.counts == {"pending": 0, "sent": 5, "failed": 0}
    wanted = {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    assert sorted(pacs.received) == sorted(wanted)  # each exactly once: no duplicate, none lost
    archive = Archive.open(settings)
    try:
        assert {i.status for i in items(archive, job.id)} == {"sent"}
        assert get_job(archive, job.id).last_error == ""
    finally:
        archive.close()
