"""Retention: until when each study must be kept, legal holds, and what is due.

The period comes from a policy per record type (``Settings.retention_years``, keyed
by modality; ``retention_default_years`` otherwise); a study with several
modalities takes the longest. It counts from the Study Date, or from the day the
study arrived when it has no valid Study Date. A transfer's studies get their date
when the transfer is finalized (custodianship passes to the archive); any other
study by ``studybridge retention apply``.

The retention report lists studies past their date and not on legal hold. Only
``delete_due``, an explicit operator command (``studybridge retention delete``),
deletes, and only those: each study is audited (``consent.audit``) before it goes,
its retention row is re-read and locked in the transaction that deletes its index
rows (a hold placed meanwhile wins), and its blobs are deleted after that commit
(``gateway.archive.removal``: the durable order).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from consent.audit import Attempt, Auditor
from consent.principals import Principal
from gateway.archive import Archive
from gateway.archive.db import Database
from gateway.archive.models import Instance, Patient, Series, Study, utcnow
from gateway.archive.removal import remove_blobs, remove_study_rows
from gateway.config import Settings
from gateway.transfers.models import StudyRetention


class RetentionError(ValueError):
    """A retention change cannot be made as asked."""


@dataclass(frozen=True)
class RetentionLine:
    study_uid: str
    patient_id: str
    study_date: str
    retain_until: dt.date
    record_type: str
    years: int
    legal_hold: bool
    hold_reason: str

    def as_dict(self) -> dict[str, Any]:
        data = self.__dict__.copy()
        data["retain_until"] = self.retain_until.isoformat()
        return data


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February into a common year
        return day.replace(year=day.year + years, day=28)


def _start(study_date: str, created: dt.datetime) -> dt.date:
    try:
        return dt.datetime.strptime(study_date[:8], "%Y%m%d").date()
    except ValueError:
        return created.date()


def policy_for(settings: Settings, modalities: Iterable[str]) -> tuple[str, int]:
    """The record type and years that apply to a study with these modalities."""
    table = {k.upper(): v for k, v in settings.retention_years.items()}
    best = ("default", settings.retention_default_years)
    found = [(m, table[m]) for m in sorted({m.upper() for m in modalities if m}) if m in table]
    if found:
        best = max(found, key=lambda item: item[1])
    return best


def apply_retention(
    db: Database,
    settings: Settings,
    study_uids: Iterable[str] | None = None,
    *,
    recompute: bool = False,
) -> int:
    """Give studies (all, or these) a retain-until date; the number set.

    Studies that have one keep it unless ``recompute``; a legal hold is never lifted.
    """
    wanted = None if study_uids is None else set(study_uids)
    with db.writing() as session:
        stmt = select(Study.id, Study.study_uid, Study.study_date, Study.created_at)
        if wanted is not None:
            if not wanted:
                return 0
            stmt = stmt.where(Study.study_uid.in_(wanted))
        studies = session.execute(stmt).all()
        modalities: dict[int, set[str]] = defaultdict(set)
        for study_fk, modality in session.execute(
            select(Series.study_fk, Series.modality).where(
                Series.study_fk.in_([s.id for s in studies])
            )
        ):
            modalities[study_fk].add(modality)
        existing = {
            r.study_uid: r
            for r in session.scalars(
                select(StudyRetention).where(
                    StudyRetention.study_uid.in_([s.study_uid for s in studies])
                )
            )
        }
        count = 0
        now = utcnow()
        for study in studies:
            row = existing.get(study.study_uid)
            if row is not None and not recompute:
                continue
            record_type, years = policy_for(settings, modalities[study.id])
            until = _add_years(_start(study.study_date, study.created_at), years)
            if row is None:
                row = StudyRetention(study_uid=study.study_uid, legal_hold=False, hold_reason="")
                session.add(row)
            row.retain_until, row.record_type, row.years, row.updated_at = (
                until,
                record_type,
                years,
                now,
            )
            count += 1
    return count


def set_hold(db: Database, study_uid: str, *, hold: bool, reason: str = "") -> None:
    with db.writing() as session:
        row = session.scalar(select(StudyRetention).where(StudyRetention.study_uid == study_uid))
        if row is None:
            raise RetentionError(
                f"study {study_uid} has no retention date yet: run `studybridge retention apply`"
            )
        if hold and not reason.strip():
            raise RetentionError("a legal hold needs a reason")
        row.legal_hold = hold
        row.hold_reason = reason.strip() if hold else ""
        row.hold_at = utcnow() if hold else None
        row.updated_at = utcnow()


def retention_lines(
    db: Database, *, due_on: dt.date | None = None, holds: bool = False
) -> list[RetentionLine]:
    """Studies due on ``due_on`` (past their date, not on hold), or the holds."""
    stmt = (
        select(
            StudyRetention.study_uid,
            Patient.patient_id,
            Study.study_date,
            StudyRetention.retain_until,
            StudyRetention.record_type,
            StudyRetention.years,
            StudyRetention.legal_hold,
            StudyRetention.hold_reason,
        )
        .join(Study, Study.study_uid == StudyRetention.study_uid)
        .join(Patient, Patient.id == Study.patient_fk)
        .order_by(StudyRetention.retain_until, StudyRetention.study_uid)
    )
    if holds:
        stmt = stmt.where(StudyRetention.legal_hold.is_(True))
    else:
        stmt = stmt.where(
            StudyRetention.legal_hold.is_(False),
            StudyRetention.retain_until <= (due_on or dt.date.today()),
        )
    with db.read_conn() as conn:
        return [RetentionLine(*row) for row in conn.execute(stmt)]


DELETE_OPERATION = "retention-delete"


@dataclass(frozen=True)
class Deletion:
    study_uid: str
    # deleted, or refused (not due, on legal hold, unknown)
    outcome: str
    instances: int = 0
    bytes: int = 0
    reason: str = ""
    # Blobs the store could not delete now (the orphan sweep removes them).
    blobs_left: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def delete_due(
    archive: Archive,
    principal: Principal,
    auditor: Auditor,
    *,
    due_on: dt.date | None = None,
    study_uids: Iterable[str] | None = None,
    door: str = "cli",
) -> list[Deletion]:
    """Delete the studies due on ``due_on`` (all of them, or those of ``study_uids``
    that are due), each audited first; named studies that are not due are refused
    (and audited as denied)."""
    day = due_on or dt.date.today()
    due = {line.study_uid: line for line in retention_lines(archive.db, due_on=day)}
    wanted = list(due) if study_uids is None else list(dict.fromkeys(study_uids))
    done: list[Deletion] = []
    for uid in wanted:
        line = due.get(uid)
        if line is None:
            done.append(_refuse(auditor, principal, door, uid, "not due, on legal hold or unknown"))
            continue
        instances, size = _extent(archive.db, uid)
        # Fail closed: if the record cannot be written, nothing is deleted.
        _audit(
            auditor,
            principal,
            door,
            uid,
            "allowed",
            f"retain_until={line.retain_until.isoformat()}; record_type={line.record_type}; "
            f"instances={instances}; bytes={size}",
        )
        done.append(_delete_one(archive, principal, auditor, door, uid, day))
    return done


def _extent(db: Database, study_uid: str) -> tuple[int, int]:
    with db.reading() as session:
        count, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
            .join(Series, Series.id == Instance.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .where(Study.study_uid == study_uid)
        ).one()
    return int(count), int(size)


def _delete_one(
    archive: Archive, principal: Principal, auditor: Auditor, door: str, uid: str, day: dt.date
) -> Deletion:
    try:
        with archive.db.writing() as session:
            row = session.scalar(
                select(StudyRetention).where(StudyRetention.study_uid == uid).with_for_update()
            )
            if row is None or row.legal_hold or row.retain_until > day:
                removed = None
            else:
                removed = remove_study_rows(session, uid)
                session.delete(row)
    except Exception as exc:
        detail = f"index rows not deleted: {exc.__class__.__name__}"
        _audit(auditor, principal, door, uid, "error", detail)
        raise
    if removed is None:
        return _refuse(auditor, principal, door, uid, "placed on legal hold meanwhile")
    remove_blobs(archive.store, removed)
    return Deletion(uid, "deleted", removed.instances, removed.bytes, blobs_left=len(removed.left))


def _refuse(auditor: Auditor, principal: Principal, door: str, uid: str, reason: str) -> Deletion:
    _audit(auditor, principal, door, uid, "denied", reason)
    return Deletion(uid, "refused", reason=reason)


def _audit(
    auditor: Auditor, principal: Principal, door: str, uid: str, outcome: str, detail: str
) -> None:
    auditor.record(
        Attempt(
            principal=principal,
            door=door,
            operation=DELETE_OPERATION,
            outcome=outcome,
            study_uid=uid,
            detail=detail,
        )
    )
