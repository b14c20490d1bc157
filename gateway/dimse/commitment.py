"""Storage Commitment Push Model SCP (PS3.4 Annex J): what studybridge holds, confirmed.

A peer (typically a closing clinic's PACS, before it deletes anything) sends an
N-ACTION (Action Type ID 1, "Request Storage Commitment") naming a Transaction UID
and the instances (Referenced SOP Sequence). We answer the N-ACTION at once, then
report the outcome in an N-EVENT-REPORT: Event Type 1 when every instance is held,
2 when some are not, with the held ones in Referenced SOP Sequence and the others
in Failed SOP Sequence with a Failure Reason (0x0112 no such object instance,
0x0119 class/instance conflict, 0x0110 processing failure).

"Held" means indexed: ingest commits the index only after the blob is durably
written, so an indexed instance is durably stored.

The report goes on the requesting association while it is still open (sent from
another thread once the N-ACTION response is out: pynetdicom pauses the
association's reactor for it); if the requester has released it, or does not
answer the report within a few seconds (it was releasing as we sent), or sending
fails, on a new association to the requester's registered peer address, where we
take the SCP role of Storage Commitment (SCP/SCU role selection).

Each result is kept in the index before it is reported, with how the report went
(``gateway.transfers.commitments``): the transfer report lists which instances
were confirmed to whom and when. A gateway crash between the two leaves the result
kept but unreported; the requester then asks again (PS3.4 J.3.3's transaction
timeout), which is safe because the answer only reads the index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import build_role, evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from gateway.archive.db import Database
from gateway.archive.models import Instance
from gateway.archive.uids import is_valid_uid
from gateway.config import Settings
from gateway.dimse import client
from gateway.peers import PeerRegistry
from gateway.transfers import commitments

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = str(StorageCommitmentPushModel)
# The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1
EVENT_ALL_SUCCEEDED = 1
EVENT_FAILURES_EXIST = 2

# Failure Reasons (PS3.3 C.14.1.1).
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110

# N-ACTION response statuses (PS3.7 10.1.4.1.10).
_SUCCESS = 0x0000
_NO_SUCH_ACTION = 0x0123
_INVALID_ARGUMENT = 0x0115
_MISTYPED_ARGUMENT = 0x0212
_CHUNK = 500  # SOP Instance UIDs per index query
# Seconds to wait for the requester's answer to a report on its own association.
SAME_ASSOCIATION_WAIT = 5.0


def commitment_result(
    db: Database, transaction_uid: str, references: list[tuple[str, str]]
) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information for these (class, instance) pairs."""
    held: dict[str, str] = {}
    failed_lookup = False
    uids = [sop for _cls, sop in references]
    try:
        with db.read_conn() as conn:
            for start in range(0, len(uids), _CHUNK):
                rows = conn.execute(
                    select(Instance.sop_uid, Instance.sop_class_uid).where(
                        Instance.sop_uid.in_(uids[start : start + _CHUNK])
                    )
                )
                held.update({sop: cls for sop, cls in rows})
    except (OperationalError, DBAPIError) as exc:
        log.warning("storage commitment: index unavailable (%s)", exc.__class__.__name__)
        failed_lookup = True
    info = Dataset()
    info.TransactionUID = transaction_uid
    success: list[Dataset] = []
    failed: list[Dataset] = []
    for sop_class, sop_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        if failed_lookup:
            item.FailureReason = PROCESSING_FAILURE
            failed.append(item)
        elif sop_uid not in held:
            item.FailureReason = NO_SUCH_OBJECT_INSTANCE
            failed.append(item)
        elif held[sop_uid] != sop_class:
            item.FailureReason = CLASS_INSTANCE_CONFLICT
            failed.append(item)
        else:
            success.append(item)
    if success:
        info.ReferencedSOPSequence = Sequence(success)
    if failed:
        info.FailedSOPSequence = Sequence(failed)
    return (EVENT_FAILURES_EXIST if failed else EVENT_ALL_SUCCEEDED), info


def _references(ds: Dataset) -> tuple[str, list[tuple[str, str]]] | None:
    """Transaction UID and (class, instance) pairs of a request, or None if malformed."""
    transaction = str(ds.get("TransactionUID", "") or "").strip()
    items = ds.get("ReferencedSOPSequence")
    if not is_valid_uid(transaction) or not items:
        return None
    refs = []
    for item in items:
        cls = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not is_valid_uid(cls) or not is_valid_uid(sop):
            return None
        refs.append((cls, sop))
    return transaction, refs


