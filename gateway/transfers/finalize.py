"""Finalizing a transfer: reconcile, decide complete or incomplete, sign a receipt.

Finalizing needs an expectation (a manifest or a census): without one completeness
cannot be judged. An incomplete transfer keeps accepting instances (from the
clinic, an import or pull mode) and can be finalized again; every receipt issued is
kept. A complete transfer is closed: its AE title's later C-STOREs are no longer
tagged to it. Finalizing gives the transfer's studies their retention dates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gateway.archive.db import Database
from gateway.archive.models import utcnow
from gateway.config import Settings
from gateway.transfers.models import Transfer, TransferReceipt
from gateway.transfers.receipt import build_receipt, dumps, load_or_create_key, sign
from gateway.transfers.records import TransferError, TransferInfo, get_transfer, set_status
from gateway.transfers.report import Reconciliation, reconcile
from gateway.transfers.retention import apply_retention


@dataclass
class Finalized:
    transfer: TransferInfo
    reconciliation: Reconciliation
    document: dict[str, Any]
    text: str


def finalize(db: Database, settings: Settings, transfer_id: int) -> Finalized:
    info = get_transfer(db, transfer_id)
    if info.status == "complete":
        raise TransferError(f"transfer {transfer_id} is already complete")
    if info.status == "verifying":
        raise TransferError(f"transfer {transfer_id} is being finalized right now")
    key = load_or_create_key(settings.resolved_receipt_key_file)
    previous = info.status
    set_status(db, transfer_id, "verifying")
    try:
        rec = reconcile(db, transfer_id)
        if not rec.has_expectation:
            raise TransferError(
                f"transfer {transfer_id} has no manifest or census: load one "
                "(`studybridge transfer manifest` or `census`) before finalizing"
            )
        status = "complete" if rec.complete else "incomplete"
        document = sign(build_receipt(info, rec, gateway_ae=settings.ae_title, status=status), key)
        text = dumps(document)
        now = utcnow()
        with db.writing() as session:
            session.add(
                TransferReceipt(
                    transfer_fk=transfer_id, issued_at=now, status=status, document=text
                )
            )
            row = session.get(Transfer, transfer_id)
            assert row is not None
            row.status = status
            row.updated_at = now
            row.finalized_at = now
    except BaseException:
        set_status(db, transfer_id, previous)
        raise
    # Custodianship passes: the studies get their retention dates (kept if set).
    apply_retention(db, settings, {h.study_uid for h in rec.held})
    return Finalized(get_transfer(db, transfer_id), rec, document, text)


def latest_receipt(db: Database, transfer_id: int) -> str | None:
    with db.reading() as session:
        return session.scalar(
            select(TransferReceipt.document)
            .where(TransferReceipt.transfer_fk == transfer_id)
            .order_by(TransferReceipt.id.desc())
            .limit(1)
        )
