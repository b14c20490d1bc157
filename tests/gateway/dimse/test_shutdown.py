"""``studybridge serve`` stops promptly: idle, dead and half-open connections never
hold shutdown for the whole grace period; a store in progress is still answered."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from tests.factories import ct_slice
from tests.servers import Gateway, running_gateway

pytestmark = pytest.mark.integration

GRACE = 20  # seconds: far longer than a prompt stop may take


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Gateway]:
    env = {"STUDYBRIDGE_SHUTDOWN_GRACE": str(GRACE), "STUDYBRIDGE_ACSE_TIMEOUT": "60"}
    with running_gateway(tmp_path, env) as gw:
        gw.cli(
            "peers",
            "add",
            "PYSCU",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
            "--institution",
            "Test Hospital",
        )
        gw.start("--dimse-workers", "2")
        yield gw


def _associate(node: Gateway, context: str) -> object:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    if context == CTImageStorage:
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    else:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def test_idle_and_dead_connections_do_not_hold_shutdown(node: Gateway) -> None:
    # A port probe that connects and goes away, and one that connects and never speaks.
    with socket.create_connection(("127.0.0.1", node.dimse_port)):
        pass
    silent = socket.create_connection(("127.0.0.1", node.dimse_port))
    # Established associations left idle: one storage-only, one query (pynetdicom's path).
    storing = _associate(node, CTImageStorage)
    assert storing.send_c_store(ct_slice()).Status == 0
    finding = _associate(node, StudyRootQueryRetrieveInformationModelFind)
    time.sleep(0.5)
    try:
        started = time.monotonic()
        assert node.stop() == 0, node.log_text()
        elapsed = time.monotonic() - started
        assert elapsed < 6, f"stop took {elapsed:.1f}s\n{node.log_text()}"
        # The idle associations were ended by the node (A-ABORT), not left hanging.
        deadline = time.monotonic() + 5
        while (storing.is_established or finding.is_established) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not storing.is_established and not finding.is_established
    finally:
        silent.close()
        for assoc in (storing, finding):
            if assoc.is_established:
                assoc.abort()
