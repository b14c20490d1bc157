"""The patients of a transfer: the list a closing clinic needs for its mandatory notice.

One line per patient (Patient ID + issuer) whose studies studybridge holds under
the transfer: name, birth date, sex, number of studies, first and last study date.
Patient data: printed for the operator only, never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import distinct, func, select

from gateway.archive.db import Database
from gateway.archive.models import Instance, Patient, Series, Study, TransferArrival
from gateway.transfers.report import HELD


@dataclass(frozen=True)
class AffectedPatient:
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    studies: int
    first_study_date: str
    last_study_date: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def affected_patients(db: Database, transfer_id: int) -> list[AffectedPatient]:
    held_sops = (
        select(TransferArrival.sop_uid)
        .where(TransferArrival.transfer_id == transfer_id, TransferArrival.outcome.in_(HELD))
        .scalar_subquery()
    )
    stmt = (
        select(
            Patient.patient_id,
            Patient.issuer,
            Patient.patient_name,
            Patient.birth_date,
            Patient.sex,
            func.count(distinct(Study.id)),
            func.min(Study.study_date),
            func.max(Study.study_date),
        )
        .join(Study, Study.patient_fk == Patient.id)
        .join(Series, Series.study_fk == Study.id)
        .join(Instance, Instance.series_fk == Series.id)
        .where(Instance.sop_uid.in_(held_sops))
        .group_by(Patient.id)
        .order_by(Patient.patient_name, Patient.patient_id)
    )
    with db.read_conn() as conn:
        return [AffectedPatient(*row) for row in conn.execute(stmt)]
