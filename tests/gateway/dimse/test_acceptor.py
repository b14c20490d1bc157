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
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

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


IDLE = 1.0  # seconds: the node's network (idle) timeout in the next test


@pytest.fixture
def impatient_node(tmp_path: Path) -> Iterator[tuple[Settings, Archive]]:
    with in_process_node(tmp_path, "SLOWSCU", network_timeout=IDLE) as started:
        yield started


@pytest.mark.parametrize("mixed", [True, False], ids=["store-and-find", "store-only"])
def test_a_store_slower_than_the_idle_timeout_is_answered(
    impatient_node: tuple[Settings, Archive], monkeypatch: pytest.MonkeyPatch, mixed: bool
) -> None:
    """The idle timeout is for a silent peer. A sender waiting for our answer is not
    silent: a store that takes longer than the timeout (a loaded machine, a slow
    flush) is answered, and the association goes on serving."""
    settings, archive = impatient_node
    ingest_file = Archive.ingest_file

    def slow(self: Archive, *args: object, **kwargs: object) -> object:
        time.sleep(IDLE * 2)
        return ingest_file(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Archive, "ingest_file", slow)
    first, second = ct_slice(), ct_slice()
    ae = AE(ae_title="SLOWSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    if mixed:  # pynetdicom's reactor serves it, not our storage receiver
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", settings.dimse_port, ae_title=settings.ae_title)
    assert assoc.is_established
    try:
        for ds in (first, second):
            status = assoc.send_c_store(ds)
            assert status is not None and status.get("Status") == 0x0000, status
    finally:
        assoc.release()
    for ds in (first, second):
        stored = get_instance(
            archive.db, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        )
        assert stored.size > 0
