"""Which receiving process accepts a new connection: the least busy one.

``studybridge serve`` binds the DIMSE port once and its receiving processes all
accept from that socket. A new connection wakes every process and the first to
call ``accept`` takes it, which on a loaded machine is simply whichever the
scheduler runs first, often one already serving several associations under its
GIL. (``SO_REUSEPORT`` was no better: it spreads connections by a hash of their
addresses, and four associations often landed 3:1 or 4:0 on two processes.)

So each process publishes how many connections it serves in a shared array (one
slot per process, written only by its owner), and a process serving more than
the least busy one holds back a few milliseconds before accepting, giving that
one time to take the connection. If it does not (stopped, or slow to be
scheduled), the busier process accepts after the pause: nothing waits for long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import MutableSequence
from typing import Any

HOLD_BACK = 0.0025  # seconds per connection more than the least busy process
MAX_HOLD_BACK = 0.010


class AcceptBalance:
    """This process's slot in the shared connection counts of the receiving processes."""

    def __init__(self, counts: MutableSequence[int], index: int) -> None:
        self.counts = counts
        self.index = index
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        counts[index] = 0  # a restarted process starts afresh

    def hold_back(self) -> float:
        """Seconds to wait before accepting (0 when no process serves fewer)."""
        with self._lock:
            # Connections closed without shutdown_request (an error path) still count
            # until their socket is closed.
            self._open = {sock for sock in self._open if sock.fileno() != -1}
            mine = self.counts[self.index] = len(self._open)
        least = min(self.counts)
        return min((mine - least) * HOLD_BACK, MAX_HOLD_BACK)

    def wait(self) -> None:
        delay = self.hold_back()
        if delay > 0:
            time.sleep(delay)

    def opened(self, sock: Any) -> None:
        with self._lock:
            self._open.add(sock)
            self.counts[self.index] = len(self._open)

    def closed(self, sock: Any) -> None:
        with self._lock:
            self._open.discard(sock)
            self.counts[self.index] = len(self._open)
