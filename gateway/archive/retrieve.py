"""The one retrieve path: which stored instances a request names, and their bytes.

C-MOVE, C-GET and (later) WADO-RS, downloads and the viewer all resolve their
request to ``StoredInstance`` records here and read the bytes through the blob
store: the data set exactly as received starts at ``dataset_offset`` of the blob.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select

from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database
from gateway.archive.errors import InvalidQuery
from gateway.archive.models import Instance, Patient, Series, Study
from gateway.archive.query import Level
from gateway.archive.uids import is_valid_uid


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    blob_key: str
    dataset_offset: int
    size: int
    sha256: str
    number_of_frames: int | None = None


@dataclass(frozen=True)
class RetrieveRequest:
    """What to retrieve: the UIDs (lists allowed) down to the requested level."""

    level: Level
    patient_ids: Sequence[str] = ()
    issuer: str | None = None
    study_uids: Sequence[str] = ()
    series_uids: Sequence[str] = ()
    sop_uids: Sequence[str] = ()


def _check(uids: Sequence[str], what: str) -> list[str]:
    cleaned = [u.strip() for u in uids if u and u.strip()]
    for uid in cleaned:
        if not is_valid_uid(uid):
            raise InvalidQuery(f"{what} is not a valid UID: {uid[:70]!r}")
    return cleaned


def find_instances(db: Database, request: RetrieveRequest) -> list[StoredInstance]:
    """Instances a retrieve request names, in series then instance order."""
    studies = _check(request.study_uids, "Study Instance UID")
    series = _check(request.series_uids, "Series Instance UID")
    sops = _check(request.sop_uids, "SOP Instance UID")
    level = request.level
    stmt = (
        select(Instance, Series.series_uid, Study.study_uid)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
    )
    if level is Level.PATIENT:
        pids = [p for p in request.patient_ids if p]
        if not pids:
            raise InvalidQuery("a PATIENT level retrieve needs a Patient ID")
        stmt = stmt.join(Patient, Study.patient_fk == Patient.id).where(
            Patient.patient_id.in_(pids)
        )
        if request.issuer:
            stmt = stmt.where(Patient.issuer == request.issuer)
    elif level is Level.STUDY:
        if not studies:
            raise InvalidQuery("a STUDY level retrieve needs a Study Instance UID")
        stmt = stmt.where(Study.study_uid.in_(studies))
    elif level is Level.SERIES:
        if not series:
            raise InvalidQuery("a SERIES level retrieve needs a Series Instance UID")
        stmt = stmt.where(Series.series_uid.in_(series))
        if studies:
            stmt = stmt.where(Study.study_uid.in_(studies))
    else:
        if not sops:
            raise InvalidQuery("an IMAGE level retrieve needs a SOP Instance UID")
        stmt = stmt.where(Instance.sop_uid.in_(sops))
        if series:
            stmt = stmt.where(Series.series_uid.in_(series))
        if studies:
            stmt = stmt.where(Study.study_uid.in_(studies))
    stmt = stmt.order_by(
        Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id
    )
    with db.reading() as session:
        return [
            StoredInstance(
                sop_class_uid=inst.sop_class_uid,
                sop_uid=inst.sop_uid,
                study_uid=study_uid,
                series_uid=series_uid,
                transfer_syntax_uid=inst.transfer_syntax_uid,
                blob_key=inst.blob_key,
                dataset_offset=inst.dataset_offset,
                size=inst.size,
                sha256=inst.sha256,
                number_of_frames=inst.number_of_frames,
            )
            for inst, series_uid, study_uid in session.execute(stmt).all()
        ]


def open_dataset(store: BlobStore, inst: StoredInstance) -> BinaryIO:
    """A stream positioned at the first byte of the data set as received."""
    fh = store.open(inst.blob_key)
    fh.seek(inst.dataset_offset)
    return fh


def iter_dataset_bytes(
    store: BlobStore, inst: StoredInstance, chunk_size: int = 1024 * 1024
) -> Iterator[bytes]:
    with open_dataset(store, inst) as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


@contextlib.contextmanager
def local_part10(store: BlobStore, inst: StoredInstance) -> Iterator[Path]:
    """A local Part 10 file of the instance (the blob itself for the file store)."""
    with store.local_path(inst.blob_key) as path:
        yield path
