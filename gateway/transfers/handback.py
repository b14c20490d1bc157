"""Hand-back: a suspended clinic that reopens gets its studies back in its PACS.

One forwarding job (``gateway.forward``) per study studybridge holds under the
transfer, to the reopening clinic's PACS, with the identifiers as the clinic sent
them (no reconciliation: they are its own). The jobs are resumable like any
forward. Only suspensions are handed back; a closure's custodian keeps the records.
"""

from __future__ import annotations

from sqlalchemy import select

from gateway.archive import Archive
from gateway.archive.models import TransferArrival
from gateway.forward.jobs import JobInfo, create_job
from gateway.transfers.records import TransferError, get_transfer
from gateway.transfers.report import HELD


def transfer_studies(archive: Archive, transfer_id: int) -> list[str]:
    with archive.db.read_conn() as conn:
        return sorted(
            conn.scalars(
                select(TransferArrival.study_uid)
                .where(
                    TransferArrival.transfer_id == transfer_id,
                    TransferArrival.outcome.in_(HELD),
                )
                .distinct()
            )
        )


def hand_back(archive: Archive, transfer_id: int, peer_ae: str) -> list[JobInfo]:
    """Create the forwarding jobs that return a suspension's studies; run them next."""
    info = get_transfer(archive.db, transfer_id)
    if info.reason != "suspension":
        raise TransferError(f"transfer {transfer_id} is a {info.reason}: only suspensions go back")
    studies = transfer_studies(archive, transfer_id)
    if not studies:
        raise TransferError(f"transfer {transfer_id} holds no study to hand back")
    return [create_job(archive, study, peer_ae) for study in studies]
