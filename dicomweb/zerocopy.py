"""Large bodies sent from their files by the kernel (``sendfile``), not through Python.

A WADO-RS study is mostly stored blobs sent as they are. Read into Python and
written to the socket, each byte is copied twice by the CPU on the way, and the
event loop handles every megabyte. With ``os.sendfile`` the kernel moves the blob's
pages from the page cache to the socket, and the server process touches none of
them.

An ASGI server only takes bodies as bytes messages, so this works below it, and only
where that is known to be safe:

- ``attach`` (called by the app at the very start of each HTTP request, before any
  middleware) recognises uvicorn's httptools protocol by the ``send`` it was given,
  on a plain TCP transport (never TLS: the kernel would send clear text), and puts a
  ``RawSink`` in the scope. Any other server, or a protocol object without the
  attributes used here, leaves the scope alone and bodies go the usual way.
- ``BatchedStream`` (dicomweb.streaming) uses the sink only after the status line
  and headers went out through the whole middleware chain, and only when uvicorn's
  write buffer is empty. The middlewares that rewrite bodies do so for JSON only
  (dicomweb.middleware); a stream using the sink is never JSON.
- The body is written on a duplicate of the socket's descriptor (so a connection
  that uvicorn closes meanwhile cannot hand its number to another connection under
  our writes), without blocking: a worker thread writes framing and ``sendfile``s
  spans until the socket is full, then the event loop waits for it to drain. A
  client that stops reading holds no thread.
- uvicorn counts the body bytes against its Content-Length: the bytes written here
  are taken off its count, so its own checks (too short, too long) still hold, and
  the body ends with its own last (empty) message.

A span whose source is not a regular file (an S3 object) is read and written in
the same thread, still without the event loop's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from dicomweb.multipart import FileSpan, Piece

RAW_SINK = "studybridge.raw_sink"
_READ_CHUNK = 1 << 20
# A thread's turn ends after this much, even if the socket still takes more, so the
# event loop sees disconnects and other requests get threads.
_TURN = 16 << 20
# Event loop turns to wait for uvloop to flush the headers before raw writes.
_HEADER_FLUSH_TURNS = 8
# What RawSink reads and writes of uvicorn's request cycle.
_CYCLE_ATTRIBUTES = (
    "transport",
    "response_started",
    "response_complete",
    "disconnected",
    "chunked_encoding",
    "expected_content_length",
)


class RawSink:
    """The socket under one uvicorn request cycle, and uvicorn's byte count."""

    def __init__(self, cycle: Any, sock: Any) -> None:
        self._cycle = cycle
        self._sock = sock

    async def ready(self) -> bool:
        """Whether raw writes may start: headers sent and flushed, still connected,
        and uvicorn counting a Content-Length. (uvloop writes what a transport was
        given at the end of the loop's turn: the headers may need a turn or two.)"""
        cycle = self._cycle
        for _turn in range(_HEADER_FLUSH_TURNS):
            if (
                not cycle.response_started
                or cycle.response_complete
                or cycle.disconnected
                or cycle.chunked_encoding is not False
            ):
                return False
            if cycle.transport.get_write_buffer_size() == 0:
                return True
            await asyncio.sleep(0)
        return False

    def dup(self) -> int:
        return os.dup(self._sock.fileno())

    def closed(self) -> None:
        """The client is gone: close the connection as uvicorn would."""
        self._cycle.transport.close()

    def written(self, count: int) -> None:
        """Take ``count`` raw-written bytes off uvicorn's Content-Length count."""
        cycle = self._cycle
        if count > cycle.expected_content_length:
            raise RuntimeError("response content longer than Content-Length")
        cycle.expected_content_length -= count


def attach(scope: dict[str, Any], send: Any) -> None:
    """Put a ``RawSink`` in ``scope`` when ``send`` is uvicorn's httptools protocol
    on plain TCP (see the module docstring)."""
    cycle = getattr(send, "__self__", None)
    if cycle is None or type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
        return
    if not all(hasattr(cycle, name) for name in _CYCLE_ATTRIBUTES):
        return
    transport = cycle.transport
    if transport.get_extra_info("sslcontext") is not None:
        return
    if transport.get_extra_info("ssl_object") is not None:
        return
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(sock, "fileno"):
        return
    scope[RAW_SINK] = RawSink(cycle, sock)


