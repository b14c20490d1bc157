"""The storage data phase (``receive.StorageReceiver``) over a real socket pair.

The peer side writes PDUs byte by byte as a sender would; the receiver runs in a
thread with a recording ``store``. Normal traffic is covered end to end by the
interop and robustness suites (dcmtk and pynetdicom senders); these tests cover
the protocol edges: fragments, release, aborts, malformed items, shutdown.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode

from gateway.archive import Digests
from gateway.dimse import receive
from gateway.dimse.receive import StorageReceiver, create_staging_file

pytestmark = pytest.mark.fast

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SOP = "1.2.3.4.5"


def _command(message_id: int = 1, with_dataset: bool = True) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = SOP
    req.Priority = 0
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0001 if with_dataset else 0x0101
    return encode(msg.command_set, True, True)


def _pdu(*items: tuple[int, int, bytes]) -> bytes:
    body = b"".join(struct.pack(">IBB", len(v) + 2, cid, mch) + v for cid, mch, v in items)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv(sock, 6)
    kind, _, length = struct.unpack(">BBI", header)
    return kind, _recv(sock, length)


def _recv(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _response(sock: socket.socket) -> Dataset:
    kind, body = _read_pdu(sock)
    assert kind == 0x04
    command = b""
    while body:
        length, _cid, mch = struct.unpack(">IBB", body[:6])
        command += body[6 : 4 + length]
        body = body[4 + length :]
        if not mch & 0x02:
            kind, body = _read_pdu(sock)
    return decode(io.BytesIO(command), True, True)


class Harness:
    def __init__(self, tmp: Path, peer_max_pdu: int = 0, status: tuple[int, str] = (0, "")):
        self.ours, self.peer = socket.socketpair()
        self.peer.settimeout(10)
        self.stored: list[bytes] = []
        self.digests: list[Digests] = []
        self.status = status
        contexts = {1: SimpleNamespace(abstract_syntax=CT, transfer_syntax=[EXPLICIT])}
        self.receiver = StorageReceiver(
            self.ours,
            contexts,
            self._store,
            staging_dir=tmp,
            network_timeout=5,
            peer_max_pdu=peer_max_pdu,
        )
        self.thread = threading.Thread(target=self.receiver.run, daemon=True)
        self.thread.start()
        self.tmp = tmp

    def _store(self, path: Path, digests: Digests) -> tuple[int, str]:
        self.stored.append(path.read_bytes())
        self.digests.append(digests)
        path.unlink()
        return self.status

    def send(self, data: bytes) -> None:
        self.peer.sendall(data)

    def finish(self) -> str:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.ours.close()
        self.peer.close()
        return self.receiver.outcome


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.peer.close()
    h.thread.join(10)


def test_store_in_fragments_then_release(harness: Harness) -> None:
    command = _command()
    dataset = b"\x08\x00\x18\x00UI\x0a\x001.2.3.4.5\x00" + bytes(range(256)) * 40
    # Command split over two PDVs, data set over three PDUs, one PDU holding two PDVs.
    harness.send(_pdu((1, 0x01, command[:10])))
    harness.send(_pdu((1, 0x03, command[10:]), (1, 0x00, dataset[:100])))
    harness.send(_pdu((1, 0x00, dataset[100:5000])))
    harness.send(_pdu((1, 0x02, dataset[5000:])))
    rsp = _response(harness.peer)
    assert rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 1
    assert rsp.AffectedSOPInstanceUID == SOP
    stored = harness.stored[0]
    assert stored[128:132] == b"DICM"
    assert stored.endswith(dataset)
    # Hashed on the way: the digests describe the very file handed over.
    digests = harness.digests[0]
    assert digests.dataset_offset == len(stored) - len(dataset)
    assert digests.meta == hashlib.sha256(stored[: digests.dataset_offset]).hexdigest()
    assert digests.dataset == hashlib.sha256(dataset).hexdigest()
    harness.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert _read_pdu(harness.peer)[0] == 0x06
    assert harness.finish() == "released"
    assert list(harness.tmp.iterdir()) == []  # nothing left in staging


def test_failure_status_and_comment_are_answered(tmp_path: Path) -> None:
    h = Harness(tmp_path, status=(0xA700, "store is full"))
    h.send(_pdu((1, 0x03, _command()), (1, 0x02, b"\x08\x00\x16\x00UI\x02\x001\x00")))
    rsp = _response(h.peer)
    assert rsp.Status == 0xA700 and rsp.ErrorComment == "store is full"
    h.peer.close()
    assert h.finish() == "closed"


def test_small_peer_pdu_gets_a_fragmented_response(tmp_path: Path) -> None:
    h = Harness(tmp_path, peer_max_pdu=64)
    h.send(_pdu((1, 0x03, _command()), (1, 0x02, b"\x08\x00\x16\x00UI\x02\x001\x00")))
    rsp = _response(h.peer)
    assert rsp.Status == 0 and rsp.AffectedSOPInstanceUID == SOP
    h.peer.close()
    h.finish()


def test_store_without_dataset_fails_and_echo_succeeds(harness: Harness) -> None:
    harness.send(_pdu((1, 0x03, _command(with_dataset=False))))
    assert _response(harness.peer).Status == 0xC0FF
    req = C_ECHO()
    req.MessageID = 5
    req.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(req)
    echo = encode(message.command_set, True, True)
    harness.send(_pdu((1, 0x03, echo)))
    rsp = _response(harness.peer)
    assert rsp.CommandField == 0x8030 and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 5
    assert harness.stored == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_pdu((3, 0x03, b"\x00" * 8)), 0x06),  # context not accepted
        (_pdu((1, 0x02, b"data before any command")), 0x02),
        (b"\x04\x00\x00\x00\x00\x08" + struct.pack(">IBB", 200, 1, 3) + b"xx", 0x06),  # overrun
        (b"\x01\x00\x00\x00\x00\x02\x00\x00", 0x02),  # association request in the data phase
        (b"\x09\x00\x00\x00\x00\x02\x00\x00", 0x01),  # unknown PDU type
        (_pdu((1, 0x03, b"\x00\x00\x00\x00\x04\x00")), 0x06),  # truncated command element
    ],
)
def test_protocol_errors_are_aborted(harness: Harness, payload: bytes, reason: int) -> None:
    harness.send(payload)
    kind, body = _read_pdu(harness.peer)
    assert kind == 0x07 and body[2:] == bytes([0x02, reason])
    assert harness.finish() == "abort-sent"


def test_peer_abort_and_truncated_message_leave_no_staging_file(harness: Harness) -> None:
    harness.send(_pdu((1, 0x03, _command()), (1, 0x00, b"\x08\x00" * 100)))
    time.sleep(0.2)
    harness.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert harness.finish() == "aborted"
    assert list(harness.tmp.iterdir()) == []
    assert harness.stored == []


def test_a_store_that_fails_leaves_no_staging_file(tmp_path: Path) -> None:
    """``store`` consumes the file when it answers; when it raises, the receiver
    removes it."""

    class Failing(Harness):
        def _store(self, path: Path, digests: Digests) -> tuple[int, str]:
            self.stored.append(path.read_bytes())
            raise OSError(5, "Input/output error")

    h = Failing(tmp_path)
    h.send(_pdu((1, 0x03, _command()), (1, 0x02, b"\x08\x00\x16\x00UI\x02\x001\x00")))
    assert h.finish() == "closed"
    assert len(h.stored) == 1
    assert list(tmp_path.iterdir()) == []


def test_staging_files_are_new_private_files_never_an_existing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leftover of an earlier process that had this pid is skipped, not reused."""
    monkeypatch.setattr(receive, "_staging_names", iter(range(3)))
    leftover = tmp_path / f"rx-{os.getpid()}-0.dcm"
    leftover.write_bytes(b"an earlier process's")
    fd1, first = create_staging_file(tmp_path)
    fd2, second = create_staging_file(tmp_path)
    os.close(fd1)
    os.close(fd2)
    assert leftover.read_bytes() == b"an earlier process's"
    assert [first.name, second.name] == [f"rx-{os.getpid()}-{n}.dcm" for n in (1, 2)]
    assert first.stat().st_size == 0 and first.stat().st_mode & 0o777 == 0o600


