"""The data phase of storage associations, read straight from the socket.

pynetdicom runs every association with two threads that poll (a DUL thread reading
PDUs in 4 KiB pieces into queues, and a reactor thread sleeping 1 ms between
looks at them) and builds several Python objects per PDV. For an association that
only stores (every accepted context a storage SOP class, or Verification) that
machinery is most of the CPU time per instance, so once pynetdicom has negotiated
such an association, ``StorageReceiver`` takes its socket and serves the data
phase itself, in the association's thread, with blocking reads:

- a P-DATA-TF PDU is read item by item; command fragments are collected (a command
  set is at most ``MAX_COMMAND`` bytes); data set fragments of a C-STORE go from the
  socket into a reused buffer (1 MiB), which is written into the staging file (whose
  preamble and file meta information were written first) and hashed (SHA-256)
  whenever it is full and at the end of the data set: memory does not grow with the
  size of the instance, and the archive need not read the file again to hash it;
- a complete C-STORE goes to ``store(path, digests)`` (the archive's one ingest,
  through the DIMSE handlers), which consumes the staging file (moves it into the
  store or deletes it) whenever it returns a status, and its status is answered
  with the byte-level C-STORE-RSP encoder; C-ECHO is answered at once;
- A-RELEASE-RQ is answered with A-RELEASE-RP; A-ABORT closes; anything else (an
  unknown or unexpected PDU, a PDV of a context that was not accepted, a command
  other than C-STORE/C-ECHO, a malformed item) is answered with an A-ABORT (source:
  service provider) and the connection is closed, as pynetdicom's state machine does;
- no PDU for ``network_timeout`` seconds: A-ABORT (pynetdicom's idle timeout).

``request_stop`` (server shutdown) lets a message being received or stored finish
and be answered, then aborts the association; an association waiting between
messages is aborted at once (over TLS: its connection is closed at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.archive import Digests
from gateway.archive.blobstore import start_writeback
from gateway.dimse.fastpath import FastFileMeta, encode_c_response, encode_file_meta

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
NO_DATASET = 0x0101
MAX_COMMAND = 64 * 1024  # a command set is a few hundred bytes; refuse absurd ones
_CHUNK = 1024 * 1024  # socket-to-file copy buffer per association
_READ_BUFFER = 64 * 1024  # socket read buffering: PDU and item headers come from here

# Abort reasons (PS3.8 9.3.8, source 2 = service provider).
_UNRECOGNISED_PDU = 0x01
_UNEXPECTED_PDU = 0x02
_INVALID_PARAMETER = 0x06

_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_PREAMBLE = b"\x00" * 128 + b"DICM"

# What ``store`` returns: a DIMSE status and an Error Comment ("" for none).
StoreResult = tuple[int, str]


class _Abort(Exception):
    """The peer broke the protocol: answer with an A-ABORT and close."""

    def __init__(self, reason: int, why: str) -> None:
        super().__init__(why)
        self.reason = reason


class _Closed(Exception):
    """The connection ended (peer closed it, or we stopped reading)."""


def _abort_pdu(source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


def _command_fields(data: bytes) -> dict[int, bytes]:
    """Element number -> value of a command set (group 0000, implicit VR little endian)."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise _Abort(_INVALID_PARAMETER, "truncated command element")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise _Abort(_INVALID_PARAMETER, "malformed command set")
        fields[elem] = data[pos : pos + length]
        pos += length
    return fields


def _us(fields: dict[int, bytes], elem: int) -> int | None:
    value = fields.get(elem)
    if value is None or len(value) != 2:
        return None
    return int.from_bytes(value, "little")


def _ui(fields: dict[int, bytes], elem: int) -> str:
    return fields.get(elem, b"").rstrip(b"\x00 ").decode("ascii", "replace")


# Staging names: unique in the process by the counter, among the receiving processes
# sharing the folder by the pid; O_EXCL catches a leftover of an earlier process that
# had the same pid. (tempfile.mkstemp draws and joins a random name per file: a few
# tens of microseconds of Python per instance for nothing we need.)
_staging_names = itertools.count()
_STAGING_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def create_staging_file(folder: Path) -> tuple[int, Path]:
    """A new, empty file in ``folder`` (mode 0600), open for writing: fd and path."""
    pid = os.getpid()
    while True:
        path = folder / f"rx-{pid}-{next(_staging_names)}.dcm"
        try:
            return os.open(path, _STAGING_FLAGS, 0o600), path
        except FileExistsError:
            continue


