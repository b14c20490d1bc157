"""Reconciliation of a transfer: what was expected against what arrived.

Expected lines come from a manifest or a census (``expected``); arrivals from the
log ``ingest`` writes for the transfer (``transfer_arrivals``). An instance counts
as received when the archive holds it (stored now, or already held with the same
content or in another syntax); the hashes and sizes are those of the copy held.

Per study and series the report says ``complete`` (at least the expected count
held), ``partial`` or ``missing``; series and studies that arrived without being
expected are ``extra``; refused instances are listed with their reasons (unless
the same instance was held later); arrivals of an instance already held in this
transfer are counted as duplicates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from gateway.archive.db import Database
from gateway.archive.models import Instance, TransferArrival
from gateway.transfers.commitments import CommitmentInfo, commitments
from gateway.transfers.expected import expected_lines

HELD = ("stored", "duplicate", "alternate-syntax", "reconciled-copy")


@dataclass(frozen=True)
class HeldInstance:
    sop_uid: str
    study_uid: str
    series_uid: str
    sha256: str
    size: int


@dataclass
class SeriesLine:
    series_uid: str
    expected: int | None
    received: int
    status: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "expected": self.expected,
            "received": self.received,
            "status": self.status,
        }


@dataclass
class StudyLine:
    study_uid: str
    patient_id: str
    study_date: str
    expected: int | None
    received: int
    status: str
    series: list[SeriesLine] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "study_date": self.study_date,
            "expected": self.expected,
            "received": self.received,
            "status": self.status,
            "series": [s.as_dict() for s in self.series],
        }


@dataclass
class Rejection:
    sop_uid: str
    study_uid: str
    reason: str
    times: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "sop_uid": self.sop_uid,
            "study_uid": self.study_uid,
            "reason": self.reason,
            "times": self.times,
        }


@dataclass
class Reconciliation:
    transfer_id: int
    studies: list[StudyLine]
    held: list[HeldInstance]
    rejected: list[Rejection]
    duplicates: int
    arrivals: int

    @property
    def has_expectation(self) -> bool:
        return any(s.status != "extra" for s in self.studies)

    @property
    def missing(self) -> list[StudyLine]:
        return [s for s in self.studies if s.status in ("missing", "partial")]

    @property
    def complete(self) -> bool:
        return self.has_expectation and not self.missing

    def counts(self) -> dict[str, int]:
        expected = [s for s in self.studies if s.status != "extra"]
        return {
            "expected_studies": len(expected),
            "expected_instances": sum(s.expected or 0 for s in expected),
            "studies": len({h.study_uid for h in self.held}),
            "series": len({h.series_uid for h in self.held}),
            "instances": len(self.held),
            "bytes": sum(h.size for h in self.held),
            "complete_studies": sum(1 for s in self.studies if s.status == "complete"),
            "partial_studies": sum(1 for s in self.studies if s.status == "partial"),
            "missing_studies": sum(1 for s in self.studies if s.status == "missing"),
            "extra_studies": sum(1 for s in self.studies if s.status == "extra"),
            "rejected": len(self.rejected),
            "duplicates": self.duplicates,
            "arrivals": self.arrivals,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "complete": self.complete,
            "counts": self.counts(),
            "studies": [s.as_dict() for s in self.studies],
            "rejected": [r.as_dict() for r in self.rejected],
        }


def held_instances(db: Database, transfer_id: int) -> tuple[list[HeldInstance], int, int]:
    """Instances the archive holds for this transfer, sorted by SOP Instance UID;
    plus the number of duplicate arrivals and of all arrivals."""
    arrivals = TransferArrival.__table__
    instances = Instance.__table__
    with db.read_conn() as conn:
        rows = conn.execute(
            select(
                arrivals.c.sop_uid,
                arrivals.c.study_uid,
                arrivals.c.series_uid,
                instances.c.sha256,
                instances.c.size,
            )
            .join(instances, instances.c.sop_uid == arrivals.c.sop_uid)
            .where(arrivals.c.transfer_id == transfer_id, arrivals.c.outcome.in_(HELD))
            .order_by(arrivals.c.sop_uid)
        ).all()
        total = conn.scalar(
            select(func.count()).select_from(arrivals).where(arrivals.c.transfer_id == transfer_id)
        )
    held: dict[str, HeldInstance] = {}
    for sop, study, series, sha, size in rows:
        if sop not in held:
            held[sop] = HeldInstance(sop, study, series, sha, int(size))
    return list(held.values()), len(rows) - len(held), int(total or 0)


def _rejections(db: Database, transfer_id: int, held: set[str]) -> list[Rejection]:
    arrivals = TransferArrival.__table__
    with db.read_conn() as conn:
        rows = conn.execute(
            select(arrivals.c.sop_uid, arrivals.c.study_uid, arrivals.c.reason)
            .where(arrivals.c.transfer_id == transfer_id, arrivals.c.outcome == "rejected")
            .order_by(arrivals.c.id)
        ).all()
    grouped: dict[tuple[str, str], Rejection] = {}
    for sop, study, reason in rows:
        if sop and sop in held:
            continue  # refused once, held later (a retry after a transient failure)
        key = (sop, reason)
        if key in grouped:
            grouped[key].times += 1
        else:
            grouped[key] = Rejection(sop, study, reason, 1)
    return list(grouped.values())


def _status(expected: int | None, received: int) -> str:
    if received == 0:
        return "missing"
    if expected is None or received >= expected:
        return "complete"
    return "partial"


def reconcile(db: Database, transfer_id: int) -> Reconciliation:
    held, duplicates, arrivals = held_instances(db, transfer_id)
    per_series: dict[str, int] = defaultdict(int)
    per_study: dict[str, int] = defaultdict(int)
    series_of_study: dict[str, set[str]] = defaultdict(set)
    for h in held:
        per_series[h.series_uid] += 1
        per_study[h.study_uid] += 1
        series_of_study[h.study_uid].add(h.series_uid)

    grouped: dict[str, list[Any]] = defaultdict(list)
    for row in expected_lines(db, transfer_id):
        grouped[row.study_uid].append(row)

    studies: list[StudyLine] = []
    for study_uid, rows in grouped.items():
        study_row = next((r for r in rows if not r.series_uid), None)
        series_rows = [r for r in rows if r.series_uid]
        first = study_row or series_rows[0]
        lines = [
            SeriesLine(r.series_uid, r.instances, per_series[r.series_uid], "") for r in series_rows
        ]
        for line in lines:
            line.status = _status(line.expected, line.received)
        if series_rows:
            listed = {r.series_uid for r in series_rows}
            for extra in sorted(series_of_study[study_uid] - listed):
                lines.append(SeriesLine(extra, None, per_series[extra], "extra"))
        if study_row is not None:
            expected = study_row.instances
        elif all(r.instances is not None for r in series_rows):
            expected = sum(r.instances for r in series_rows)
        else:
            expected = None
        received = per_study[study_uid]
        status = _status(expected, received)
        if status == "complete" and any(s.status in ("missing", "partial") for s in lines):
            status = "partial"
        studies.append(
            StudyLine(
                study_uid, first.patient_id, first.study_date, expected, received, status, lines
            )
        )
    for study_uid in sorted(set(per_study) - set(grouped)):
        studies.append(
            StudyLine(
                study_uid,
                "",
                "",
                None,
                per_study[study_uid],
                "extra",
                [
                    SeriesLine(s, None, per_series[s], "extra")
                    for s in sorted(series_of_study[study_uid])
                ],
            )
        )
    rejected = _rejections(db, transfer_id, {h.sop_uid for h in held})
    return Reconciliation(transfer_id, studies, held, rejected, duplicates, arrivals)


@dataclass
class TransferReport:
    """The transfer report: the reconciliation and the Storage Commitment answers."""

    reconciliation: Reconciliation
    commitments: list[CommitmentInfo]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.reconciliation.as_dict(),
            "commitments": [c.as_dict() for c in self.commitments],
        }


def transfer_report(db: Database, transfer_id: int) -> TransferReport:
    return TransferReport(reconcile(db, transfer_id), commitments(db, transfer_id=transfer_id))
