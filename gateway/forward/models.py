"""Tables of forwarding jobs: the job and one line per instance to send."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.archive.models import LO, UID, Base, UTCDateTime, utcnow


class ForwardJob(Base):
    """Push a study (or one series) to a peer, optionally with reconciled identifiers."""

    __tablename__ = "forward_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False, index=True)
    series_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    peer_ae: Mapped[str] = mapped_column(String(16), nullable=False)
    # Reconciliation for the receiving institution ('' = keep as stored).
    patient_id: Mapped[str] = mapped_column(LO, nullable=False, default="")
    issuer: Mapped[str] = mapped_column(LO, nullable=False, default="")
    accession_number: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    # queued, running, done, failed (attempts used up with instances unsent).
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=8)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Who asked for it (as the audit trail names principals) and their institution:
    # the institution's staff see the jobs it asked for.
    requested_by: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    requester_institution: Mapped[str] = mapped_column(LO, nullable=False, default="", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ForwardItem(Base):
    """One instance of a job: pending until the peer confirmed it (sent) or refused
    it for good (failed)."""

    __tablename__ = "forward_items"
    __table_args__ = (UniqueConstraint("job_fk", "sop_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("forward_jobs.id"), nullable=False)
    sop_uid: Mapped[str] = mapped_column(UID, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    # C-STORE status of the last try (None: no answer), and a description.
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
