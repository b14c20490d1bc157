"""Removing a study from the archive: index rows first, then its blobs.

The reverse of the durability order of ingest (blob, then index): the index rows
(instances, series, the study and its senders, and the patient when it has no other study) are
deleted and committed first, so no index row ever names a missing blob; then the
instance blobs and the study's derived artifacts (``metadata/``, ``thumbnails/``)
are deleted. A crash or a blob store failure between the two leaves orphan
instance blobs, which the orphan sweep removes after its grace period, never a
dangling row (derived artifacts left behind are logged: nothing serves them once
their study is gone).

``remove_study_rows`` works inside the caller's transaction, so a caller can check
in the same transaction that the study may still go (retention, legal hold), and
``remove_blobs`` runs after that transaction committed. Who may remove what, and the
audit record, are the caller's business.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from gateway.archive.blobstore import BlobStore
from gateway.archive.errors import StorageUnavailable
from gateway.archive.models import Instance, Patient, Series, Study, StudySource
from gateway.archive.uids import check_uid

log = logging.getLogger(__name__)

DERIVED_PREFIXES = ("metadata/", "thumbnails/")


@dataclass
class RemovedStudy:
    study_uid: str
    instances: int = 0
    bytes: int = 0
    blob_keys: list[str] = field(default_factory=list)
    # Blobs that could not be deleted (left to the orphan sweep).
    left: list[str] = field(default_factory=list)


def remove_study_rows(session: Session, study_uid: str) -> RemovedStudy | None:
    """Delete a study's index rows in ``session`` (not committed); None if unknown."""
    study = session.scalar(
        select(Study).where(Study.study_uid == check_uid(study_uid, "Study Instance UID"))
    )
    if study is None:
        return None
    series_ids = list(session.scalars(select(Series.id).where(Series.study_fk == study.id)))
    rows = session.execute(
        select(Instance.blob_key, Instance.size).where(Instance.series_fk.in_(series_ids))
    ).all()
    removed = RemovedStudy(
        study_uid=study.study_uid,
        instances=len(rows),
        bytes=sum(size for _key, size in rows),
        blob_keys=[key for key, _size in rows],
    )
    if series_ids:
        session.execute(delete(Instance).where(Instance.series_fk.in_(series_ids)))
        session.execute(delete(Series).where(Series.id.in_(series_ids)))
    patient_fk = study.patient_fk
    session.execute(delete(StudySource).where(StudySource.study_fk == study.id))
    session.execute(delete(Study).where(Study.id == study.id))
    others = session.scalar(select(func.count(Study.id)).where(Study.patient_fk == patient_fk))
    if not others:
        session.execute(delete(Patient).where(Patient.id == patient_fk))
    return removed


def remove_blobs(store: BlobStore, removed: RemovedStudy) -> RemovedStudy:
    """Delete the blobs of a study whose rows are gone (after their commit)."""
    keys = list(removed.blob_keys)
    for prefix in DERIVED_PREFIXES:
        try:
            keys += list(store.iter_keys(f"{prefix}{removed.study_uid}/"))
        except StorageUnavailable as exc:
            log.warning("cannot list %s of %s: %s", prefix, removed.study_uid, exc)
    for key in keys:
        try:
            store.delete(key)
        except (StorageUnavailable, OSError) as exc:
            log.warning("blob %s left for the orphan sweep: %s", key, exc)
            removed.left.append(key)
    return removed
