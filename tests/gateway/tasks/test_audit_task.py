"""The periodic audit task: signed checkpoints (on beat and in ``serve``), and audit
records shipped to a syslog collector over TLS (RFC 5425), a real TLS listener
started by the test."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from consent import audit
from consent.audit import Attempt, Auditor
from consent.principals import Kind, Principal
from consent.syslog import BOM, MSGID, SyslogTLS, ship
from gateway.archive import Archive
from gateway.config import Settings
from gateway.tasks.audit import audit_checkpoint
from gateway.tasks.celery_app import make_celery
from gateway.tasks.registry import TaskContext
from tests.pki import Pki, make_ca
from tests.servers import running_gateway

WHO = Principal(kind=Kind.STAFF, id=7, name="dr\r\nforged", institution="East")


def _fill(archive: Archive, n: int, chain: str | None = None) -> None:
    auditor = Auditor(archive.db, chain=chain)
    for i in range(n):
        auditor.record(Attempt(WHO, "dicomweb", "view", "allowed", study_uid=f"1.2.3.{i}"))
    auditor.close()


@pytest.mark.fast
def test_checkpoint_task_signs_every_chain_head(archive: Archive, settings: Settings):
    _fill(archive, 3)
    result = audit_checkpoint(TaskContext(archive, settings))
    assert result == {"chains": 1, "shipped": 0}
    key = audit.load_or_create_signing_key(settings.resolved_audit_key_file)
    report = audit.verify(archive.db, settings.resolved_audit_checkpoint_file, key.public_key())
    assert report.ok and report.checkpoints == 1


@pytest.mark.fast
def test_beat_schedules_the_checkpoint(settings: Settings):
    settings.task_broker_url = "memory://"
    settings.audit_checkpoint_interval = 600
    entry = make_celery(settings).conf.beat_schedule["audit-checkpoint"]
    assert entry["task"] == "studybridge.audit_checkpoint" and entry["schedule"] == 600
    settings.audit_checkpoint_interval = 0
    assert "audit-checkpoint" not in make_celery(settings).conf.beat_schedule


@pytest.mark.integration
def test_serve_appends_checkpoints_in_process(tmp_path: Path):
    env = {"STUDYBRIDGE_AUDIT_CHECKPOINT_INTERVAL": "1"}
    with running_gateway(tmp_path, env) as gw:
        gw.start()
        checkpoints = gw.data_dir / "audit" / "checkpoints.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_lines(checkpoints)) < 2:
            time.sleep(0.2)
        assert len(_lines(checkpoints)) >= 2, gw.log_text()[-2000:]
        assert gw.stop() == 0
    verified = gw.cli("audit", "verify")
    assert "audit trail intact" in verified.stdout


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- syslog over TLS ----------------------------------------------------------------------
class Collector:
    """A syslog/TLS collector on 127.0.0.1 reading octet-counted frames (RFC 5425)."""

    def __init__(self, key: Path, cert: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frames: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self._read(tls.makefile("rb"))
                    tls.unwrap()  # answer the client's close_notify
            except (ssl.SSLError, OSError):
                continue  # a client that did not trust us

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        while True:
            digits = b""
            while (c := stream.read(1)) not in (b" ", b""):
                digits += c
            if not digits:
                return
            self.frames.append(stream.read(int(digits)))

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.frames

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[Collector, Pki]]:
    folder = tmp_path / "pki"
    folder.mkdir()
    key, cert = make_ca(folder)
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki = Pki(folder, key, cert)
    server_key, server_cert = pki.issue("collector", ips=["127.0.0.1"], server=True)
    running = Collector(server_key, server_cert)
    try:
        yield running, pki
    finally:
        running.close()


@pytest.mark.integration
def test_records_go_to_syslog_over_tls_once_each(
    archive: Archive, settings: Settings, collector: tuple[Collector, Pki], tmp_path: Path
):
    server, pki = collector
    _fill(archive, 3, chain="chain-a")
    _fill(archive, 2, chain="chain-b")
    settings.audit_syslog_host = "127.0.0.1"
    settings.audit_syslog_port = server.port
    settings.audit_syslog_ca_file = pki.ca_file
    result = audit_checkpoint(TaskContext(archive, settings))
    assert result == {"chains": 2, "shipped": 5}
    frames = server.wait_for(5)
    assert len(frames) == 5
    for data in frames:
        header, _bom, xml = data.partition(BOM)
        fields = header.decode().split(" ")
        assert fields[0] == "<85>1" and fields[3] == "studybridge" and fields[5] == MSGID
        message = ET.fromstring(xml.decode("utf-8"))
        assert message.tag == "AuditMessage"
        # A forged CR/LF in a name stays inside one frame (escaped in the XML).
        assert b"\r\n" not in xml
    # Sent once: the next run sends only what is new.
    _fill(archive, 1, chain="chain-c")  # a new process's chain
    assert audit_checkpoint(TaskContext(archive, settings))["shipped"] == 1
    assert len(server.wait_for(6)) == 6
    assert audit_checkpoint(TaskContext(archive, settings))["shipped"] == 0


@pytest.mark.integration
def test_an_untrusted_collector_gets_nothing_and_nothing_is_lost(
    archive: Archive, collector: tuple[Collector, Pki], tmp_path: Path
):
    server, _pki = collector
    _fill(archive, 2)
    other = tmp_path / "other"
    other.mkdir()
    _key, other_ca = make_ca(other, "Another CA")
    (other / "ca.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    cursor = tmp_path / "cursor.json"
    with pytest.raises(ssl.SSLCertVerificationError):
        ship(archive.db, SyslogTLS("127.0.0.1", server.port, ca_file=other / "ca.pem"), cursor)
    assert not cursor.exists() and server.frames == []