class StorageReceiver:
    """Serves the data phase of one storage association on its socket."""

    def __init__(
        self,
        sock: socket.socket,
        contexts: dict[int, Any],
        store: Callable[[Path, Digests], StoreResult],
        *,
        staging_dir: Path,
        network_timeout: float | None,
        peer_max_pdu: int,
    ) -> None:
        self.sock = sock
        # Context ID -> (abstract syntax, transfer syntax) of the accepted contexts.
        self.contexts = {
            cid: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cid, cx in contexts.items()
        }
        self.store = store
        self.staging_dir = staging_dir
        self.peer_max_pdu = peer_max_pdu
        self.outcome = ""  # "released", "aborted" (by the peer), "closed", or "abort-sent"
        self._stop = False
        self._idle = False
        self._lock = threading.Lock()
        sock.settimeout(network_timeout)
        self._rfile = sock.makefile("rb", buffering=_READ_BUFFER)
        self._buffer = memoryview(bytearray(_CHUNK))
        # The message being received.
        self._command = bytearray()
        self._fields: dict[int, bytes] | None = None
        self._context = 0
        self._file: Any = None
        self._path: Path | None = None
        self._meta_offset = 0
        self._meta_digest = ""
        self._digest: Any = None  # SHA-256 of the data set bytes written so far
        self._filled = 0  # data set bytes in the buffer, not yet written

    # -- control from other threads -------------------------------------------------
    def request_stop(self) -> None:
        """Finish the message in progress, then abort; abort now if between messages."""
        with self._lock:
            self._stop = True
            if self._idle:
                # Wakes the blocked read; the loop sees the stop and sends an A-ABORT.
                # Over TLS the session cannot be written while a read is pending in
                # another thread, so the connection is simply closed there.
                how = socket.SHUT_RDWR if isinstance(self.sock, ssl.SSLSocket) else socket.SHUT_RD
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.sock, how)

    # -- main loop ------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._serve()
        except _Abort as exc:
            log.warning("aborting storage association: %s", exc)
            self._send_abort(_abort_pdu(0x02, exc.reason))
        except TimeoutError:
            log.warning("network timeout: aborting idle storage association")
            self._send_abort(_abort_pdu(0x00, 0x00))
        except _Closed:
            if self._stop:
                self._send_abort(_abort_pdu(0x00, 0x00))
            elif not self.outcome:
                self.outcome = "closed"
        except OSError as exc:
            if self._stop:  # the read woken by request_stop failed (TLS: an EOF error)
                self._send_abort(_abort_pdu(0x00, 0x00))
            else:
                log.info("storage association connection lost: %s", exc)
                self.outcome = self.outcome or "closed"
        finally:
            self._discard_partial()
            with contextlib.suppress(OSError):
                self._rfile.close()

    def _serve(self) -> None:
        rfile = self._rfile
        while True:
            between = self._fields is None and not self._command
            if between:
                with self._lock:
                    if self._stop:
                        raise _Closed
                    self._idle = True
            header = rfile.read(6)
            if between:
                with self._lock:
                    self._idle = False
            if len(header) < 6:
                raise _Closed
            pdu_type, _reserved, length = struct.unpack(">BBI", header)
            if pdu_type == 0x04:
                self._p_data(length)
            elif pdu_type == 0x05:
                self._exactly(length)
                if not between:
                    raise _Abort(_UNEXPECTED_PDU, "release requested in the middle of a message")
                self.sock.sendall(_RELEASE_RP)
                self.outcome = "released"
                return
            elif pdu_type == 0x07:
                self.outcome = "aborted"
                return
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise _Abort(_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")
            else:
                raise _Abort(_UNRECOGNISED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")

    def _exactly(self, count: int) -> bytes:
        data = self._rfile.read(count)
        if len(data) < count:
            raise _Closed
        return data

    def _p_data(self, length: int) -> None:
        remaining = length
        while remaining:
            if remaining < 6:
                raise _Abort(_INVALID_PARAMETER, "truncated presentation data value item")
            item_length, context_id, control = struct.unpack(">IBB", self._exactly(6))
            value_length = item_length - 2
            if item_length < 2 or item_length + 4 > remaining:
                raise _Abort(_INVALID_PARAMETER, "presentation data value item overruns its PDU")
            remaining -= item_length + 4
            if context_id not in self.contexts:
                raise _Abort(_INVALID_PARAMETER, f"PDV for context {context_id} not accepted")
            if control & 0x01:
                self._command_fragment(context_id, control, value_length)
            else:
                self._dataset_fragment(context_id, control, value_length)

    def _command_fragment(self, context_id: int, control: int, length: int) -> None:
        if self._fields is not None:
            raise _Abort(_UNEXPECTED_PDU, "command fragment while a data set was expected")
        if len(self._command) + length > MAX_COMMAND:
            raise _Abort(_INVALID_PARAMETER, "command set too large")
        self._command += self._exactly(length)
        if not control & 0x02:
            return
        fields = _command_fields(bytes(self._command))
        self._command.clear()
        self._context = context_id
        command = _us(fields, 0x0100)
        has_dataset = _us(fields, 0x0800) != NO_DATASET
        if command == C_ECHO_RQ and not has_dataset:
            self._respond(fields, 0x8030, 0x0000, "")
        elif command == C_STORE_RQ and has_dataset:
            self._fields = fields
            self._open_staging(fields, context_id)
        elif command == C_STORE_RQ:
            self._respond(fields, 0x8001, 0xC0FF, "no data set received")
        else:
            raise _Abort(_UNEXPECTED_PDU, f"DIMSE command 0x{command or 0:04X} not served here")

    def _open_staging(self, fields: dict[int, bytes], context_id: int) -> None:
        fd, self._path = create_staging_file(self.staging_dir)
        self._file = open(fd, "wb", buffering=0)  # noqa: SIM115 - closed by _finish/_discard
        meta = FastFileMeta(_ui(fields, 0x0002), _ui(fields, 0x1000), self.contexts[context_id][1])
        head = _PREAMBLE + encode_file_meta(meta)
        self._write(head)
        self._meta_offset = len(head)
        self._meta_digest = hashlib.sha256(head).hexdigest()
        self._digest = hashlib.sha256()
        self._filled = 0

    def _write(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def _dataset_fragment(self, context_id: int, control: int, length: int) -> None:
        if self._fields is None:
            raise _Abort(_UNEXPECTED_PDU, "data set fragment without a command")
        if context_id != self._context:
            raise _Abort(_INVALID_PARAMETER, "data set fragment on another context")
        # Fragments (one per PDU, a few per instance) are gathered in the buffer and
        # written and hashed a buffer at a time: one write and one hash update for an
        # instance smaller than the buffer, instead of one of each per fragment.
        buffer, rfile = self._buffer, self._rfile
        while length:
            if self._filled == _CHUNK:
                self._flush()
            end = self._filled + min(length, _CHUNK - self._filled)
            got = rfile.readinto(buffer[self._filled : end])
            if not got:
                raise _Closed
            self._filled += got
            length -= got
        if control & 0x02:
            self._flush()
            self._finish()

    def _flush(self) -> None:
        """Write and hash the data set bytes gathered in the buffer."""
        if self._file is not None and self._filled:
            part = self._buffer[: self._filled]
            try:
                self._write(part)
                self._digest.update(part)
            except OSError as exc:
                # Keep reading the data set (the sender is still sending it), answer
                # with a retryable failure at the end.
                log.warning("staging write failed: %s", exc)
                self._drop_file()
        self._filled = 0

    def _finish(self) -> None:
        fields = self._fields
        assert fields is not None
        path, staged = self._path, self._file is not None
        if staged:
            # The fsync that makes this file a blob comes after the header is checked:
            # let the disk start on the bytes meanwhile.
            start_writeback(self._file.fileno())
        self._close_file()
        if staged and path is not None:
            digests = Digests(self._meta_offset, self._meta_digest, self._digest.hexdigest())
            try:
                code, comment = self.store(path, digests)
            except BaseException:
                # ``store`` consumes the file when it answers; not when it fails.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                raise
        else:
            code, comment = 0xA700, "could not stage the data set; retry"
        self._fields, self._path = None, None
        self._respond(fields, 0x8001, code, comment)

    def _respond(self, fields: dict[int, bytes], command: int, status: int, comment: str) -> None:
        encoded = encode_c_response(
            command,
            _ui(fields, 0x0002),
            _us(fields, 0x0110) or 0,
            status,
            comment,
            _ui(fields, 0x1000),
        )
        # Fragment only for a peer with a tiny maximum PDU length (0 = unlimited).
        room = self.peer_max_pdu - 6 if self.peer_max_pdu else len(encoded)
        room = max(room, 1)
        pieces = [encoded[i : i + room] for i in range(0, len(encoded), room)]
        out = bytearray()
        for n, piece in enumerate(pieces):
            control = 0x03 if n == len(pieces) - 1 else 0x01
            out += struct.pack(
                ">BBIIBB", 0x04, 0, len(piece) + 6, len(piece) + 2, self._context, control
            )
            out += piece
        self.sock.sendall(out)
        if self._stop:
            raise _Closed

    # -- cleanup --------------------------------------------------------------------
    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _drop_file(self) -> None:
        self._close_file()
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    def _discard_partial(self) -> None:
        if self._file is not None or self._path is not None:
            self._drop_file()
            self._path = None

    def _send_abort(self, pdu: bytes) -> None:
        self.outcome = "abort-sent"
        with contextlib.suppress(OSError):
            self.sock.sendall(pdu)
