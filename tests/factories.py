"""Synthetic DICOM test data made with pydicom (never real patient data)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ORG_ROOT = "1.2.826.0.1.3680043.10.1234."


def uid() -> str:
    return generate_uid(prefix=ORG_ROOT)


def ct_slice(
    *,
    patient_id: str = "PAT001",
    patient_name: str = "DOE^JANE",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    rows: int = 64,
    columns: int = 64,
    study_date: str = "20240115",
    study_time: str = "101500",
    modality: str = "CT",
    accession: str = "ACC001",
    series_number: int = 1,
    issuer: str | None = None,
    charset: str | None = None,
    seed: int = 0,
) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or uid()
    ds.StudyInstanceUID = study_uid or uid()
    ds.SeriesInstanceUID = series_uid or uid()
    ds.PatientID = patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD"
    ds.ReferringPhysicianName = "REF^DOC"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "AXIAL"
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0, 0, float(instance_number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    rng = np.random.default_rng(seed + instance_number)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(
    folder: Path, count: int, *, study_uid: str | None = None, series_uid: str | None = None, **kw
) -> list[Path]:
    study_uid = study_uid or uid()
    series_uid = series_uid or uid()
    paths = []
    for i in range(1, count + 1):
        ds = ct_slice(study_uid=study_uid, series_uid=series_uid, instance_number=i, **kw)
        paths.append(write(ds, folder / f"{i:04d}.dcm"))
    return paths


def today() -> str:
    return dt.date.today().strftime("%Y%m%d")


# -- raw encodings, for data that pydicom will not write for us -------------------------
def element_header(tag: int, vr: str | None, length: int, *, little: bool = True) -> bytes:
    """The header of one element: implicit VR when ``vr`` is None, else explicit VR."""
    import struct

    e = "<" if little else ">"
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if vr is None:
        return head + struct.pack(e + "L", length)
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
        return head + vr.encode() + b"\x00\x00" + struct.pack(e + "L", length)
    return head + vr.encode() + struct.pack(e + "H", length)


UNDEFINED = 0xFFFFFFFF
CONTENT_SEQUENCE = 0x0040A730
TEXT_VALUE = 0x0040A160


def nested_sequence(depth: int, *, explicit: bool = True, undefined: bool = True) -> bytes:
    """A Content Sequence nested ``depth`` levels deep (each item holds the next level).

    Built byte by byte: pydicom would recurse once per level when writing it.
    """
    import struct

    vr_sq = "SQ" if explicit else None
    vr_ut = "UT" if explicit else None
    inner = element_header(TEXT_VALUE, vr_ut, 4) + b"leaf"
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + inner
            item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            seq = element_header(CONTENT_SEQUENCE, vr_sq, UNDEFINED) + item
            seq += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        else:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            seq = element_header(CONTENT_SEQUENCE, vr_sq, len(item)) + item
        inner = seq
    return inner


def with_inserted_before_pixels(path: Path, extra: bytes, out: Path) -> Path:
    """Copy the Part 10 file at ``path`` to ``out`` with ``extra`` element bytes inserted
    just before Pixel Data (elements stay in ascending tag order for tags < 7FE0)."""
    from gateway.archive.part10 import read_layout

    raw = path.read_bytes()
    with open(path, "rb") as fh:
        layout = read_layout(fh, len(raw))
    from pydicom.uid import UID

    implicit = UID(layout.transfer_syntax).is_implicit_VR
    assert layout.pixel_offset is not None
    header_start = layout.pixel_offset - (8 if implicit else 12)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(raw[:header_start] + extra + raw[header_start:])
    return out


def dataset_bytes(path: Path) -> bytes:
    """The data set bytes of a file (after preamble and file meta), found independently
    of the archive code: pydicom reports where it stopped reading the file meta."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        if read_preamble(fh, force=True) is None:
            fh.seek(0)
            return fh.read()
        _read_file_meta_info(fh)
        return fh.read()


def bare(ds: Dataset, path: Path, *, implicit_vr: bool, little_endian: bool = True) -> Path:
    """Write ``ds`` without preamble or file meta, as on old discs."""
    from pydicom.filewriter import dcmwrite

    path.parent.mkdir(parents=True, exist_ok=True)
    plain = Dataset()
    plain.update(ds)
    dcmwrite(path, plain, implicit_vr=implicit_vr, little_endian=little_endian)
    return path


def strip_meta(src: Path, out: Path) -> Path:
    """Copy a Part 10 file without its preamble and file meta."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(dataset_bytes(src))
    return out
