"""A study as a zip in the layout of a patient CD (IHE PDI, DICOM PS3.10/PS3.11):
``DICOMDIR`` and ``README.TXT`` at the root, every instance as a Part 10 file in the
``DICOM`` folder under a File ID of uppercase 8-character components
(``DICOM/PT000000/ST000000/SE000000/IM000000``), as IHE PDI (RAD TF-3 4.47) lays out
a CD: only DICOM files in ``DICOM``, nothing else there.

A legacy PACS or CD importer reads such a zip once unpacked. The zip is streamed:
``iter_pdi_zip`` yields bytes as it goes and holds one chunk of an instance at a
time, so a large study never sits in memory or in a temporary file.

How: the DICOMDIR needs each instance's identifying attributes, so a first pass
reads the headers (stopping before pixel data) and lets pydicom's ``FileSet`` build
the directory records from header-only copies in a scratch folder (cheap: no pixel
data); the File IDs pydicom assigns there (``PT000000/ST000000/SE000000/IM000000``),
moved under ``DICOM/``, are the names the real instances get in the zip. The second
pass streams each stored blob (our file meta plus the data set exactly as received)
into the zip.

Where a header lacks a Type 1 key that a directory record requires (Patient ID,
Study Date/Time, Study ID, Series Number, Instance Number), the record gets a
neutral value (``UNKNOWN``, ``19000101``, ``000000``, ``1``): the DICOMDIR is an
index; the instance files themselves are never changed.

Members are stored, not deflated: image data is mostly compressed already, and
storing keeps the stream cheap to produce. Sizes over 4 GiB use ZIP64.
"""

from __future__ import annotations

import datetime as dt
import io
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from gateway.archive.blobstore import BlobStore
from gateway.archive.errors import ArchiveError, InvalidDataset, NotFound
from gateway.archive.retrieve import StoredInstance, iter_blob

DICOMDIR = "DICOMDIR"
PDI_FOLDER = "DICOM"  # IHE PDI: DICOM files in this folder, the DICOMDIR at the root
README = "README.TXT"
FILE_SET_ID = "STUDYBRIDGE"
# Type 1 keys of PATIENT, STUDY, SERIES and IMAGE-like directory records (PS3.3 F.5).
_RECORD_DEFAULTS = {
    "PatientID": "UNKNOWN",
    "StudyDate": "19000101",
    "StudyTime": "000000",
    "StudyID": "1",
    "SeriesNumber": "1",
    "InstanceNumber": "1",
}


@dataclass(frozen=True)
class MediaFile:
    """One instance in the zip: its path there (the File ID joined with '/')."""

    instance: StoredInstance
    path: str


@dataclass(frozen=True)
class MediaPlan:
    dicomdir: bytes
    files: list[MediaFile]


def _header(store: BlobStore, inst: StoredInstance) -> Dataset:
    try:
        with store.open(inst.blob_key) as fh:
            return pydicom.dcmread(fh, stop_before_pixels=True, force=True)
    except ArchiveError:  # missing blob, store unavailable: as the store said
        raise
    except FileNotFoundError as exc:
        raise NotFound(f"the stored file of {inst.sop_uid} is missing") from exc
    except Exception as exc:
        raise InvalidDataset(f"cannot read the stored header of {inst.sop_uid}: {exc}") from exc


def _record_ready(ds: Dataset) -> Dataset:
    for keyword, value in _RECORD_DEFAULTS.items():
        if not str(ds.get(keyword, "") or "").strip():
            setattr(ds, keyword, value)
    return ds


