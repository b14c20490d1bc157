"""Hand-over of a storage association's data phase from pynetdicom to our receiver.

``negotiate_association`` only queues the A-ASSOCIATE-AC; the DUL thread sends it
when it next runs. On a busy machine that can be long after the association thread
is ready for the data phase. These tests slow the DUL thread down on purpose and
check that the association is still served (before the fix, the association thread
gave up waiting after 0.1 s, pynetdicom's reactor then found the DUL thread stopped
and closed the connection without a word: the sender saw its first C-STORE aborted).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.archive import Archive
from gateway.archive.retrieve import get_instance
from gateway.config import Settings
from gateway.dimse import acceptor
from tests.factories import ct_slice
from tests.gateway.dimse.helpers import in_process_node

pytestmark = pytest.mark.fast

DELAY = 0.4  # seconds the DUL thread waits before sending the A-ASSOCIATE-AC


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Archive]]:
    with in_process_node(tmp_path, "SLOWSCU") as started:
        yield started


@pytest.fixture
def slow_dul(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DUL thread is not scheduled for a while after the association is accepted."""
    original = acceptor._DUL._process_recv_primitive

    def late(self: acceptor._DUL) -> bool:
        if self.state_machine.current_state == "Sta3" and self.to_provider_queue.queue:
            time.sleep(DELAY)
        return original(self)

    monkeypatch.setattr(acceptor._DUL, "_process_recv_primitive", late)


def test_store_is_served_when_the_association_response_goes_out_late(
    node: tuple[Settings, Archive], slow_dul: None
) -> None:
    settings, archive = node
    ds = ct_slice()
    ae = AE(ae_title="SLOWSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.dimse_port, ae_title=settings.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        # An empty status: the connection was dropped.
        assert status is not None and status.get("Status") == 0x0000, status
    finally:
        assoc.release()
    stored = get_instance(
        archive.db, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    assert stored.size > 0
