"""The index schema: patients, studies, series, instances, peers, ingest events and
transfer arrivals.

Columns hold what DICOM C-FIND (PS3.4 C.6) and QIDO-RS (PS3.18 10.6) match on and
return, decoded to Unicode. Person names are kept as received (``patient_name``)
and, for matching, split into their alphabetic/ideographic/phonetic groups both as
received and folded (case- and accent-insensitive). Counters such as "number of
study related instances" are computed at query time, never updated per instance,
so concurrent receivers never contend on one row.

Every schema change goes through an Alembic migration in ``migrations/versions``.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: object
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)
LO = String(64)
SH = String(16)
PN = String(324)  # 5 components x 64 chars x 3 groups, plus separators
DA = String(8)
TM = String(16)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _prefix_index(table: str, column: str) -> Index:
    """A B-tree index that also serves ``LIKE 'prefix%'`` on PostgreSQL.

    PostgreSQL uses a plain index for LIKE only under the C collation; the
    ``varchar_pattern_ops`` operator class works under any (and still serves ``=``).
    SQLite's LIKE uses a plain index (``case_sensitive_like`` is on, see ``db.py``).
    """
    return Index(f"ix_{table}_{column}", column, postgresql_ops={column: "varchar_pattern_ops"})


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint("issuer", "patient_id", "unidentified_study_uid"),
        # Wildcard matching on Patient ID and on folded person names (QIDO, C-FIND).
        _prefix_index("patients", "patient_id"),
        _prefix_index("patients", "pn_alphabetic_fold"),
        _prefix_index("patients", "pn_ideographic_fold"),
        _prefix_index("patients", "pn_phonetic_fold"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    issuer: Mapped[str] = mapped_column(LO, nullable=False)
    patient_id: Mapped[str] = mapped_column(LO, nullable=False)
    # A dataset without a Patient ID is filed under a patient of its own study, so
    # unidentified patients are never merged together. '' for identified patients.
    unidentified_study_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    patient_name: Mapped[str] = mapped_column(PN, nullable=False, default="")
    pn_alphabetic: Mapped[str] = mapped_column(PN, nullable=False, default="", index=True)
    pn_ideographic: Mapped[str] = mapped_column(PN, nullable=False, default="", index=True)
    pn_phonetic: Mapped[str] = mapped_column(PN, nullable=False, default="", index=True)
    pn_alphabetic_fold: Mapped[str] = mapped_column(PN, nullable=False, default="")
    pn_ideographic_fold: Mapped[str] = mapped_column(PN, nullable=False, default="")
    pn_phonetic_fold: Mapped[str] = mapped_column(PN, nullable=False, default="")
    birth_date: Mapped[str] = mapped_column(DA, nullable=False, default="")
    sex: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (_prefix_index("studies", "accession_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), nullable=False, index=True)
    study_date: Mapped[str] = mapped_column(DA, nullable=False, default="", index=True)
    study_time: Mapped[str] = mapped_column(TM, nullable=False, default="")
    # HHMMSS.FFFFFF padded, so range matching compares like with like (every TM
    # column has such a *_time_key twin).
    study_time_key: Mapped[str] = mapped_column(TM, nullable=False, default="")
    accession_number: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    study_id: Mapped[str] = mapped_column(SH, nullable=False, default="")
    study_description: Mapped[str] = mapped_column(LO, nullable=False, default="")
    referring_physician_name: Mapped[str] = mapped_column(PN, nullable=False, default="")
    referring_physician_name_fold: Mapped[str] = mapped_column(PN, nullable=False, default="")
    institution_name: Mapped[str] = mapped_column(LO, nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class StudySource(Base):
    """An institution that sent instances of a study: ``instances.source_institution``
    per study, one row per (study, institution), written by ingest in the transaction
    that indexes the instance and removed with the study.

    The access rule "an institution sees what it sent" asks this per candidate study
    (one primary-key probe) or as a set (the institution's index range), where asking
    the instances meant a probe through series and instances per study, or a hash
    over every instance the institution sent: 22-270 ms per scoped QIDO at 100,000
    studies on PostgreSQL.
    """

    __tablename__ = "study_sources"
    __table_args__ = (Index("ix_study_sources_institution_study_fk", "institution", "study_fk"),)

    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    institution: Mapped[str] = mapped_column(LO, primary_key=True)


class Series(Base):
    __tablename__ = "series"
    # Study -> series lookups, and ModalitiesInStudy answered from the index alone.
    __table_args__ = (Index("ix_series_study_fk_modality", "study_fk", "modality"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, nullable=False, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False)
    modality: Mapped[str] = mapped_column(SH, nullable=False, default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(LO, nullable=False, default="")
    body_part_examined: Mapped[str] = mapped_column(SH, nullable=False, default="")
    series_date: Mapped[str] = mapped_column(DA, nullable=False, default="")
    series_time: Mapped[str] = mapped_column(TM, nullable=False, default="")
    series_time_key: Mapped[str] = mapped_column(TM, nullable=False, default="")
    pps_start_date: Mapped[str] = mapped_column(DA, nullable=False, default="")
    pps_start_time: Mapped[str] = mapped_column(TM, nullable=False, default="")
    pps_start_time_key: Mapped[str] = mapped_column(TM, nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(UID, nullable=False, unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), nullable=False, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, nullable=False, index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_allocated: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_date: Mapped[str] = mapped_column(DA, nullable=False, default="")
    content_time: Mapped[str] = mapped_column(TM, nullable=False, default="")
    content_time_key: Mapped[str] = mapped_column(TM, nullable=False, default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, nullable=False)
    # Storage: the blob holds a Part 10 file; the data set as received starts at
    # dataset_offset, and sha256 is the hash of those data set bytes.
    blob_key: Mapped[str] = mapped_column(String(300), nullable=False)
    dataset_offset: Mapped[int] = mapped_column(Integer, nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    # Provenance.
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    door: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    source_ae: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    source_host: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    # Indexed: the access rule "an institution sees what it sent" selects by it.
    source_institution: Mapped[str] = mapped_column(LO, nullable=False, default="", index=True)
    transfer_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    # The patient identifiers exactly as this instance carried them.
    received_patient_id: Mapped[str] = mapped_column(LO, nullable=False, default="")
    received_issuer: Mapped[str] = mapped_column(LO, nullable=False, default="")
    # Frame byte ranges relative to the blob, as JSON [[offset, length], ...], when known.
    frame_offsets: Mapped[str | None] = mapped_column(Text, nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class IngestEvent(Base):
    """Noteworthy outcomes of ingest: duplicates in another syntax, conflicts, mismatches."""

    __tablename__ = "ingest_events"
    __table_args__ = (Index("ix_ingest_events_kind_at", "kind", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    sop_uid: Mapped[str] = mapped_column(UID, nullable=False, default="", index=True)
    study_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    door: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    source_ae: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    # A copy kept for review (conflicting content), if any.
    blob_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="")


class Peer(Base):
    """A remote DICOM application entity we accept from and send to."""

    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), nullable=False, unique=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    port: Mapped[int] = mapped_column(Integer, nullable=False)
    institution: Mapped[str] = mapped_column(LO, nullable=False, default="")
    # Issuer of Patient ID for datasets from this peer that do not name one.
    issuer: Mapped[str] = mapped_column(LO, nullable=False, default="")
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Associations we open to this peer speak DICOM TLS (gateway.dimse.client): its
    # certificate verified against tls_ca_file (else the gateway's CA) and checked to
    # name tls_server_name (else host).
    tls: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    tls_ca_file: Mapped[str] = mapped_column(Text, nullable=False, default="")
    tls_server_name: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class TransferArrival(Base):
    """Provenance log of instances that arrived under a closure transfer.

    One row per arrival (stored, duplicate, alternate syntax, reconciled copy or
    refused with its reason), written by ``ingest`` whenever the ``Source`` names a
    transfer. A stored instance's row is committed in the same transaction as the
    instance itself. ``gateway.transfers`` reads these rows for its reconciliation
    report and receipt; the transfer records themselves live there.
    """

    __tablename__ = "transfer_arrivals"
    __table_args__ = (Index("ix_transfer_arrivals_transfer_id_sop_uid", "transfer_id", "sop_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transfer_id: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    sop_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    study_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    series_uid: Mapped[str] = mapped_column(UID, nullable=False, default="")
    door: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    # Why it was refused (archive error reason and message); '' when it was held.
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
