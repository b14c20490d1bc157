"""What the index keeps of a dataset: decoded, trimmed attribute values per level.

pydicom decodes text with the dataset's Specific Character Set (Korean ISO 2022
IR 149, Japanese IR 87/IR 13, GB18030, UTF-8, Latin-1 ...), so everything here is
Unicode. Values are cut to their column's length: a malformed dataset must not make
the index refuse a commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from gateway.archive.text import fold, normalize_date, split_pn, time_key


def text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable value is indexed as empty, not fatal
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")[:limit]


def integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, MultiValue | list | tuple):
            value = value[0]
        number = int(float(str(value)))
    except Exception:
        return None
    return number if -(2**31) <= number < 2**31 else None


def person_name(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else ""
    if isinstance(value, PersonName):
        return str(value).strip(" \x00")[:324]
    return str(value).strip(" \x00")[:324]


@dataclass(frozen=True)
class IndexedAttributes:
    """Attribute values of one instance, grouped by the level that owns them."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def extract(ds: Dataset) -> IndexedAttributes:
    name = person_name(ds, "PatientName")
    alpha, ideo, phon = split_pn(name)
    referring = person_name(ds, "ReferringPhysicianName")
    study_time = text(ds, "StudyTime", 16)
    patient = {
        "patient_name": name,
        "pn_alphabetic": alpha[:324],
        "pn_ideographic": ideo[:324],
        "pn_phonetic": phon[:324],
        "pn_alphabetic_fold": fold(alpha)[:324],
        "pn_ideographic_fold": fold(ideo)[:324],
        "pn_phonetic_fold": fold(phon)[:324],
        "birth_date": normalize_date(text(ds, "PatientBirthDate", 10))[:8],
        "sex": text(ds, "PatientSex", 16),
    }
    study = {
        "study_date": normalize_date(text(ds, "StudyDate", 10))[:8],
        "study_time": study_time,
        "study_time_key": time_key(study_time)[:16],
        "accession_number": text(ds, "AccessionNumber", 16),
        "study_id": text(ds, "StudyID", 16),
        "study_description": text(ds, "StudyDescription"),
        "referring_physician_name": referring,
        "referring_physician_name_fold": fold(referring)[:324],
        "institution_name": text(ds, "InstitutionName"),
    }
    series_time = text(ds, "SeriesTime", 16)
    pps_time = text(ds, "PerformedProcedureStepStartTime", 16)
    series = {
        "modality": text(ds, "Modality", 16),
        "series_number": integer(ds, "SeriesNumber"),
        "series_description": text(ds, "SeriesDescription"),
        "body_part_examined": text(ds, "BodyPartExamined", 16),
        "series_date": normalize_date(text(ds, "SeriesDate", 10))[:8],
        "series_time": series_time,
        "series_time_key": time_key(series_time)[:16],
        "pps_start_date": normalize_date(text(ds, "PerformedProcedureStepStartDate", 10))[:8],
        "pps_start_time": pps_time,
        "pps_start_time_key": time_key(pps_time)[:16],
    }
    return IndexedAttributes(patient, study, series, instance_attributes(ds))


def instance_attributes(ds: Dataset) -> dict[str, Any]:
    content_time = text(ds, "ContentTime", 16)
    return {
        "instance_number": integer(ds, "InstanceNumber"),
        "rows": integer(ds, "Rows"),
        "columns": integer(ds, "Columns"),
        "bits_allocated": integer(ds, "BitsAllocated"),
        "number_of_frames": integer(ds, "NumberOfFrames"),
        "content_date": normalize_date(text(ds, "ContentDate", 10))[:8],
        "content_time": content_time,
        "content_time_key": time_key(content_time)[:16],
    }


def other_patient_ids(ds: Dataset) -> set[tuple[str, str]]:
    """(Patient ID, Issuer) pairs from Other Patient IDs Sequence (and the retired list)."""
    pairs: set[tuple[str, str]] = set()
    try:
        for item in ds.get("OtherPatientIDsSequence") or []:
            pid = text(item, "PatientID")
            if pid:
                pairs.add((pid, text(item, "IssuerOfPatientID")))
    except Exception:
        return pairs
    return pairs
