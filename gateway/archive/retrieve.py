"""The one retrieve path: which stored instances a request names, and their bytes.

C-MOVE, C-GET, WADO-RS, WADO-URI, downloads and the viewer all resolve their
request to ``StoredInstance`` records here and read the bytes through the blob
store: the data set exactly as received starts at ``dataset_offset`` of the blob.

``iter_part10`` yields an instance as a Part 10 file in a requested transfer syntax:
the blob as stored when that syntax is acceptable, otherwise converted to Explicit VR
Little Endian frame by frame (``frames.FrameReader``), so even a large multi-frame
instance is never decoded in one piece.
"""

from __future__ import annotations

import contextlib
import copy
import io
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from sqlalchemy import select

from gateway.archive import frames
from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database
from gateway.archive.errors import InvalidDataset, InvalidQuery, NotFound
from gateway.archive.models import Instance, Patient, Series, Study
from gateway.archive.part10 import read_layout
from gateway.archive.query import Level
from gateway.archive.uids import is_valid_uid


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    blob_key: str
    dataset_offset: int
    size: int
    sha256: str
    number_of_frames: int | None = None
    instance_id: int = 0
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    # JSON [[offset, length], ...] per frame (see frames.py), when known.
    frame_offsets: str | None = None


@dataclass(frozen=True)
class RetrieveRequest:
    """What to retrieve: the UIDs (lists allowed) down to the requested level."""

    level: Level
    patient_ids: Sequence[str] = ()
    issuer: str | None = None
    study_uids: Sequence[str] = ()
    series_uids: Sequence[str] = ()
    sop_uids: Sequence[str] = ()


def _check(uids: Sequence[str], what: str) -> list[str]:
    cleaned = [u.strip() for u in uids if u and u.strip()]
    for uid in cleaned:
        if not is_valid_uid(uid):
            raise InvalidQuery(f"{what} is not a valid UID: {uid[:70]!r}")
    return cleaned


def find_instances(
    db: Database, request: RetrieveRequest, *, require: bool = False
) -> list[StoredInstance]:
    """Instances a retrieve request names, in series then instance order.

    With ``require`` an empty answer raises NotFound (WADO: an unknown study, series
    or instance is a 404); C-MOVE and C-GET take an empty answer as zero sub-operations.
    """
    studies = _check(request.study_uids, "Study Instance UID")
    series = _check(request.series_uids, "Series Instance UID")
    sops = _check(request.sop_uids, "SOP Instance UID")
    level = request.level
    stmt = (
        select(Instance, Series.series_uid, Study.study_uid)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
    )
    if level is Level.PATIENT:
        pids = [p for p in request.patient_ids if p]
        if not pids:
            raise InvalidQuery("a PATIENT level retrieve needs a Patient ID")
        stmt = stmt.join(Patient, Study.patient_fk == Patient.id).where(
            Patient.patient_id.in_(pids)
        )
        if request.issuer:
            stmt = stmt.where(Patient.issuer == request.issuer)
    elif level is Level.STUDY:
        if not studies:
            raise InvalidQuery("a STUDY level retrieve needs a Study Instance UID")
        stmt = stmt.where(Study.study_uid.in_(studies))
    elif level is Level.SERIES:
        if not series:
            raise InvalidQuery("a SERIES level retrieve needs a Series Instance UID")
        stmt = stmt.where(Series.series_uid.in_(series))
        if studies:
            stmt = stmt.where(Study.study_uid.in_(studies))
    else:
        if not sops:
            raise InvalidQuery("an IMAGE level retrieve needs a SOP Instance UID")
        stmt = stmt.where(Instance.sop_uid.in_(sops))
        if series:
            stmt = stmt.where(Series.series_uid.in_(series))
        if studies:
            stmt = stmt.where(Study.study_uid.in_(studies))
    stmt = stmt.order_by(
        Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id
    )
    with db.reading() as session:
        found = [stored(*row) for row in session.execute(stmt).all()]
    if require and not found:
        raise NotFound(_not_found_message(level, studies, series, sops))
    return found