class CommitmentSCP:
    """The N-ACTION handler and the sender of the N-EVENT-REPORT."""

    def __init__(self, settings: Settings, db: Database, peers: PeerRegistry) -> None:
        self.settings = settings
        self.db = db
        self.peers = peers
        # Tests wait on reports being sent (or failing): called with (transaction, how).
        self.on_reported: Callable[[str, str], None] | None = None

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_ACTION, self.on_n_action)]

    def on_n_action(self, event: Event) -> tuple[int, Dataset | None]:
        request = event.request
        if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT:
            return 0x0118, None  # no such SOP class
        if str(request.RequestedSOPInstanceUID) != STORAGE_COMMITMENT_INSTANCE:
            return 0x0117, None  # invalid object instance
        if request.ActionTypeID != REQUEST_COMMITMENT:
            return _NO_SUCH_ACTION, None
        try:
            parsed = _references(event.action_information)
        except Exception:
            return _MISTYPED_ARGUMENT, None
        if parsed is None:
            return _INVALID_ARGUMENT, None
        transaction, refs = parsed
        calling = (event.assoc.requestor.ae_title or "").strip()
        thread = threading.Thread(
            target=self._report,
            args=(event.assoc, calling, transaction, refs),
            name="commitment-report",
            daemon=True,
        )
        # The thread's send waits for the association's reactor to pause, which it
        # does only after this handler returned and the N-ACTION response is sent.
        thread.start()
        return _SUCCESS, None

    def _report(
        self, assoc: Any, calling: str, transaction: str, refs: list[tuple[str, str]]
    ) -> None:
        event_type, info = commitment_result(self.db, transaction, refs)
        request_id = self._keep(transaction, calling, event_type, info)
        how, to, error = "", "", ""
        try:
            if assoc.is_established and self._send_same(assoc, event_type, info):
                how = "same-association"
                to = f"{calling} at {assoc.requestor.address}:{assoc.requestor.port}"
            else:
                to, error = self._send_new(calling, event_type, info)
                how = "" if error else "new-association"
        except Exception as exc:
            log.exception("storage commitment report for %s failed", transaction)
            error = f"{exc.__class__.__name__}: {exc}"
        if request_id is not None:
            try:
                commitments.record_report(self.db, request_id, how=how, to=to, error=error)
            except (OperationalError, DBAPIError) as exc:
                log.warning("storage commitment report outcome not kept: %s", exc)
        log.info(
            "storage commitment %s for %s: %d held, %d not (%s)",
            transaction,
            calling,
            len(info.get("ReferencedSOPSequence", [])),
            len(info.get("FailedSOPSequence", [])),
            how or f"not sent: {error}",
        )
        if self.on_reported is not None:
            self.on_reported(transaction, how or "failed")

    def _keep(self, transaction: str, calling: str, event_type: int, info: Dataset) -> int | None:
        """Keep the result before it is reported (None if the index cannot take it:
        the report still goes out, the requester holds it)."""
        committed = [
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in info.get("ReferencedSOPSequence", [])
        ]
        failed = [
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
            for i in info.get("FailedSOPSequence", [])
        ]
        try:
            return commitments.record_result(
                self.db, transaction, calling, event_type, committed, failed
            )
        except (OperationalError, DBAPIError) as exc:
            log.warning("storage commitment result for %s not kept: %s", transaction, exc)
            return None

    def _send_same(self, assoc: Any, event_type: int, info: Dataset) -> bool:
        """Report on the requesting association. A requester that released it just
        after our N-ACTION response never answers: wait for the answer only briefly,
        then fall back to a new association."""
        previous = assoc.dimse_timeout
        assoc.dimse_timeout = min(SAME_ASSOCIATION_WAIT, self.settings.dimse_timeout)
        try:
            return self._send(assoc, event_type, info)
        finally:
            assoc.dimse_timeout = previous

    @staticmethod
    def _send(assoc: Any, event_type: int, info: Dataset) -> bool:
        try:
            status, _reply = assoc.send_n_event_report(
                info, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
            )
        except (RuntimeError, ValueError) as exc:  # released meanwhile, no context
            log.info("storage commitment report not sent on the association: %s", exc)
            return False
        return bool(status) and int(getattr(status, "Status", -1)) == 0x0000

    def _send_new(self, calling: str, event_type: int, info: Dataset) -> tuple[str, str]:
        """Report on a new association to the requester's registered address:
        where it went, and the error ('' when it was answered with success)."""
        peer = self.peers.get(calling)
        if peer is None:
            log.warning("storage commitment report for unregistered AE %r not sent", calling)
            return "", f"{calling} is not a registered peer"
        to = f"{peer.ae_title} at {peer.host}:{peer.port}"
        # On an association we start, we are the SCP of Storage Commitment.
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        try:
            assoc = client.associate(
                self.settings, peer, [build_context(StorageCommitmentPushModel)], ext_neg=[role]
            )
        except client.AssociationFailed as exc:
            log.warning("storage commitment report not sent: %s", exc)
            return to, str(exc)
        try:
            if self._send(assoc, event_type, info):
                return to, ""
            return to, "the requester did not answer the report with success"
        finally:
            if assoc.is_established:
                assoc.release()
