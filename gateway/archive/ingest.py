"""The one way instances enter the archive: C-STORE, STOW-RS, imports and transfers.

``Ingestor.ingest_file`` takes a file holding one instance (Part 10, or a bare data
set from an old disc) and:

1. reads its structure without decoding pixel data (``part10.read_layout``): a
   truncated or malformed file, or sequences nested absurdly deep, are refused;
2. parses the header attributes and validates them: SOP Class, SOP Instance,
   Study and Series Instance UIDs present and well-formed, a storage SOP class,
   file meta agreeing with the data set;
3. hashes the data set bytes (everything after the file meta) with SHA-256, unless
   the caller wrote the file and hashed it on the way (``Digests``: the DIMSE
   receiver hashes the PDUs as they arrive, so the file is not read again);
4. decides against what is already stored (see "Rules" below);
5. writes the blob durably, then commits the index, and only then returns success
   (the blob is put in place first, and made durable in one round of flushes with
   the blobs of the other instances of the same index transaction, before it; see
   ``db.Database.write_grouped`` and ``blobstore.BlobStore.place_file``).

Rules (documented in docs/architecture.md):
- same SOP Instance UID, same data set bytes: success, no second copy;
- same SOP Instance UID in another transfer syntax: success, the first copy kept,
  an ``alternate-syntax`` event recorded;
- same SOP Instance UID, same transfer syntax, different bytes: refused with
  ``InstanceConflict``; the new copy is kept under ``quarantine/`` and a
  ``conflict`` event records it, so nothing is lost and nothing is overwritten;
- a Study Instance UID already filed under another patient: refused with
  ``PatientMismatch`` (quarantined and recorded), unless the instance is a copy
  coming back with reconciled identifiers, i.e. its Other Patient IDs Sequence
  names the study's patient: then it is filed with the study and a
  ``reconciled-copy`` event records the identifiers it carried.

When the ``Source`` names a closure transfer, every arrival (held or refused, with
the reason) is also logged in ``transfer_arrivals`` for the transfer's
reconciliation report; a stored instance's line commits with the instance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import _STORAGE_CLASSES
from sqlalchemy import Connection, Row, bindparam, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from gateway.archive.attributes import (
    extract,
    instance_attributes,
    other_patient_ids,
    text,
    value_of,
)
from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database, Prerequisite
from gateway.archive.errors import (
    ArchiveError,
    IndexUnavailable,
    InstanceConflict,
    InvalidDataset,
    MissingAttribute,
    NotStorageSOPClass,
    PatientMismatch,
    StorageUnavailable,
)
from gateway.archive.frames import encode_ranges, frame_ranges
from gateway.archive.models import (
    IngestEvent,
    Instance,
    Patient,
    Series,
    Study,
    StudySource,
    TransferArrival,
    utcnow,
)
from gateway.archive.part10 import (
    DEFER_SIZE,
    Layout,
    declared_encoding_differs,
    header_dataset,
    read_layout,
    syntax_uid,
)
from gateway.archive.uids import check_uid, is_valid_uid

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())
_HASH_CHUNK = 1024 * 1024

# Statements of the hot path, built once: Core tables (not ORM entities) with bound
# parameters, so that SQLAlchemy reuses their compiled form for every instance.
_INSTANCES = Instance.__table__
_SERIES = Series.__table__
_STUDIES = Study.__table__
_PATIENTS = Patient.__table__
_EVENTS = IngestEvent.__table__
_SELECT_EXISTING = select(
    _INSTANCES.c.sha256, _INSTANCES.c.transfer_syntax_uid, _INSTANCES.c.blob_key
).where(_INSTANCES.c.sop_uid == bindparam("sop_uid"))
_SELECT_SERIES = (
    select(_SERIES.c.id, _STUDIES.c.study_uid)
    .join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id)
    .where(_SERIES.c.series_uid == bindparam("series_uid"))
)
_SELECT_STUDY = (
    select(_STUDIES.c.id, _PATIENTS.c.id, _PATIENTS.c.patient_id, _PATIENTS.c.issuer)
    .join(_PATIENTS, _STUDIES.c.patient_fk == _PATIENTS.c.id)
    .where(_STUDIES.c.study_uid == bindparam("study_uid"))
)
# Where a placement read before the transaction (or cached) points: still the
# series and study it was, or removed meanwhile (and perhaps its row ids reused).
_CHECK_PLACEMENT = (
    select(_SERIES.c.series_uid, _SERIES.c.study_fk, _STUDIES.c.study_uid, _STUDIES.c.patient_fk)
    .join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id)
    .where(_SERIES.c.id == bindparam("series_fk"))
)
_CHECK_STUDY = select(_STUDIES.c.study_uid, _STUDIES.c.patient_fk).where(
    _STUDIES.c.id == bindparam("study_fk")
)
_INSERT_INSTANCE = insert(_INSTANCES)
_INSERT_EVENT = insert(_EVENTS)
_INSERT_ARRIVAL = insert(TransferArrival.__table__)
# The sender of each study (consent.access's "an institution sees what it sent"), once
# per (study, institution): a primary-key probe when the row is already there.
_RECORD_SOURCE = {
    "sqlite": sqlite_insert(StudySource.__table__).on_conflict_do_nothing(),
    "postgresql": pg_insert(StudySource.__table__).on_conflict_do_nothing(),
}


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    ALTERNATE_SYNTAX = "alternate-syntax"
    RECONCILED_COPY = "reconciled-copy"


@dataclass(frozen=True)
class Source:
    """Where an instance came from: door, sender and the defaults that sender implies."""

    door: str
    ae_title: str = ""
    host: str = ""
    institution: str = ""
    # Issuer of Patient ID for datasets that do not name one.
    issuer: str = ""
    transfer_id: int | None = None
    # The door's admission check, called with the Study Instance UID once the header
    # is read and before anything is stored; it raises ``NotAuthorized`` to refuse.
    # (The archive knows nothing of who may add to which study: the door does.)
    admit: Callable[[str], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Digests:
    """SHA-256 digests (hex) of a file taken by the code that wrote it, as it wrote it.

    ``meta`` covers the bytes before ``dataset_offset`` (preamble and file meta),
    ``dataset`` the rest. Used only when ``dataset_offset`` is where the file's own
    structure says the data set starts; otherwise the file is hashed as usual.
    """

    dataset_offset: int
    meta: str
    dataset: str


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    size: int


@dataclass
class _Placement:
    """Index rows a new instance is filed under; None where they do not exist yet."""

    patient_fk: int | None = None
    patient_key: tuple[str, str] = ("", "")
    study_fk: int | None = None
    series_fk: int | None = None
    series_study_uid: str | None = None
    cached: bool = False  # from this process's cache, not read from the index now


_PLACEMENT_CACHE = 256


@dataclass
class _Candidate:
    path: Path
    owned: bool
    layout: Layout
    ds: Dataset
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    sha256: str
    size: int
    meta_sha256: str | None = None


class Ingestor:
    def __init__(
        self, db: Database, store: BlobStore, staging_dir: Path, default_issuer: str
    ) -> None:
        self.db = db
        self.store = store
        self.staging_dir = staging_dir
        self.default_issuer = default_issuer
        # Series recently filed by this process: most instances of a series then need
        # one INSERT only. Cleared whenever the index disagrees (integrity error).
        self._places: dict[str, _Placement] = {}
        self._places_lock = threading.Lock()
        # Called with each newly stored instance after its success is certain (derived
        # work is submitted this way: gateway.tasks.hooks). Must return at once.
        self.after_store: list[Callable[[IngestResult], None]] = []
        staging_dir.mkdir(parents=True, exist_ok=True)

    # -- public -------------------------------------------------------------------
    def ingest_file(
        self, path: Path, source: Source, *, owned: bool = False, digests: Digests | None = None
    ) -> IngestResult:
        """Ingest the instance in ``path``.

        With ``owned`` the file is ours to consume (moved into the store or deleted);
        otherwise it is left untouched. ``digests``: the file's hashes, taken by the
        caller as it wrote the file. Raises an ArchiveError subclass on refusal.
        """
        path = Path(path)
        staged: Path | None = None
        cand: _Candidate | None = None
        try:
            cand = self._examine(path, owned, digests)
            if source.admit is not None:
                source.admit(cand.study_uid)
            if cand.layout.file_meta is None:
                staged = self._wrap_bare_dataset(cand)
                cand.path, cand.owned = staged, True
            result = self._decide_and_store(cand, source)
            if source.transfer_id is not None and result.outcome is not Outcome.STORED:
                # Stored arrivals were logged with the instance, in its transaction.
                self._log_arrival(source, cand, result.outcome.value, "")
        except ArchiveError as exc:
            if source.transfer_id is not None:
                self._log_arrival(source, cand, "rejected", f"{exc.reason}: {exc}")
            raise
        finally:
            # A staged file put into the store (or quarantine) was moved there: it is
            # gone already, no need to ask the filesystem again.
            consumed = cand is not None and cand.path == path and not cand.owned
            if owned and not consumed:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
        if result.outcome in (Outcome.STORED, Outcome.RECONCILED_COPY):
            for listener in self.after_store:
                try:
                    listener(result)
                except Exception:  # derived work never fails an ingest
                    log.exception("after-store listener failed")
        return result

    def ingest_dataset(self, ds: Dataset, source: Source) -> IngestResult:
        """Ingest an in-memory dataset (written out once, then the file path)."""
        try:
            fd, name = tempfile.mkstemp(dir=self.staging_dir, suffix=".dcm")
            os.close(fd)
        except OSError as exc:
            raise StorageUnavailable(f"staging folder is not writable: {exc.strerror}") from exc
        try:
            ds.save_as(name, enforce_file_format=True)
        except OSError as exc:
            os.unlink(name)
            raise StorageUnavailable(f"cannot stage the data set: {exc.strerror}") from exc
        except Exception as exc:
            os.unlink(name)
            raise InvalidDataset(f"cannot encode dataset: {exc}") from exc
        return self.ingest_file(Path(name), source, owned=True)

    # -- examination --------------------------------------------------------------
    def _examine(self, path: Path, owned: bool, digests: Digests | None = None) -> _Candidate:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InvalidDataset(f"cannot read file: {exc.strerror}") from exc
        with fh:
            size = os.fstat(fh.fileno()).st_size
            guessed_ts = ""
            head = fh.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                guessed_ts = _guess_bare_transfer_syntax(path)
            # The header's elements are kept by the same walk (one parse, not two), except
            # for a bare data set (its transfer syntax was guessed by pydicom's reader).
            layout = read_layout(fh, size, transfer_syntax=guessed_ts, header=not guessed_ts)
            if (
                layout.header is not None
                and syntax_uid(layout.transfer_syntax).is_transfer_syntax
                and declared_encoding_differs(fh, layout)
            ):
                raise _not_in_declared_syntax(layout)
            try:
                if layout.header is not None:
                    ds = header_dataset(str(path), layout)
                else:
                    fh.seek(0)
                    ds = pydicom.dcmread(
                        fh, force=True, stop_before_pixels=True, defer_size=DEFER_SIZE
                    )
                # Touch what we validate now so decoding errors surface here.
                sop_class = value_of(ds, "SOPClassUID")
                sop_uid = value_of(ds, "SOPInstanceUID")
                study_uid = value_of(ds, "StudyInstanceUID")
                series_uid = value_of(ds, "SeriesInstanceUID")
            except RecursionError as exc:
                raise InvalidDataset("data set nests too deeply to parse") from exc
            except Exception as exc:
                raise InvalidDataset(f"cannot parse data set: {exc}") from exc
            meta = layout.file_meta
            if meta is not None:
                # A DICOMDIR (or any non-storage object) says what it is in its file meta,
                # possibly without a SOP Class UID in the data set.
                meta_class = str(value_of(meta, "MediaStorageSOPClassUID") or "").strip("\x00 ")
                if is_valid_uid(meta_class) and meta_class not in STORAGE_SOP_CLASSES:
                    raise NotStorageSOPClass(f"SOP Class {meta_class} is not a storage SOP class")
            if not _has_encoding_of(ds, layout.transfer_syntax) and not guessed_ts:
                raise _not_in_declared_syntax(layout)
            for value, keyword in (
                (sop_class, "SOPClassUID"),
                (sop_uid, "SOPInstanceUID"),
                (study_uid, "StudyInstanceUID"),
                (series_uid, "SeriesInstanceUID"),
            ):
                if value is None or str(value).strip("\x00 ") == "":
                    raise MissingAttribute(f"required attribute {keyword} is missing or empty")
            sop_class = check_uid(str(sop_class), "SOP Class UID")
            sop_uid = check_uid(str(sop_uid), "SOP Instance UID")
            study_uid = check_uid(str(study_uid), "Study Instance UID")
            series_uid = check_uid(str(series_uid), "Series Instance UID")
            ts = check_uid(layout.transfer_syntax, "Transfer Syntax UID")
            if sop_class not in STORAGE_SOP_CLASSES:
                raise NotStorageSOPClass(f"SOP Class {sop_class} is not a storage SOP class")
            if meta is not None:
                meta_sop = str(value_of(meta, "MediaStorageSOPInstanceUID") or "").strip("\x00 ")
                if meta_sop and meta_sop != sop_uid:
                    raise InvalidDataset(
                        "file meta Media Storage SOP Instance UID differs from SOP Instance UID"
                    )
            if digests is not None and digests.dataset_offset == layout.dataset_offset:
                digest, meta_digest = digests.dataset, digests.meta
            else:
                digest, meta_digest = _hash_from(fh, layout.dataset_offset), None
        return _Candidate(
            path=path,
            owned=owned,
            layout=layout,
            ds=ds,
            sop_class_uid=sop_class,
            sop_uid=sop_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            transfer_syntax=ts,
            sha256=digest,
            size=size - layout.dataset_offset,
            meta_sha256=meta_digest,
        )

    def _wrap_bare_dataset(self, cand: _Candidate) -> Path:
        """Give a data set without file meta (old discs) a Part 10 header."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = cand.sop_class_uid
        meta.MediaStorageSOPInstanceUID = cand.sop_uid
        meta.TransferSyntaxUID = cand.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        try:
            fd, name = tempfile.mkstemp(dir=self.staging_dir, suffix=".dcm")
        except OSError as exc:
            raise StorageUnavailable(f"staging folder is not writable: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as out, open(cand.path, "rb") as src:
                out.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
                offset = out.tell()
                while chunk := src.read(_HASH_CHUNK):
                    out.write(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StorageUnavailable("staging folder is full") from exc
            raise StorageUnavailable(f"cannot stage the data set: {exc.strerror}") from exc
        layout = cand.layout
        layout.dataset_offset = offset
        layout.file_meta = meta
        # Pixel data positions were found in the bare file: they move with the data set.
        if layout.pixel_offset is not None:
            layout.pixel_offset += offset
        layout.fragments = [(pos + offset, length) for pos, length in layout.fragments]
        return Path(name)

    # -- decision and storage -----------------------------------------------------
    def _decide_and_store(self, cand: _Candidate, source: Source) -> IngestResult:
        patient_id = text(cand.ds, "PatientID")
        issuer = text(cand.ds, "IssuerOfPatientID") or source.issuer or self.default_issuer
        existing, place = self._lookup(cand.sop_uid, cand.study_uid, cand.series_uid)
        if existing is None and place.cached and place.patient_key != (patient_id, issuer):
            # Not the usual instance of a series being received: decide on the index
            # (is it stored already?), not on the cache.
            existing, place = self._lookup(
                cand.sop_uid, cand.study_uid, cand.series_uid, cached=False
            )
        if existing is not None:
            return self._resolve_existing(cand, source, existing)

        outcome = Outcome.STORED
        if place.series_study_uid is not None and place.series_study_uid != cand.study_uid:
            self._refuse_series_mismatch(cand, source, place.series_study_uid)
        if place.patient_fk is not None and place.patient_key != (patient_id, issuer):
            if self._names_patient(cand.ds, place.patient_key):
                outcome = Outcome.RECONCILED_COPY
            else:
                self._refuse_patient_mismatch(cand, source, patient_id, issuer)

        key = _blob_key(cand)
        frame_offsets = _frame_offsets(cand)
        # In place, but perhaps not durable yet: it is made durable together with the
        # blobs of the instances this process indexes in the same transaction (one
        # round of flushes for all of them), before their rows are written.
        placed = self.store.place_file(key, cand.path, move=cand.owned)
        # The staged file may now be gone (moved): the blob is the only copy.
        cand.owned = False
        row = {
            "sop_uid": cand.sop_uid,
            "sop_class_uid": cand.sop_class_uid,
            "transfer_syntax_uid": cand.transfer_syntax,
            "blob_key": key,
            "dataset_offset": cand.layout.dataset_offset,
            "size": cand.size,
            "sha256": cand.sha256,
            "received_at": utcnow(),
            "door": source.door[:16],
            "source_ae": source.ae_title[:16],
            "source_host": source.host[:64],
            "source_institution": source.institution[:64],
            "transfer_id": source.transfer_id,
            "received_patient_id": patient_id,
            "received_issuer": issuer[:64],
            "frame_offsets": frame_offsets,
            **instance_attributes(cand.ds),
        }

        def index(conn: Connection) -> _Placement:
            filed = place
            if filed.series_fk is None:
                filed = self._file_series(conn, cand, filed, patient_id, issuer)
            else:
                # A placement read earlier, or cached: another process may have removed
                # the study since, and SQLite gives a removed row's id to the next one.
                now = conn.execute(_CHECK_PLACEMENT, {"series_fk": filed.series_fk}).first()
                expected = (cand.series_uid, filed.study_fk, cand.study_uid, filed.patient_fk)
                if now is None or tuple(now) != expected:
                    raise _PlacementGone()
            conn.execute(_INSERT_INSTANCE, {**row, "series_fk": filed.series_fk})
            conn.execute(
                _RECORD_SOURCE[conn.dialect.name],
                {"study_fk": filed.study_fk, "institution": row["source_institution"]},
            )
            if source.transfer_id is not None:
                conn.execute(_INSERT_ARRIVAL, _arrival(source, cand, outcome.value, ""))
            if outcome is Outcome.RECONCILED_COPY:
                conn.execute(
                    _INSERT_EVENT,
                    _event(
                        cand,
                        source,
                        "reconciled-copy",
                        f"carried Patient ID {patient_id!r} issuer {issuer!r}",
                    ),
                )
            return filed

        flush = None if placed.durable else Prerequisite(self.store.sync, placed)
        try:
            # Committed together with the instances other receiving threads of this
            # process index at the same moment: rounds of blob flushes, then one
            # commit, for all of them (db._GroupCommit). A failed flush fails every
            # instance of its round (StorageUnavailable: retryable) and indexes none.
            place = self.db.write_grouped(index, before=flush)
        except _FiledElsewhere as race:
            # Another receiver filed this study or series a moment ago, differently.
            self._places.clear()
            self._requarantine(key, cand)
            if race.what == "series":
                self._refuse_series_mismatch(cand, source, race.detail, already_moved=True)
            self._refuse_patient_mismatch(cand, source, patient_id, issuer, already_moved=True)
        except _PlacementGone as exc:
            self._places.clear()
            # The blob is an orphan now (the sweep removes it); the sender's retry is
            # filed afresh.
            raise IndexUnavailable("the study was removed during ingest; retry") from exc
        except IntegrityError as exc:
            self._places.clear()
            # Another receiver stored the same SOP Instance UID a moment ago.
            existing, _place = self._lookup(cand.sop_uid, "", "")
            if existing is None:
                # Not our instance: the index changed under a cached placement.
                raise IndexUnavailable("index changed during ingest; retry") from exc
            if existing.blob_key != key:
                return self._resolve_existing(cand, source, existing, stored_key=key)
            return self._result(cand, Outcome.DUPLICATE)
        except (OperationalError, DBAPIError) as exc:
            self._places.clear()
            # The blob is an orphan now; the sweep removes it. Nothing is indexed.
            raise IndexUnavailable(f"index unavailable: {exc.__class__.__name__}") from exc
        self._remember(cand.series_uid, place)
        return self._result(cand, outcome)

    @staticmethod
    def _names_patient(ds: Dataset, patient_key: tuple[str, str]) -> bool:
        """Whether the Other Patient IDs Sequence names the patient the study is filed under."""
        others = other_patient_ids(ds)
        filed_id, filed_issuer = patient_key
        return (filed_id, filed_issuer) in others or (filed_id, "") in others

    def _refuse_series_mismatch(
        self, cand: _Candidate, source: Source, filed_study: str, *, already_moved: bool = False
    ) -> None:
        self._quarantine(
            cand,
            source,
            "series-mismatch",
            f"series already filed under study {filed_study}",
            already_moved=already_moved,
        )
        raise InvalidDataset("Series Instance UID is already filed under another study")

    def _refuse_patient_mismatch(
        self,
        cand: _Candidate,
        source: Source,
        patient_id: str,
        issuer: str,
        *,
        already_moved: bool = False,
    ) -> None:
        self._quarantine(
            cand,
            source,
            "patient-mismatch",
            f"study already filed under another patient; this instance carries "
            f"Patient ID {patient_id!r} (issuer {issuer!r})",
            already_moved=already_moved,
        )
        raise PatientMismatch("Study Instance UID is already filed under another patient")

    def _requarantine(self, key: str, cand: _Candidate) -> None:
        """Move a blob just stored under ``key`` to the quarantine key of ``cand``."""
        target = _quarantine_key(cand)
        with self.store.local_path(key) as local:
            self.store.put_file(target, local, move=False)
        self.store.delete(key)

    def _file_series(
        self, conn: Connection, cand: _Candidate, place: _Placement, patient_id: str, issuer: str
    ) -> _Placement:
        """Create (or find, when another receiver just did) patient, study and series rows."""
        attrs = extract(cand.ds)
        patient_fk = place.patient_fk
        if patient_fk is None:
            patient_fk = self._upsert_patient(
                conn, issuer, patient_id, cand.study_uid, attrs.patient
            )
            patient_key = (patient_id, issuer)
        else:
            patient_key = place.patient_key
        study_fk = place.study_fk
        if study_fk is None:
            study_fk, filed_patient = self._upsert(
                conn,
                _STUDIES,
                "study_uid",
                cand.study_uid,
                "patient_fk",
                {"patient_fk": patient_fk, **attrs.study},
            )
            if filed_patient != patient_fk:
                raise _FiledElsewhere("study", "")
        else:
            # Read before the transaction: still this study of this patient?
            now = conn.execute(_CHECK_STUDY, {"study_fk": study_fk}).first()
            if now is None or tuple(now) != (cand.study_uid, patient_fk):
                raise _PlacementGone()
        series_fk, filed_study = self._upsert(
            conn,
            _SERIES,
            "series_uid",
            cand.series_uid,
            "study_fk",
            {"study_fk": study_fk, **attrs.series},
        )
        if filed_study != study_fk:
            raise _FiledElsewhere("series", "another study")
        return _Placement(patient_fk, patient_key, study_fk, series_fk, cand.study_uid)

    def _resolve_existing(
        self, cand: _Candidate, source: Source, existing: Row[Any], stored_key: str | None = None
    ) -> IngestResult:
        if existing.sha256 == cand.sha256:
            if stored_key:
                self.store.delete(stored_key)
            return self._result(cand, Outcome.DUPLICATE)
        if existing.transfer_syntax_uid != cand.transfer_syntax:
            if stored_key:
                self.store.delete(stored_key)
            self._record(
                _event(
                    cand,
                    source,
                    "alternate-syntax",
                    f"received again in {cand.transfer_syntax}; stored copy in "
                    f"{existing.transfer_syntax_uid} kept",
                )
            )
            return self._result(cand, Outcome.ALTERNATE_SYNTAX)
        if stored_key:
            self._requarantine(stored_key, cand)
        self._quarantine(
            cand,
            source,
            "conflict",
            "same SOP Instance UID and transfer syntax with different content; stored copy kept",
            already_moved=stored_key is not None,
        )
        raise InstanceConflict(
            "SOP Instance UID already stored with different content; stored copy kept"
        )

    def _quarantine(
        self,
        cand: _Candidate,
        source: Source,
        kind: str,
        detail: str,
        *,
        already_moved: bool = False,
    ) -> None:
        """Keep the refused copy under quarantine/ and record why."""
        key = _quarantine_key(cand)
        if not already_moved:
            self.store.put_file(key, cand.path, move=cand.owned)
            cand.owned = False
        self._record(_event(cand, source, kind, detail, blob_key=key))
        log.warning("ingest %s: %s (sop %s, kept as %s)", kind, detail, cand.sop_uid, key)

    def _log_arrival(
        self, source: Source, cand: _Candidate | None, outcome: str, reason: str
    ) -> None:
        """Note an arrival under a transfer that was not stored as a new instance."""
        try:
            with self.db.write_conn() as conn:
                conn.execute(_INSERT_ARRIVAL, _arrival(source, cand, outcome, reason))
        except (OperationalError, DBAPIError) as exc:
            if outcome == "rejected":
                # The sender hears of the refusal anyway; the log only loses a line.
                log.warning("transfer arrival not logged: %s", exc.__class__.__name__)
                return
            raise IndexUnavailable(f"index unavailable: {exc.__class__.__name__}") from exc

    def _record(self, event: dict[str, Any]) -> None:
        try:
            with self.db.write_conn() as conn:
                conn.execute(_INSERT_EVENT, event)
        except (OperationalError, DBAPIError) as exc:
            raise IndexUnavailable(f"index unavailable: {exc.__class__.__name__}") from exc

    # -- index helpers ------------------------------------------------------------
    def _lookup(
        self, sop_uid: str, study_uid: str, series_uid: str, *, cached: bool = True
    ) -> tuple[Row[Any] | None, _Placement]:
        """The stored instance of this SOP Instance UID, if any, else where the index
        already files this study and series. One connection, or none at all for a
        series this process filed moments ago (``cached``): should the SOP Instance
        UID be stored already there (a sender sending again), the insert meets the
        unique key and is resolved like a concurrent receiver's copy
        (``_decide_and_store``), by the same rules; only the blob written meanwhile
        is deleted again."""
        place = self._places.get(series_uid) if cached else None
        if place is not None and place.series_study_uid == study_uid:
            return None, place
        try:
            with self.db.read_conn() as conn:
                existing = conn.execute(_SELECT_EXISTING, {"sop_uid": sop_uid}).first()
                if existing is not None or not series_uid:
                    return existing, _Placement()
                series_row = conn.execute(_SELECT_SERIES, {"series_uid": series_uid}).first()
                study_row = conn.execute(_SELECT_STUDY, {"study_uid": study_uid}).first()
        except (OperationalError, DBAPIError) as exc:
            raise IndexUnavailable(f"index unavailable: {exc.__class__.__name__}") from exc
        place = _Placement()
        if study_row is not None:
            place.study_fk, place.patient_fk = study_row[0], study_row[1]
            place.patient_key = (study_row[2], study_row[3])
        if series_row is not None:
            place.series_study_uid = series_row[1]
            if series_row[1] == study_uid:
                place.series_fk = series_row[0]
        return None, place

    def _remember(self, series_uid: str, place: _Placement) -> None:
        # Several receiving threads share this cache: evict under a lock.
        with self._places_lock:
            if len(self._places) >= _PLACEMENT_CACHE:
                self._places.pop(next(iter(self._places)), None)
            self._places[series_uid] = dataclasses.replace(place, cached=True)

    def _insert(self, table: Any, values: dict[str, object]):  # type: ignore[no-untyped-def]
        builder = sqlite_insert if self.db.is_sqlite else pg_insert
        return builder(table).values(**values).on_conflict_do_nothing()

    def _upsert(
        self,
        conn: Connection,
        table: Any,
        key_col: str,
        key: str,
        parent_col: str,
        values: dict[str, Any],
    ) -> tuple[int, int]:
        """Insert a study or series row unless it exists; its id and parent's id."""
        conn.execute(self._insert(table, {key_col: key, "created_at": utcnow(), **values}))
        row = conn.execute(
            select(table.c.id, table.c[parent_col]).where(table.c[key_col] == key)
        ).one()
        return row[0], row[1]

    def _upsert_patient(
        self, conn: Connection, issuer: str, patient_id: str, study_uid: str, values: dict[str, Any]
    ) -> int:
        unidentified = "" if patient_id else study_uid
        conn.execute(
            self._insert(
                _PATIENTS,
                {
                    "issuer": issuer,
                    "patient_id": patient_id,
                    "unidentified_study_uid": unidentified,
                    "created_at": utcnow(),
                    **values,
                },
            )
        )
        return conn.scalar(
            select(_PATIENTS.c.id).where(
                _PATIENTS.c.issuer == issuer,
                _PATIENTS.c.patient_id == patient_id,
                _PATIENTS.c.unidentified_study_uid == unidentified,
            )
        )

    @staticmethod
    def _result(cand: _Candidate, outcome: Outcome) -> IngestResult:
        return IngestResult(
            outcome=outcome,
            sop_class_uid=cand.sop_class_uid,
            sop_uid=cand.sop_uid,
            study_uid=cand.study_uid,
            series_uid=cand.series_uid,
            transfer_syntax=cand.transfer_syntax,
            size=cand.size,
        )


class _PlacementGone(ArchiveError):
    """Raised inside the index transaction when the series, study and patient an
    instance was to be filed under are no longer those rows (removed, or the study
    moved to another patient, meanwhile)."""


class _FiledElsewhere(ArchiveError):
    """Raised inside the index transaction when a concurrent receiver filed the study
    under another patient, or the series under another study."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(what)
        self.what = what
        self.detail = detail


def _blob_key(cand: _Candidate) -> str:
    """Where an instance's blob goes: named by its data set hash *and* its file meta.

    Two senders of one data set write different file meta (implementation UID,
    version name, lengths), so their files differ while the data set is the same.
    The index row records offsets into one particular file; were both files filed
    under one key, gateways racing on a shared store could leave a row describing
    the other file. With the meta's digest in the key each file has its own key;
    the losing copy is deleted as a duplicate.
    """
    meta = cand.meta_sha256
    if meta is None:
        try:
            with open(cand.path, "rb") as fh:
                meta = hashlib.sha256(fh.read(cand.layout.dataset_offset)).hexdigest()
        except OSError as exc:
            raise StorageUnavailable(f"staged file unreadable: {exc.strerror}") from exc
    meta = meta[:8]
    return (
        f"studies/{cand.study_uid}/{cand.series_uid}/{cand.sop_uid}.{cand.sha256[:16]}.{meta}.dcm"
    )


def _quarantine_key(cand: _Candidate) -> str:
    return f"quarantine/{cand.sop_uid}.{cand.sha256[:16]}.dcm"


def _event(
    cand: _Candidate, source: Source, kind: str, detail: str, blob_key: str | None = None
) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "kind": kind,
        "sop_uid": cand.sop_uid,
        "study_uid": cand.study_uid,
        "door": source.door[:16],
        "source_ae": source.ae_title[:16],
        "detail": detail,
        "blob_key": blob_key,
    }


def _arrival(source: Source, cand: _Candidate | None, outcome: str, reason: str) -> dict[str, Any]:
    return {
        "transfer_id": source.transfer_id,
        "at": utcnow(),
        "outcome": outcome,
        "sop_uid": cand.sop_uid if cand else "",
        "study_uid": cand.study_uid if cand else "",
        "series_uid": cand.series_uid if cand else "",
        "door": source.door[:16],
        "reason": reason[:2000],
    }


def _frame_offsets(cand: _Candidate) -> str | None:
    """Byte ranges of the frames, recorded so WADO-RS reads a frame by one ranged read.

    Cheap: from the layout already found, reading the file again only for encapsulated
    frames split over several fragments without a Basic Offset Table. A failure here
    never refuses an instance: the ranges are then computed when first needed.
    """
    try:
        return encode_ranges(frame_ranges(None, cand.layout, cand.ds, path=cand.path))
    except Exception as exc:  # odd image attributes: computed (or not) at read time
        log.debug("frame offsets of %s not recorded: %s", cand.sop_uid, exc)
        return None


def _hash_from(fh, offset: int) -> str:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256()
    fh.seek(offset)
    while chunk := fh.read(_HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _not_in_declared_syntax(layout: Layout) -> InvalidDataset:
    return InvalidDataset(
        f"data set is not encoded in its declared transfer syntax {layout.transfer_syntax}"
    )


def _has_encoding_of(ds: Dataset, ts: str) -> bool:
    """Whether pydicom read the data set with the encoding the transfer syntax implies."""
    uid = syntax_uid(ts)
    if not uid.is_transfer_syntax or uid.is_deflated:
        return True
    encoding = getattr(ds, "original_encoding", None)
    if not encoding or encoding[0] is None:
        return True
    return tuple(encoding) == (uid.is_implicit_VR, uid.is_little_endian)


def _guess_bare_transfer_syntax(path: Path) -> str:
    """Transfer syntax of a data set stored without file meta, from its first bytes."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, defer_size=1024)
        implicit, little = ds.original_encoding
    except Exception as exc:
        raise InvalidDataset(f"not a DICOM file: {exc}") from exc
    if "SOPInstanceUID" not in ds:
        raise InvalidDataset("not a DICOM file (no SOP Instance UID)")
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