def plan(
    store: BlobStore,
    instances: Sequence[StoredInstance],
    scratch_dir: Path,
    *,
    file_set_id: str = FILE_SET_ID,
) -> MediaPlan:
    """The DICOMDIR bytes and the zip path of every instance (first pass)."""
    if not instances:
        raise NotFound("nothing to put on the media")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fs = FileSet()
    fs.ID = file_set_id[:16]
    by_sop: dict[str, StoredInstance] = {}
    for inst in instances:
        if inst.sop_uid in by_sop:
            continue
        ds = _record_ready(_header(store, inst))
        ds.file_meta.TransferSyntaxUID = inst.transfer_syntax_uid
        try:
            fs.add(ds)
        except ValueError as exc:  # no directory record for this SOP class
            raise InvalidDataset(f"{inst.sop_uid} cannot be listed in a DICOMDIR: {exc}") from exc
        by_sop[inst.sop_uid] = inst
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="dicomdir-") as tmp:
        fs.write(tmp)
        placed = _under_dicom_folder(Path(tmp), fs.ID)
        dicomdir = (Path(tmp) / DICOMDIR).read_bytes()
        files = [
            MediaFile(by_sop[item.SOPInstanceUID], "/".join(_file_id(item.ReferencedFileID)))
            for item in placed
        ]
    files.sort(key=lambda f: f.path)
    return MediaPlan(dicomdir=dicomdir, files=files)


def _file_id(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _under_dicom_folder(root: Path, file_set_id: str) -> FileSet:
    """Move the instances pydicom laid out at the root (``PT000000/...``) into the
    ``DICOM`` folder that IHE PDI asks for, and rewrite the DICOMDIR's File IDs
    (``DICOM\\PT000000\\...``) to match; the DICOMDIR itself stays at the root.

    pydicom chooses its own File IDs when it writes a new file set; an existing one it
    can rewrite in place (``use_existing``), recomputing the records' offsets, after
    the records were edited in the loaded data set."""
    folder = root / PDI_FOLDER
    folder.mkdir()
    for entry in list(root.iterdir()):
        if entry.name not in (DICOMDIR, PDI_FOLDER):
            entry.rename(folder / entry.name)
    ds = pydicom.dcmread(root / DICOMDIR)
    for record in ds.DirectoryRecordSequence:
        if "ReferencedFileID" in record:
            record.ReferencedFileID = [PDI_FOLDER, *_file_id(record.ReferencedFileID)]
    placed = FileSet(ds)
    placed.ID = file_set_id  # (also marks the file set as changed)
    placed.write(use_existing=True)
    return placed


def readme(files: Sequence[MediaFile], now: dt.datetime) -> bytes:
    studies = sorted({f.instance.study_uid for f in files})
    lines = [
        "DICOM images exported by studybridge",
        f"Created: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"Studies: {len(studies)}; instances: {len(files)}",
        "",
        "DICOMDIR lists every image and report (DICOM PS3.10 media file set, IHE PDI",
        "layout). Import the whole folder into a PACS or open it with a DICOM viewer.",
        "",
        *[f"Study Instance UID {uid}" for uid in studies],
        "",
    ]
    return "\r\n".join(lines).encode("ascii", "replace")


class _Sink(io.RawIOBase):
    """An unseekable output that hands out what was written since the last take()."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def,override]
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


def _info(path: str, when: dt.datetime, size: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(path, date_time=when.timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    if size is not None:
        info.file_size = size
    return info


def iter_pdi_zip(
    store: BlobStore,
    instances: Sequence[StoredInstance],
    scratch_dir: Path,
    *,
    now: dt.datetime | None = None,
    chunk_size: int = 1024 * 1024,
) -> Iterator[bytes]:
    """The zip, streamed: DICOMDIR, README.TXT, then every instance as stored.

    The DICOMDIR is built before the first byte is yielded, so a missing or unreadable
    instance fails the download before it starts (NotFound, InvalidDataset).
    """
    now = now or dt.datetime.now(dt.UTC)
    media = plan(store, instances, scratch_dir)
    return _stream(store, media, now, chunk_size)


def _stream(
    store: BlobStore, media: MediaPlan, now: dt.datetime, chunk_size: int
) -> Iterator[bytes]:
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(_info(DICOMDIR, now), media.dicomdir)
        zf.writestr(_info(README, now), readme(media.files, now))
        yield sink.take()
        for item in media.files:
            size = store.size(item.instance.blob_key)
            with zf.open(_info(item.path, now, size), "w", force_zip64=size >= 2**31) as out:
                for chunk in iter_blob(store, item.instance, chunk_size):
                    out.write(chunk)
                    if data := sink.take():
                        yield data
            if data := sink.take():
                yield data
    yield sink.take()