def stored(inst: Instance, series_uid: str, study_uid: str) -> StoredInstance:
    """What a door needs of an instance row to read it."""
    return StoredInstance(
        sop_class_uid=inst.sop_class_uid,
        sop_uid=inst.sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax_uid=inst.transfer_syntax_uid,
        blob_key=inst.blob_key,
        dataset_offset=inst.dataset_offset,
        size=inst.size,
        sha256=inst.sha256,
        number_of_frames=inst.number_of_frames,
        instance_id=inst.id,
        instance_number=inst.instance_number,
        rows=inst.rows,
        columns=inst.columns,
        frame_offsets=inst.frame_offsets,
    )


def _not_found_message(
    level: Level, studies: Sequence[str], series: Sequence[str], sops: Sequence[str]
) -> str:
    if level is Level.IMAGE:
        return f"no such instance: {', '.join(sops)[:200]}"
    if level is Level.SERIES:
        return f"no such series: {', '.join(series)[:200]}"
    if level is Level.STUDY:
        return f"no such study: {', '.join(studies)[:200]}"
    return "nothing stored for this patient"


def get_instance(db: Database, study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
    """The one stored instance these UIDs name (NotFound unless all three agree)."""
    [inst] = find_instances(
        db,
        RetrieveRequest(
            Level.IMAGE, study_uids=[study_uid], series_uids=[series_uid], sop_uids=[sop_uid]
        ),
        require=True,
    )
    return inst


def open_dataset(store: BlobStore, inst: StoredInstance) -> BinaryIO:
    """A stream positioned at the first byte of the data set as received."""
    fh = store.open(inst.blob_key)
    fh.seek(inst.dataset_offset)
    return fh


def iter_dataset_bytes(
    store: BlobStore, inst: StoredInstance, chunk_size: int = 1024 * 1024
) -> Iterator[bytes]:
    with open_dataset(store, inst) as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


@contextlib.contextmanager
def local_part10(store: BlobStore, inst: StoredInstance) -> Iterator[Path]:
    """A local Part 10 file of the instance (the blob itself for the file store)."""
    with store.local_path(inst.blob_key) as path:
        yield path


# -- Part 10 in a requested transfer syntax --------------------------------------------
EXPLICIT_LE = str(ExplicitVRLittleEndian)
ANY_SYNTAX = "*"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# Elements that describe encapsulated pixel data only: dropped when converting to native.
_ENCAPSULATION_ONLY = (0x7FE00001, 0x7FE00002)


def deliverable_syntax(inst: StoredInstance, acceptable: Sequence[str]) -> str | None:
    """The first of ``acceptable`` (preference order) this instance can be sent in.

    ``*`` and the stored syntax mean the blob as stored; Explicit VR Little Endian is
    also reachable from any other syntax whose pixel data can be decoded here.
    """
    stored = inst.transfer_syntax_uid
    for syntax in acceptable:
        if syntax in (ANY_SYNTAX, stored):
            return stored
        if syntax == EXPLICIT_LE and frames.can_decode(stored):
            return EXPLICIT_LE
    return None


def iter_blob(
    store: BlobStore, inst: StoredInstance, chunk_size: int = 1024 * 1024
) -> Iterator[bytes]:
    """The stored Part 10 file: our file meta and the data set exactly as received."""
    with store.open(inst.blob_key) as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def part10_size(store: BlobStore, inst: StoredInstance) -> int:
    return store.size(inst.blob_key)


def recorded_part10_size(inst: StoredInstance) -> int:
    """The stored Part 10 file's size from the index alone (no blob store trip).

    The blob is the file meta followed by the data set as received, and the index
    records where the data set starts and how long it is.
    """
    return inst.dataset_offset + inst.size


def iter_part10(
    store: BlobStore, inst: StoredInstance, syntax: str, chunk_size: int = 1024 * 1024
) -> Iterator[bytes]:
    """The instance as a Part 10 file in ``syntax`` (stored, or Explicit VR Little Endian)."""
    if syntax in (ANY_SYNTAX, inst.transfer_syntax_uid):
        yield from iter_blob(store, inst, chunk_size)
    elif syntax == EXPLICIT_LE:
        yield from _iter_explicit_le(store, inst, chunk_size)
    else:
        raise InvalidQuery(f"cannot convert to transfer syntax {syntax}")


def _file_meta(header: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    stored = getattr(header, "file_meta", None)
    if stored is not None:
        for elem in stored:
            if elem.tag.element != 0x0000:
                meta.add(elem)
    meta.TransferSyntaxUID = syntax
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in header:
        meta.MediaStorageSOPClassUID = header.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in header:
        meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _encode(ds: Dataset, syntax: str) -> bytes:
    """Preamble, file meta and ``ds`` encoded in ``syntax``."""
    out = io.BytesIO()
    body = Dataset()
    for elem in ds:  # converts raw elements: their VR is resolved for explicit VR
        body.add(elem)
    body.file_meta = _file_meta(ds, syntax)
    body.preamble = b"\x00" * 128
    try:
        pydicom.dcmwrite(out, body, enforce_file_format=True)
    except Exception as exc:
        raise InvalidDataset(f"cannot re-encode the stored instance: {exc}") from exc
    return out.getvalue()


def _element_header(tag: int, vr: str, length: int) -> bytes:
    return (
        struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        + vr.encode()
        + b"\x00\x00"
        + (struct.pack("<L", length))
    )


def _iter_explicit_le(store: BlobStore, inst: StoredInstance, chunk_size: int) -> Iterator[bytes]:
    uid = UID(inst.transfer_syntax_uid)
    if uid.is_transfer_syntax and (uid.is_deflated or not uid.is_little_endian):
        yield _whole_to_explicit_le(store, inst)
        return
    reader = frames.FrameReader(store, inst)
    header = copy.deepcopy(reader.header)
    if reader.pixel_tag is None:
        # No pixel data: the header read is the whole data set.
        yield _encode(header, EXPLICIT_LE)
        return
    if not reader.encapsulated:
        with store.open(inst.blob_key) as fh:
            layout = read_layout(fh, store.size(inst.blob_key))
        if layout.pixel_offset is None or layout.pixel_length is None:
            raise InvalidDataset("stored pixel data could not be located")
        yield _encode(header, EXPLICIT_LE)
        yield _element_header(reader.pixel_tag, reader.pixel_vr, layout.pixel_length)
        with store.open(inst.blob_key) as fh:
            fh.seek(layout.pixel_offset)
            left = layout.pixel_length
            while left > 0:
                chunk = fh.read(min(chunk_size, left))
                if not chunk:
                    raise InvalidDataset("stored pixel data is truncated")
                left -= len(chunk)
                yield chunk
        return
    count = reader.number_of_frames
    if count == 0:
        raise InvalidDataset("encapsulated pixel data has no frames")
    first, meta = reader.uncompressed(1)
    for tag in _ENCAPSULATION_ONLY:
        if tag in header:
            del header[tag]
    if meta.get("photometric_interpretation"):
        header.PhotometricInterpretation = str(meta["photometric_interpretation"])
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        header.PlanarConfiguration = int(meta.get("planar_configuration", 0) or 0)
    if "NumberOfFrames" in header or count > 1:
        header.NumberOfFrames = count
    bits = int(header.get("BitsAllocated", 8) or 8)
    total = len(first) * count
    yield _encode(header, EXPLICIT_LE)
    yield _element_header(0x7FE00010, "OB" if bits <= 8 else "OW", total + total % 2)
    yield first
    for number in range(2, count + 1):
        data, _meta = reader.uncompressed(number)
        if len(data) != len(first):
            raise InvalidDataset(f"frame {number} decodes to another size than frame 1")
        yield data
    if total % 2:
        yield b"\x00"


def _whole_to_explicit_le(store: BlobStore, inst: StoredInstance) -> bytes:
    """Deflated or big endian data sets (rare): converted in memory, one instance."""
    with store.open(inst.blob_key) as fh:
        try:
            ds = pydicom.dcmread(fh, force=True)
            if not ds.original_encoding[1] and "PixelData" in ds:
                arr = ds.pixel_array
                ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
                ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
                if int(ds.get("SamplesPerPixel", 1)) > 1:
                    ds.PlanarConfiguration = 0
        except InvalidDataset:
            raise
        except Exception as exc:
            raise InvalidDataset(f"stored instance cannot be converted: {exc}") from exc
    return _encode(ds, EXPLICIT_LE)
