"""Outgoing DICOM TLS (``gateway.dimse.client``) against dcmtk's ``storescp +tls``.

dcmtk's storescp plays a receiving PACS that speaks only DICOM TLS (BCP 195
profile) and requires a client certificate of the test CA. A forwarding job and a
C-MOVE both reach it with the peer's certificate verified and ours presented; a
peer whose certificate is not of the CA we trust for it is refused with a clear,
permanent error, and nothing is sent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from gateway.archive import Archive
from gateway.config import Settings
from gateway.dimse.client import AssociationFailed, associate
from gateway.peers import Peer, PeerError, PeerRegistry
from tests.factories import ct_series
from tests.pki import Pki, make_ca
from tests.servers import Gateway, dataset_bytes, free_port, running_gateway, storescp

pytestmark = [pytest.mark.integration]


def _gateway_env(pki: Pki) -> dict[str, str]:
    key, cert = pki.issue("gateway-client", ips=["127.0.0.1"])
    return {
        "STUDYBRIDGE_TLS_CLIENT_CERT_FILE": str(cert),
        "STUDYBRIDGE_TLS_CLIENT_KEY_FILE": str(key),
        "STUDYBRIDGE_TLS_CA_FILE": str(pki.ca_file),
        "STUDYBRIDGE_ACSE_TIMEOUT": "10",
    }


def _tls_pacs(pki: Pki) -> tuple[Path, Path, Path]:
    key, cert = pki.issue("pacs", ips=["127.0.0.1"], server=True)
    return key, cert, pki.ca_file


def _rogue_ca(tmp_path: Path) -> Path:
    folder = tmp_path / "rogue"
    folder.mkdir()
    _key, cert = make_ca(folder, "Rogue CA")
    path = folder / "rogue-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@contextlib.contextmanager
def _setup(pki: Pki, tmp_path: Path, count: int) -> Iterator[tuple[Gateway, Path, list[Path]]]:
    """A gateway (not serving yet) holding a study of ``count`` instances, and the TLS
    PACS registered as SECURE and again as SPOOFED: the same PACS, but we are told
    to trust another CA for it. Yields the gateway, the PACS's folder, the sources."""
    sources = ct_series(tmp_path / "study", count)
    with (
        running_gateway(tmp_path, _gateway_env(pki)) as gw,
        storescp(tmp_path, "SECURE", tls=_tls_pacs(pki)) as (port, out),
    ):
        gw.cli("import", str(tmp_path / "study"), "--institution", "Test Hospital")
        gw.cli(
            "peers",
            "add",
            "SECURE",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tls",
            "--institution",
            "Test Hospital",
        )
        gw.cli(
            "peers", "add", "SPOOFED", "--host", "127.0.0.1", "--port", str(port), "--tls",
            "--institution", "Test Hospital",
            "--tls-ca-file", str(_rogue_ca(tmp_path)),
        )  # fmt: skip
        yield gw, out, sources


def test_forward_to_a_tls_pacs_and_a_wrong_ca_refused(pki: Pki, tmp_path: Path) -> None:
    with _setup(pki, tmp_path, 3) as (gw, out, sources):
        study_uid = str(pydicom.dcmread(sources[0]).StudyInstanceUID)
        assert "SECURE" in gw.cli("peers", "list").stdout
        refused = gw.cli(
            "forward", study_uid, "--to", "SPOOFED", "--max-attempts", "1", "--json",
            *gw.staff(), check=False,
        )  # fmt: skip
        job = json.loads(refused.stdout)
        assert refused.returncode == 1 and job["status"] == "failed"
        assert "certificate does not verify" in job["last_error"]
        assert not [p for p in out.iterdir() if p.is_file()]

        done = gw.cli("forward", study_uid, "--to", "SECURE", "--json", "--as", "clerk")
        job = json.loads(done.stdout)
        assert job["status"] == "done" and job["instances"]["sent"] == 3
        originals = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in sources}
        received = [p for p in out.iterdir() if p.is_file()]
        assert len(received) == 3
        for path in received:
            assert dataset_bytes(path) == originals[pydicom.dcmread(path).SOPInstanceUID]


def test_c_move_to_a_tls_destination(pki: Pki, tmp_path: Path) -> None:
    with _setup(pki, tmp_path, 2) as (gw, out, sources):
        study_uid = str(pydicom.dcmread(sources[0]).StudyInstanceUID)
        gw.cli(
            "peers", "add", "VIEWER", "--host", "127.0.0.1", "--port", "104",
            "--institution", "Test Hospital",
        )  # fmt: skip
        gw.env["STUDYBRIDGE_PROFILE"] = "demo"  # the profile, without --demo's seeded studies
        gw.start("--dimse-workers", "1")
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study_uid

            def final(destination: str) -> Dataset:
                answers = list(
                    assoc.send_c_move(
                        query, destination, StudyRootQueryRetrieveInformationModelMove
                    )
                )
                return answers[-1][0]

            assert final("SPOOFED").Status == 0xA801  # destination unreachable for us
            assert not [p for p in out.iterdir() if p.is_file()]
            status = final("SECURE")
            assert status.Status == 0x0000, status
            assert status.NumberOfCompletedSuboperations == 2
        finally:
            assoc.release()
        assert len([p for p in out.iterdir() if p.is_file()]) == 2
        assert "certificate verify failed" in gw.log_text()


@pytest.mark.fast
def test_association_failures_say_why(pki: Pki, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dimse_connect_timeout=2, acse_timeout=2)
    closed = Peer("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(AssociationFailed, match="unreachable") as failure:
        associate(settings, closed, _echo_context())
    assert failure.value.transient
    no_ca = Peer("TLSPEER", "127.0.0.1", free_port(), tls=True)
    with pytest.raises(AssociationFailed, match="no CA is configured") as failure:
        associate(settings, no_ca, _echo_context())
    assert not failure.value.transient


@pytest.mark.fast
def test_peer_tls_options_are_checked_and_kept(archive: Archive, pki: Pki) -> None:
    registry = PeerRegistry(archive.db)
    with pytest.raises(PeerError, match="need --tls"):
        registry.add("A", "127.0.0.1", 104, tls_ca_file=str(pki.ca_file))
    with pytest.raises(PeerError, match="does not exist"):
        registry.add("A", "127.0.0.1", 104, tls=True, tls_ca_file="/nonexistent/ca.pem")
    registry.add(
        "B", "pacs.example", 2762, tls=True, tls_ca_file=str(pki.ca_file), tls_server_name="x"
    )
    peer = PeerRegistry(archive.db).get("B")
    assert peer is not None
    assert (peer.tls, peer.tls_ca_file, peer.tls_server_name) == (
        True,
        str(pki.ca_file.resolve()),
        "x",
    )


def _echo_context() -> list[PresentationContext]:
    return [build_context(Verification)]