class _Writer:
    """Writes pieces on a non-blocking descriptor until it would block (worker thread)."""

    def __init__(self, fd: int, pieces: Iterator[Piece]) -> None:
        self.fd = fd
        self._pieces = pieces
        self._data: memoryview | None = None  # framing not yet written
        self._file: BinaryIO | None = None  # the current span's source
        self._span: FileSpan | None = None
        self._position = 0  # in the span's source
        self._left = 0  # of the span
        self._sendfile = False
        self.done = False

    def turn(self) -> int:
        """Write until the socket is full, the body done or a turn's worth sent:
        the count written."""
        written = 0
        while written < _TURN:
            if self._data is None and self._span is None and not self._next():
                self.done = True
                break
            try:
                written += self._write_some()
            except BlockingIOError:
                break
        return written

    def _next(self) -> bool:
        piece = next(self._pieces, None)
        if piece is None:
            return False
        if isinstance(piece, FileSpan):
            self._open(piece)
        elif piece:
            self._data = memoryview(piece)
        return True

    def _open(self, span: FileSpan) -> None:
        part = span.part
        assert part.source is not None and part.size is not None
        self._file = part.source()
        self._span = span
        self._position = part.offset + span.skip
        self._left = span.length
        try:
            fileno = self._file.fileno()
            info = os.fstat(fileno)
        except (OSError, AttributeError, ValueError):
            self._sendfile = False  # a stream (S3): read and write
            if self._position:
                self._file.seek(self._position)
            return
        self._sendfile = stat.S_ISREG(info.st_mode)
        if self._sendfile:
            end = part.offset + part.size
            if info.st_size < end or (span.whole and part.offset == 0 and info.st_size != end):
                # Never send a silently shortened or lengthened part.
                raise OSError(
                    f"blob holds {info.st_size} bytes where the index records {part.size}"
                )
        elif self._position:
            self._file.seek(self._position)

    def _write_some(self) -> int:
        if self._data is not None:
            count = os.write(self.fd, self._data)
            self._data = self._data[count:] if count < len(self._data) else None
            return count
        assert self._file is not None and self._span is not None
        if self._sendfile:
            count = os.sendfile(self.fd, self._file.fileno(), self._position, self._left)
            if count == 0:
                raise OSError(f"blob ended {self._left} bytes before its recorded size")
            self._position += count
        else:
            chunk = self._file.read(min(self._left, _READ_CHUNK))
            if not chunk:
                raise OSError(f"blob ended {self._left} bytes before its recorded size")
            self._data = memoryview(chunk)
            count = 0  # written by the next call, framing-like
            self._left -= len(chunk)
            if not self._left:
                self._end_span()
            return count
        self._left -= count
        if not self._left:
            self._end_span()
        return count

    def _end_span(self) -> None:
        span, fh = self._span, self._file
        self._span = self._file = None
        assert span is not None and fh is not None
        with fh:
            if span.whole and not self._sendfile and span.part.offset == 0 and fh.read(1):
                raise OSError("blob is longer than its recorded size")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


async def send_raw(sink: RawSink, pieces: Iterator[Piece], run_sync: Any) -> None:
    """Write ``pieces`` on the sink's socket (see the module docstring); ``run_sync``
    runs a function in a worker thread."""
    loop = asyncio.get_running_loop()
    fd = sink.dup()
    writer = _Writer(fd, pieces)
    try:
        while True:
            count = await run_sync(writer.turn)
            sink.written(count)
            if writer.done:
                return
            await _writable(loop, fd)
    finally:
        # The thread's turn is over (run_sync is not abandoned on cancellation).
        writer.close()
        os.close(fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    drained = loop.create_future()
    loop.add_writer(fd, lambda: drained.done() or drained.set_result(None))
    try:
        await drained
    finally:
        loop.remove_writer(fd)
