"""Tables of closure transfers: the transfer, what it should hold, the receipts issued.

The arrivals themselves (what ``ingest`` received under a transfer) are logged in
``gateway.archive.models.TransferArrival``, beside the instances they name.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Date, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.archive.models import LO, UID, Base, UTCDateTime, utcnow


class Transfer(Base):
    """One clinic's hand-over of its archive (closure or suspension)."""

    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    institution: Mapped[str] = mapped_column(LO, nullable=False)
    # "closure" or "suspension".
    reason: Mapped[str] = mapped_column(String(16), nullable=False)
    # When the clinic closes (or is suspended), and until when for a suspension.
    effective_on: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    ends_on: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    # Calling AE title of the clinic's PACS (a registered peer): its C-STOREs are
    # tagged to this transfer while it is open. '' for import-only transfers.
    source_ae: Mapped[str] = mapped_column(String(16), nullable=False, default="", index=True)
    # The one Issuer of Patient ID for every instance of the transfer that names none.
    issuer: Mapped[str] = mapped_column(LO, nullable=False)
    custodian_name: Mapped[str] = mapped_column(LO, nullable=False, default="")
    custodian_contact: Mapped[str] = mapped_column(Text, nullable=False, default="")
    notes: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # open, receiving, verifying, complete, incomplete.
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="open")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    finalized_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TransferExpected(Base):
    """What the transfer should deliver: a study, or one series of it, with its count.

    ``series_uid`` is '' for a study-level line (manifests that only count per study);
    ``instances`` is None when the source did not say.
    """

    __tablename__ = "transfer_expected"
    __table_args__ = (UniqueConstraint("transfer_fk", "study_uid", "series_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transfer_fk: Mapped[int] = mapped_column(ForeignKey("transfers.id"), nullable=False)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False)
    series_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    instances: Mapped[int | None] = mapped_column(Integer, nullable=True)
    patient_id: Mapped[str] = mapped_column(LO, nullable=False, default="")
    study_date: Mapped[str] = mapped_column(String(8), nullable=False, default="")
    modality: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    # "manifest" or "census".
    origin: Mapped[str] = mapped_column(String(16), nullable=False)
    loaded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class TransferReceipt(Base):
    """A signed receipt issued at finalization (every one kept, newest last)."""

    __tablename__ = "transfer_receipts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transfer_fk: Mapped[int] = mapped_column(ForeignKey("transfers.id"), nullable=False, index=True)
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    # The signed document exactly as handed out (JSON text).
    document: Mapped[str] = mapped_column(Text, nullable=False)


class TransferPull(Base):
    """Pull mode: one C-MOVE to ask of the source PACS (a study, or one series of it).

    The state of a pull lives here, so a pull interrupted anywhere (the gateway
    killed, the PACS gone, the allowed time window over) resumes where it stopped:
    an attempt is counted and its retry time set before the C-MOVE is sent.
    """

    __tablename__ = "transfer_pulls"
    __table_args__ = (UniqueConstraint("transfer_fk", "study_uid", "series_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transfer_fk: Mapped[int] = mapped_column(ForeignKey("transfers.id"), nullable=False)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False)
    # '' moves the whole study.
    series_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    # pending, done (the source reported success), failed (attempts used up).
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    # Final C-MOVE status of the last attempt (None: no answer), and what went wrong.
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class StudyRetention(Base):
    """How long a study must be kept, and whether it is on legal hold.

    Set for a transfer's studies when custodianship passes (finalize), and for any
    study by ``studybridge retention apply``. Nothing is ever deleted because of it:
    the retention report lists what is due, and deleting stays an explicit operator
    action.
    """

    __tablename__ = "study_retention"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False, unique=True)
    retain_until: Mapped[dt.date] = mapped_column(Date, nullable=False, index=True)
    # The record type the period came from (a modality, or "default") and its years.
    record_type: Mapped[str] = mapped_column(String(16), nullable=False)
    years: Mapped[int] = mapped_column(Integer, nullable=False)
    legal_hold: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    hold_reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    hold_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class CommitmentRequest(Base):
    """A Storage Commitment request we answered (PS3.4 Annex J), and its report.

    Written when the result is computed, before the N-EVENT-REPORT goes out, so what
    was confirmed to whom survives a restart and shows in the transfer report.
    ``transfer_fk`` is the latest transfer of the requester's AE title, if any.
    """

    __tablename__ = "commitment_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, nullable=False, index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), nullable=False)
    transfer_fk: Mapped[int | None] = mapped_column(
        ForeignKey("transfers.id"), nullable=True, index=True
    )
    requested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    # Event Type ID of the report: 1 all committed, 2 failures exist.
    event_type: Mapped[int] = mapped_column(Integer, nullable=False)
    committed: Mapped[int] = mapped_column(Integer, nullable=False)
    failed: Mapped[int] = mapped_column(Integer, nullable=False)
    # pending (not sent yet), sent, unsent (every way of sending failed).
    report_status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    # same-association or new-association, where it went (AE title at host:port).
    reported_how: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    reported_to: Mapped[str] = mapped_column(Text, nullable=False, default="")
    reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    report_error: Mapped[str] = mapped_column(Text, nullable=False, default="")


class CommitmentItem(Base):
    """One instance of a commitment request: committed, or failed with its reason."""

    __tablename__ = "commitment_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_fk: Mapped[int] = mapped_column(
        ForeignKey("commitment_requests.id"), nullable=False, index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(UID, nullable=False)
    sop_uid: Mapped[str] = mapped_column(UID, nullable=False)
    committed: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # Failure Reason (PS3.3 C.14.1.1) when not committed.
    failure_reason: Mapped[int | None] = mapped_column(Integer, nullable=True)
