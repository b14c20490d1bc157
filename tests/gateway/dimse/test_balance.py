"""Receiving processes share the DIMSE port and the least busy one accepts."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.dimse.balance import HOLD_BACK, MAX_HOLD_BACK, AcceptBalance
from tests.servers import running_gateway


class _Sock:
    def __init__(self) -> None:
        self.open = True

    def fileno(self) -> int:
        return 5 if self.open else -1


@pytest.mark.fast
def test_a_busier_process_holds_back_in_proportion_and_briefly() -> None:
    counts = [0, 0, 0]
    mine = AcceptBalance(counts, 1)
    assert mine.hold_back() == 0
    socks = [_Sock() for _ in range(30)]
    mine.opened(socks[0])
    assert counts == [0, 1, 0]
    assert mine.hold_back() == HOLD_BACK
    for sock in socks[1:]:
        mine.opened(sock)
    assert mine.hold_back() == MAX_HOLD_BACK
    # Everyone as busy: nobody waits.
    counts[0] = counts[2] = 30
    assert mine.hold_back() == 0
    # Closed connections stop counting, whether or not shutdown_request saw them.
    mine.closed(socks[0])
    for sock in socks[1:20]:
        sock.open = False
    assert mine.hold_back() == 0
    assert counts[1] == 10
    # A restarted process starts from zero.
    assert AcceptBalance(counts, 1).counts[1] == 0


@pytest.mark.integration
def test_serve_spreads_connections_over_its_receiving_processes(tmp_path: Path) -> None:
    with running_gateway(tmp_path, {"STUDYBRIDGE_ACCEPT_UNKNOWN_PEERS": "true"}) as gw:
        gw.start("--dimse-workers", "3")
        conns = []
        try:
            for _ in range(9):
                conns.append(socket.create_connection(("127.0.0.1", gw.dimse_port)))
                time.sleep(0.05)
            time.sleep(0.5)
            out = subprocess.run(
                ["ss", "-tnpH", "state", "established", f"( sport = :{gw.dimse_port} )"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        finally:
            for conn in conns:
                conn.close()
        owners = Counter(re.findall(r"pid=(\d+)", out))
        assert sum(owners.values()) == 9, out
        # Evenly, give or take one the scheduler handed to a busier process first.
        assert len(owners) == 3 and min(owners.values()) >= 2, out
