"""Import reconciliation for the receiving institution (IHE RAD IRWF.b style).

The copy sent to a receiving PACS carries that institution's identifiers: Patient
ID and Issuer of Patient ID (and optionally Accession Number) are coerced to the
values it gave. The identifiers the study had are kept in the copy:

- Other Patient IDs Sequence gets an item with the original Patient ID and Issuer
  of Patient ID (Type of Patient ID ``TEXT``), so the receiving PACS, and
  studybridge itself if the copy ever comes back, can link it to the original;
- Original Attributes Sequence (PS3.3 C.12.1) records every value replaced, when,
  by which system and why (``COERCE``).

Only the in-memory copy being sent is changed; the archived instance never is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


@dataclass(frozen=True)
class Reconciliation:
    patient_id: str = ""
    issuer: str = ""
    accession_number: str = ""

    @property
    def active(self) -> bool:
        return bool(self.patient_id or self.issuer or self.accession_number)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def coerce(
    ds: Dataset,
    target: Reconciliation,
    *,
    stored_issuer: str,
    modifying_system: str,
    source: str = "",
) -> Dataset:
    """Apply ``target`` to ``ds`` in place and return it.

    ``stored_issuer`` is the issuer the archive filed the instance under (the data set
    may carry none: the archive then assigned one at ingest).
    """
    original_id = _text(ds, "PatientID")
    original_issuer = _text(ds, "IssuerOfPatientID") or stored_issuer
    replaced = Dataset()
    if target.patient_id and target.patient_id != original_id:
        replaced.PatientID = original_id
        ds.PatientID = target.patient_id
    if target.issuer and target.issuer != original_issuer:
        replaced.IssuerOfPatientID = _text(ds, "IssuerOfPatientID")
        ds.IssuerOfPatientID = target.issuer
    if target.accession_number and target.accession_number != _text(ds, "AccessionNumber"):
        replaced.AccessionNumber = _text(ds, "AccessionNumber")
        ds.AccessionNumber = target.accession_number
    if not len(replaced):
        return ds
    if "PatientID" in replaced or "IssuerOfPatientID" in replaced:
        others = list(ds.get("OtherPatientIDsSequence", []))
        known = {(_text(o, "PatientID"), _text(o, "IssuerOfPatientID")) for o in others}
        if (original_id, original_issuer) not in known:
            item = Dataset()
            item.PatientID = original_id
            item.IssuerOfPatientID = original_issuer
            item.TypeOfPatientID = "TEXT"
            others.append(item)
        ds.OtherPatientIDsSequence = Sequence(others)
    record = Dataset()
    record.ModifiedAttributesSequence = Sequence([replaced])
    record.AttributeModificationDateTime = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S+0000")
    record.ModifyingSystem = modifying_system[:64]
    record.SourceOfPreviousValues = source[:64]
    record.ReasonForTheAttributeModification = "COERCE"
    history = list(ds.get("OriginalAttributesSequence", []))
    history.append(record)
    ds.OriginalAttributesSequence = Sequence(history)
    return ds
