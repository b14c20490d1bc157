"""DIMSE status codes we answer with, and the one table mapping archive errors to them.

Codes follow PS3.4 Annex B (storage) and C (query/retrieve) and PS3.7 Annex C.
Failures a sender can retry (a backend was down) are "Out of Resources" (A7xx);
failures that will recur with the same data are "Cannot Understand" (Cxxx) or
"Data Set does not match SOP Class" (A9xx). Each failure carries an Error Comment.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from gateway.archive import errors

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00

# Storage (PS3.4 B.2.3)
STORE_OUT_OF_RESOURCES = 0xA700
STORE_INDEX_UNAVAILABLE = 0xA701
STORE_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STORE_CANNOT_UNDERSTAND = 0xC000
STORE_MISSING_ATTRIBUTE = 0xC001
STORE_INVALID_UID = 0xC002
STORE_INSTANCE_CONFLICT = 0xC010
STORE_PATIENT_MISMATCH = 0xC011
STORE_PROCESSING_FAILURE = 0xC0FF
# PS3.7 C.4.2.1.3 "Refused: Not Authorized": the study is another sender's.
STORE_NOT_AUTHORIZED = 0x0124

# Query/Retrieve (PS3.4 C.4)
FIND_OUT_OF_RESOURCES = 0xA700
FIND_IDENTIFIER_DOES_NOT_MATCH = 0xA900
FIND_UNABLE_TO_PROCESS = 0xC000
MOVE_OUT_OF_RESOURCES_MATCHES = 0xA701
MOVE_IDENTIFIER_DOES_NOT_MATCH = 0xA900
MOVE_UNABLE_TO_PROCESS = 0xC000
# PS3.7 C.4.2.1.3 again: the Move Destination's institution may not receive a study;
# its instances are the failed sub-operations of the final response.
MOVE_NOT_AUTHORIZED = 0x0124

_STORE_TABLE: list[tuple[type[errors.ArchiveError], int]] = [
    (errors.StorageUnavailable, STORE_OUT_OF_RESOURCES),
    (errors.IndexUnavailable, STORE_INDEX_UNAVAILABLE),
    (errors.NotStorageSOPClass, STORE_DOES_NOT_MATCH_SOP_CLASS),
    (errors.MissingAttribute, STORE_MISSING_ATTRIBUTE),
    (errors.InvalidUID, STORE_INVALID_UID),
    (errors.InvalidDataset, STORE_CANNOT_UNDERSTAND),
    (errors.InstanceConflict, STORE_INSTANCE_CONFLICT),
    (errors.PatientMismatch, STORE_PATIENT_MISMATCH),
    (errors.NotAuthorized, STORE_NOT_AUTHORIZED),
]

_QUERY_TABLE: list[tuple[type[errors.ArchiveError], int]] = [
    (errors.IndexUnavailable, FIND_OUT_OF_RESOURCES),
    (errors.InvalidQuery, FIND_IDENTIFIER_DOES_NOT_MATCH),
]


def _lookup(
    table: list[tuple[type[errors.ArchiveError], int]], exc: Exception, default: int
) -> int:
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return default


def store_failure_status(exc: Exception) -> tuple[int, str]:
    """The C-STORE failure status for ``exc`` and its Error Comment."""
    return _lookup(_STORE_TABLE, exc, STORE_PROCESSING_FAILURE), _comment(exc)


def query_failure(exc: Exception) -> Dataset:
    return status_dataset(_lookup(_QUERY_TABLE, exc, FIND_UNABLE_TO_PROCESS), _comment(exc))


def status_dataset(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def _comment(exc: Exception) -> str:
    if isinstance(exc, errors.ArchiveError):
        text = str(exc)
    else:
        text = "internal error while processing the request"
    # Error Comment is LO: 64 characters of the default repertoire, no backslash.
    ascii_text = text.encode("ascii", "replace").decode().replace("\\", "/")
    return ascii_text[:64]
