"""What the index keeps of a dataset: decoded, trimmed attribute values per level.

pydicom decodes text with the dataset's Specific Character Set (Korean ISO 2022
IR 149, Japanese IR 87/IR 13, GB18030, UTF-8, Latin-1 ...), so everything here is
Unicode. Values are cut to their column's length: a malformed dataset must not make
the index refuse a commit.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from gateway.archive.text import fold, normalize_date, split_pn, time_key

# -- reading values without pydicom's conversion ---------------------------------------
# Every stored instance has a dozen of its values read on the ingest path (UIDs, Patient
# ID, instance and image attributes). Asking pydicom costs tens of microseconds each
# (keyword lookup, raw element conversion, the dataset's character set); these read
# the still-raw element directly when the answer is certainly what pydicom would give,
# and ask pydicom otherwise.

PYDICOM: Final = object()  # "ask pydicom": the value is not one read directly here
# String VRs whose single ASCII value pydicom decodes as itself minus trailing spaces and
# NULs, whatever the Specific Character Set (SH/LO are decoded with it, but every
# character set pydicom supports reads ASCII without escape sequences as ASCII).
# (Not AE, DS, IS: pydicom strips leading spaces of AE and makes objects of DS and IS.)
_PLAIN_VRS = frozenset({"AS", "CS", "LO", "SH", "UI"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})  # plain unless pydicom converts them to objects
_INTEGER = re.compile(rb" *[+-]?[0-9]+ *")


@cache
def tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


def _raw(ds: Dataset, tag: int) -> Any:
    """The element still raw (not yet converted by pydicom), None if absent, else PYDICOM."""
    try:
        elem = ds.get_item(tag)
    except Exception:  # a deferred value that cannot be read: pydicom reports it
        return PYDICOM
    if elem is None:
        return None
    if type(elem) is not RawDataElement or elem.value is None:
        return PYDICOM
    return elem


def _vr(elem: RawDataElement) -> str | None:
    if elem.VR is not None:
        return elem.VR
    try:
        return str(dictionary_VR(elem.tag))  # implicit VR: the dictionary's
    except KeyError:
        return None


def plain_string(ds: Dataset, tag: int) -> Any:
    """The value of a single-valued ASCII string element exactly as pydicom would
    decode it (``str()`` of it), None if the element is absent, or PYDICOM."""
    elem = _raw(ds, tag)
    if elem is None or elem is PYDICOM:
        return elem
    if config.settings.reading_validation_mode == config.RAISE:
        return PYDICOM  # pydicom would refuse an invalid value: let it
    vr = _vr(elem)
    if vr not in _PLAIN_VRS and (vr not in _DATE_VRS or config.datetime_conversion):
        return PYDICOM
    value = elem.value
    if not value.isascii() or b"\\" in value or b"\x1b" in value:
        return PYDICOM
    if config.use_none_as_empty_text_VR_value and not value:
        return PYDICOM
    return value.decode("ascii").rstrip("\x00 ")


def plain_integer(ds: Dataset, tag: int) -> Any:
    """The value of a single-valued US/SS/UL/SL element, or of an IS element holding
    one plain integer, None if absent or empty, or PYDICOM."""
    elem = _raw(ds, tag)
    if elem is None or elem is PYDICOM:
        return elem
    value, vr = elem.value, _vr(elem)
    if not value:
        return None if elem.length == 0 else PYDICOM
    endian = "<" if elem.is_little_endian else ">"
    if vr in ("US", "SS") and len(value) == 2:
        return struct.unpack(endian + ("H" if vr == "US" else "h"), value)[0]
    if vr in ("UL", "SL") and len(value) == 4:
        return struct.unpack(endian + ("L" if vr == "UL" else "l"), value)[0]
    if vr == "IS" and _INTEGER.fullmatch(value):
        return int(value)
    return PYDICOM


def value_of(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, read directly when the element is a plain string."""
    plain = plain_string(ds, tag_of(keyword))
    return ds.get(keyword) if plain is PYDICOM else plain


def text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    plain = plain_string(ds, tag_of(keyword))
    if plain is not PYDICOM:
        return (plain or "").strip(" \x00")[:limit]
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
    plain = plain_integer(ds, tag_of(keyword))
    if plain is not PYDICOM:
        return plain if plain is None or -(2**31) <= plain < 2**31 else None
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