def test_a_failed_staging_write_is_a_retryable_failure_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buffer fills twice in this data set (made small here): the second write
    fails; the rest of the data set is read and dropped, the answer is Out of
    Resources, and the next C-STORE of the association is stored."""
    monkeypatch.setattr(receive, "_CHUNK", 1024)
    h = Harness(tmp_path)
    write, calls = h.receiver._write, []

    def failing_second_flush(data: object) -> None:
        calls.append(data)
        if len(calls) == 3:  # the file meta, the first buffer, then this one
            raise OSError(28, "No space left on device")
        write(data)

    monkeypatch.setattr(h.receiver, "_write", failing_second_flush)
    dataset = b"\x08\x00\x18\x00UI\x0a\x001.2.3.4.5\x00" + bytes(range(256)) * 20
    h.send(_pdu((1, 0x03, _command()), (1, 0x00, dataset[:1500])))
    h.send(_pdu((1, 0x00, dataset[1500:3000])))
    h.send(_pdu((1, 0x02, dataset[3000:])))
    rsp = _response(h.peer)
    assert rsp.Status == 0xA700 and h.stored == []
    assert list(tmp_path.iterdir()) == []
    h.send(_pdu((1, 0x03, _command(message_id=2)), (1, 0x00, dataset[:2000])))
    h.send(_pdu((1, 0x02, dataset[2000:])))
    rsp = _response(h.peer)
    assert rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 2
    assert h.stored[0].endswith(dataset)
    assert h.digests[0].dataset == hashlib.sha256(dataset).hexdigest()
    h.peer.close()
    assert h.finish() == "closed"
    assert list(tmp_path.iterdir()) == []


def test_stop_aborts_an_idle_association_at_once(harness: Harness) -> None:
    started = time.monotonic()
    harness.receiver.request_stop()
    kind, _body = _read_pdu(harness.peer)
    assert kind == 0x07
    assert harness.finish() == "abort-sent"
    assert time.monotonic() - started < 2


def test_stop_lets_the_message_in_progress_finish(harness: Harness) -> None:
    harness.send(_pdu((1, 0x03, _command()), (1, 0x00, b"\x08\x00\x16\x00")))
    time.sleep(0.2)
    harness.receiver.request_stop()
    harness.send(_pdu((1, 0x02, b"UI\x02\x001\x00")))
    assert _response(harness.peer).Status == 0  # answered ...
    assert _read_pdu(harness.peer)[0] == 0x07  # ... then aborted
    assert harness.finish() == "abort-sent"
    assert len(harness.stored) == 1


def test_idle_peer_is_aborted_after_the_network_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.receiver.sock.settimeout(0.3)
    assert _read_pdu(h.peer)[0] == 0x07
    assert h.finish() == "abort-sent"


def _tls_pair(tmp: Path) -> tuple[socket.socket, socket.socket]:
    """A connected pair of TLS sockets (server side first), self-signed certificate."""
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = tmp / "node.key", tmp / "node.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client = client_ctx.wrap_socket(b, do_handshake_on_connect=False)
    handshake = threading.Thread(target=server.do_handshake)
    handshake.start()
    client.do_handshake()
    handshake.join(10)
    return server, client


def test_stop_over_tls_closes_an_idle_association_at_once(tmp_path: Path) -> None:
    import ssl

    server, client = _tls_pair(tmp_path)
    stored: list[Path] = []
    contexts = {1: SimpleNamespace(abstract_syntax=CT, transfer_syntax=[EXPLICIT])}
    receiver = StorageReceiver(
        server,
        contexts,
        lambda path, _digests: (stored.append(path), (0, ""))[1],
        staging_dir=tmp_path,
        network_timeout=30,
        peer_max_pdu=0,
    )
    thread = threading.Thread(target=receiver.run, daemon=True)
    thread.start()
    client.settimeout(10)
    client.sendall(_pdu((1, 0x03, _command()), (1, 0x02, b"\x08\x00\x16\x00UI\x02\x001\x00")))
    assert _response(client).Status == 0  # TLS data phase works
    time.sleep(0.2)
    started = time.monotonic()
    receiver.request_stop()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 2
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        _read_pdu(client)  # the connection is gone, not held open
    client.close()
    server.close()
