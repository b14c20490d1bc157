"""Archive errors: what went wrong, in terms every door maps to its own codes.

Each door (DIMSE, DICOMweb, import) translates these in one table. ``retryable``
tells a sender whether the same request may succeed later (a backend was down)
or will fail again (the data itself is wrong).
"""

from __future__ import annotations


class ArchiveError(Exception):
    """Base class of every error the archive reports to a door."""

    retryable = False
    reason = "archive-error"


class InvalidDataset(ArchiveError):
    """The bytes are not a DICOM dataset we can parse."""

    reason = "invalid-dataset"


class InvalidUID(InvalidDataset):
    """A UID is malformed (length, characters, empty components)."""

    reason = "invalid-uid"


class MissingAttribute(InvalidDataset):
    """A required attribute is absent or empty."""

    reason = "missing-attribute"


class NotStorageSOPClass(InvalidDataset):
    """The SOP Class is not a storage SOP class (e.g. a DICOMDIR)."""

    reason = "sop-class-not-supported"


class InstanceConflict(ArchiveError):
    """The SOP Instance UID is already stored with different content."""

    reason = "instance-conflict"


class PatientMismatch(ArchiveError):
    """The study is already filed under another patient."""

    reason = "patient-mismatch"


class NotAuthorized(ArchiveError):
    """The sender may not add this instance (its study is another sender's and not
    visible to it): the door's admission check said no."""

    reason = "not-authorized"


class StorageUnavailable(ArchiveError):
    """The blob store could not write or read: the sender may retry later."""

    retryable = True
    reason = "storage-unavailable"


class IndexUnavailable(ArchiveError):
    """The index database could not commit: the sender may retry later."""

    retryable = True
    reason = "index-unavailable"


class NotFound(ArchiveError):
    """No such patient, study, series or instance."""

    reason = "not-found"


class InvalidQuery(ArchiveError):
    """A query key or value is not acceptable (unknown attribute, bad range)."""

    reason = "invalid-query"
