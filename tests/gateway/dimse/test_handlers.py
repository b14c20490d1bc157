"""C-STORE answers of an in-process receiving server when the blob store's flush fails:
every instance of the flush's round gets a retryable failure and nothing is indexed;
and the staged file ``store_instance`` is given never survives it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from gateway.archive import Archive, blobstore
from gateway.archive.errors import StorageUnavailable
from gateway.archive.models import Instance
from gateway.config import Settings
from gateway.dimse import status
from gateway.dimse.handlers import Handlers
from gateway.peers import PeerRegistry
from tests.factories import ct_slice, uid, write
from tests.gateway.dimse.helpers import in_process_node

pytestmark = pytest.mark.fast
SENDERS = 3


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Archive]]:
    with in_process_node(tmp_path, "FLUSHSCU") as started:
        yield started


def _indexed(archive: Archive) -> int:
    with archive.db.read_conn() as conn:
        return conn.scalar(select(func.count()).select_from(Instance.__table__))


def _push_at_once(settings: Settings, datasets: list[Any]) -> list[int | None]:
    """One association per data set, all sending at the same moment."""
    statuses: list[int | None] = [None] * len(datasets)
    barrier = threading.Barrier(len(datasets))

    def send(i: int) -> None:
        ae = AE(ae_title="FLUSHSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.dimse_port, ae_title=settings.ae_title)
        assert assoc.is_established
        try:
            barrier.wait(10)
            rsp = assoc.send_c_store(datasets[i])
            statuses[i] = rsp.get("Status") if rsp is not None else None
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(datasets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def test_a_failed_blob_flush_answers_every_sender_out_of_resources_and_indexes_nothing(
    node: tuple[Settings, Archive], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, archive = node
    rounds: list[int] = []
    sync = blobstore.FileStore.sync

    def failing_sync(self: blobstore.FileStore, placed: list[blobstore.Placed]) -> None:
        rounds.append(len(placed))
        if any(p.file is not None for p in placed):  # a new blob's bytes to flush
            raise StorageUnavailable("blob store cannot write: Input/output error")
        sync(self, placed)

    monkeypatch.setattr(blobstore.FileStore, "sync", failing_sync)
    study, series = uid(), uid()
    datasets = [ct_slice(study_uid=study, series_uid=series) for _ in range(SENDERS)]
    statuses = _push_at_once(settings, datasets)
    # Out of Resources (A7xx): each sender may send its instance again.
    assert all(s is not None and s >> 8 == 0xA7 for s in statuses), statuses
    assert sum(rounds) == SENDERS  # every instance waited for a flush, none succeeded
    assert _indexed(archive) == 0

    monkeypatch.undo()
    assert _push_at_once(settings, datasets) == [0x0000] * SENDERS
    assert _indexed(archive) == SENDERS


class _Association:
    """What ``store_instance`` asks of an association (weakly referenced: a class)."""

    requestor = SimpleNamespace(ae_title="FLUSHSCU", address="127.0.0.1")


def test_store_instance_consumes_the_staged_file_whatever_the_outcome(
    node: tuple[Settings, Archive], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settings, archive = node
    handlers = Handlers(archive, PeerRegistry(archive.db))
    assoc = _Association()
    stored = write(ct_slice(), tmp_path / "stored.dcm")
    assert handlers.store_instance(stored, assoc) == (status.SUCCESS, "")
    refused = tmp_path / "refused.dcm"
    refused.write_bytes(b"not dicom at all" * 20)
    assert handlers.store_instance(refused, assoc)[0] != status.SUCCESS

    def no_source(_assoc: Any) -> None:
        raise RuntimeError("peer registry unreadable")

    monkeypatch.setattr(handlers, "_source", no_source)
    unsourced = write(ct_slice(), tmp_path / "unsourced.dcm")
    assert handlers.store_instance(unsourced, assoc)[0] == status.STORE_PROCESSING_FAILURE
    assert not stored.exists() and not refused.exists() and not unsourced.exists()
    assert _indexed(archive) == 1
