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
