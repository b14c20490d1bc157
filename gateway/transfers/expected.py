"""What a transfer should deliver: manifests uploaded by the clinic, census results.

A manifest is CSV or JSON listing studies, optionally per series, with instance
counts:

- CSV with a header row; columns (case-insensitive, DICOM keywords or short names):
  ``StudyInstanceUID`` (required), ``SeriesInstanceUID``, ``NumberOfInstances``
  (also ``instances``, ``NumberOfStudyRelatedInstances``,
  ``NumberOfSeriesRelatedInstances``), ``PatientID``, ``StudyDate``, ``Modality``.
  A line without a series counts the whole study.
- JSON: a list of studies ``{"StudyInstanceUID": ..., "NumberOfInstances": n,
  "PatientID": ..., "StudyDate": ..., "series": [{"SeriesInstanceUID": ...,
  "Modality": ..., "NumberOfInstances": n}, ...]}`` (or an object with such a list
  under ``"studies"``).

Every UID is validated; a bad line refuses the whole manifest with its line number,
so nothing half-loaded is ever reconciled against.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from gateway.archive.db import Database
from gateway.archive.errors import InvalidUID
from gateway.archive.models import utcnow
from gateway.archive.uids import check_uid
from gateway.transfers.models import TransferExpected


class ManifestError(ValueError):
    """The manifest cannot be read; nothing of it was loaded."""


@dataclass(frozen=True)
class ExpectedLine:
    study_uid: str
    series_uid: str = ""
    instances: int | None = None
    patient_id: str = ""
    study_date: str = ""
    modality: str = ""


_ALIASES = {
    "studyinstanceuid": "study_uid",
    "study_uid": "study_uid",
    "study": "study_uid",
    "seriesinstanceuid": "series_uid",
    "series_uid": "series_uid",
    "series": "series_uid",
    "numberofinstances": "instances",
    "instances": "instances",
    "count": "instances",
    "numberofstudyrelatedinstances": "instances",
    "numberofseriesrelatedinstances": "instances",
    "patientid": "patient_id",
    "patient_id": "patient_id",
    "studydate": "study_date",
    "study_date": "study_date",
    "modality": "modality",
}


def parse_manifest(path: Path) -> list[ExpectedLine]:
    """Read a CSV or JSON manifest (by content: JSON starts with ``[`` or ``{``)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        return _parse_json(stripped)
    return _parse_csv(text)


def _line(fields: dict[str, Any], where: str) -> ExpectedLine:
    norm: dict[str, Any] = {}
    for key, value in fields.items():
        name = _ALIASES.get(str(key).strip().lower())
        if name is not None and value not in (None, ""):
            norm[name] = value
    try:
        study = check_uid(str(norm.get("study_uid", "")).strip(), "Study Instance UID")
        series = str(norm.get("series_uid", "")).strip()
        if series:
            series = check_uid(series, "Series Instance UID")
    except InvalidUID as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    count = norm.get("instances")
    instances: int | None = None
    if count is not None:
        try:
            instances = int(str(count).strip())
        except ValueError as exc:
            raise ManifestError(f"{where}: instance count {count!r} is not a number") from exc
        if instances < 0:
            raise ManifestError(f"{where}: negative instance count")
    return ExpectedLine(
        study_uid=study,
        series_uid=series,
        instances=instances,
        patient_id=str(norm.get("patient_id", "")).strip()[:64],
        study_date=str(norm.get("study_date", "")).strip()[:8],
        modality=str(norm.get("modality", "")).strip()[:16],
    )


def _parse_csv(text: str) -> list[ExpectedLine]:
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else "", ",;\t")
    except csv.Error:
        dialect = csv.excel  # type: ignore[assignment]
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    if not reader.fieldnames or not any(
        _ALIASES.get(f.strip().lower()) == "study_uid" for f in reader.fieldnames
    ):
        raise ManifestError("CSV manifest needs a header row with a StudyInstanceUID column")
    lines = [_line(row, f"line {n}") for n, row in enumerate(reader, start=2)]
    return _check_unique(lines)


def _parse_json(text: str) -> list[ExpectedLine]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"JSON manifest is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("studies")
    if not isinstance(data, list):
        raise ManifestError('JSON manifest must be a list of studies (or {"studies": [...]})')
    lines: list[ExpectedLine] = []
    for n, study in enumerate(data, start=1):
        if not isinstance(study, dict):
            raise ManifestError(f"study {n}: not an object")
        series = study.get("series") or []
        base = {k: v for k, v in study.items() if k != "series"}
        if not isinstance(series, list):
            raise ManifestError(f"study {n}: 'series' must be a list")
        if not series or any(_ALIASES.get(k.lower()) == "instances" for k in base):
            lines.append(_line(base, f"study {n}"))
        for m, item in enumerate(series, start=1):
            if not isinstance(item, dict):
                raise ManifestError(f"study {n} series {m}: not an object")
            merged = {**{k: v for k, v in base.items() if _ALIASES.get(k.lower()) != "instances"}}
            merged.update(item)
            lines.append(_line(merged, f"study {n} series {m}"))
    return _check_unique(lines)


def _check_unique(lines: list[ExpectedLine]) -> list[ExpectedLine]:
    seen: set[tuple[str, str]] = set()
    for line in lines:
        key = (line.study_uid, line.series_uid)
        if key in seen:
            what = f"series {line.series_uid}" if line.series_uid else f"study {line.study_uid}"
            raise ManifestError(f"{what} is listed twice")
        seen.add(key)
    if not lines:
        raise ManifestError("the manifest lists no study")
    return lines


def store_expected(
    db: Database,
    transfer_id: int,
    lines: list[ExpectedLine],
    *,
    origin: str,
    replace: bool = False,
) -> int:
    """Record expected lines (a line for the same study/series is overwritten).

    With ``replace`` every earlier expectation of the transfer is dropped first.
    Returns the number of lines written. One transaction: all or nothing.
    """
    now = utcnow()
    with db.writing() as session:
        if replace:
            session.execute(
                delete(TransferExpected).where(TransferExpected.transfer_fk == transfer_id)
            )
            existing: dict[tuple[str, str], TransferExpected] = {}
        else:
            existing = {
                (r.study_uid, r.series_uid): r
                for r in session.scalars(
                    select(TransferExpected).where(TransferExpected.transfer_fk == transfer_id)
                )
            }
        for line in lines:
            row = existing.get((line.study_uid, line.series_uid))
            if row is None:
                row = TransferExpected(
                    transfer_fk=transfer_id, study_uid=line.study_uid, series_uid=line.series_uid
                )
                session.add(row)
            row.instances = line.instances
            row.patient_id = line.patient_id
            row.study_date = line.study_date
            row.modality = line.modality
            row.origin = origin
            row.loaded_at = now
    return len(lines)


def expected_lines(db: Database, transfer_id: int) -> list[TransferExpected]:
    with db.reading() as session:
        return list(
            session.scalars(
                select(TransferExpected)
                .where(TransferExpected.transfer_fk == transfer_id)
                .order_by(TransferExpected.study_uid, TransferExpected.series_uid)
            )
        )
