"""A synthetic study for the viewer tests: a CT phantom, a JPEG baseline image, a
text SR and an Encapsulated PDF, all in one study (never real patient data).

The CT phantom is a body ellipse (soft tissue, 40 HU) with lungs (-800 HU), a bone
ring (700 HU) and a bright dot that moves with the slice, so slices differ and each
CT window preset looks different. Two markers (2000 HU) sit in the air above the body
on one row, ``MARKER_COLUMNS`` apart, for the length measurement: the pixels are
not square (``PIXEL_SPACING``), so a swapped row/column spacing gives a wrong length.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from tests.factories import ct_slice, uid, write

CT_SLICES = 30
SIZE = 128
PIXEL_SPACING = (0.6, 0.4)  # mm between rows, between columns
MARKER_ROW = 8
MARKER_COLUMNS = (20, 100)  # 80 columns apart: 32.0 mm
MARKER_DISTANCE_MM = (MARKER_COLUMNS[1] - MARKER_COLUMNS[0]) * PIXEL_SPACING[1]
PATIENT_NAME = "HONG^GILDONG=홍^길동"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
FINDING = "No acute intracranial haemorrhage. Ventricles of normal size."
IMPRESSION = "Normal CT of the head."


@dataclass
class ViewerStudy:
    study_uid: str
    ct_series: str
    jpeg_series: str
    sr_series: str
    pdf_series: str


def _common(ds: Dataset, study_uid: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID = study_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "VIEW001"
    ds.PatientBirthDate = "19800214"
    ds.PatientSex = "M"
    ds.StudyDate = "20260301"
    ds.StudyTime = "093000"
    ds.AccessionNumber = "VACC1"
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD"
    ds.ReferringPhysicianName = "KIM^MINJI"
    ds.InstitutionName = "Seoul Test Hospital"


def phantom(index: int) -> np.ndarray:
    """Hounsfield units of slice ``index`` (0-based)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    hu = np.full((SIZE, SIZE), -1000.0)
    body = ((xx - 64) / 50) ** 2 + ((yy - 66) / 40) ** 2 <= 1
    hu[body] = 40
    ring = (((xx - 64) / 46) ** 2 + ((yy - 66) / 36) ** 2 > 1) & body
    hu[ring] = 700
    for cx in (44, 84):
        lung = ((xx - cx) / 14) ** 2 + ((yy - 62) / 22) ** 2 <= 1
        hu[lung] = -800
    dot = (xx - (34 + 2 * index)) ** 2 + (yy - 96) ** 2 <= 9
    hu[dot] = 300
    rng = np.random.default_rng(index)
    hu[body] += rng.normal(0, 8, size=int(body.sum()))
    for column in MARKER_COLUMNS:
        hu[MARKER_ROW, column] = 2000
    return hu


def _ct(folder: Path, study_uid: str) -> str:
    series_uid = uid()
    for i in range(1, CT_SLICES + 1):
        ds = ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i,
            rows=SIZE,
            columns=SIZE,
            series_number=1,
        )
        _common(ds, study_uid)
        ds.SeriesDescription = "AXIAL 1mm"
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceLocation = float(i)
        stored = np.clip(phantom(i - 1) + 1024, 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        write(ds, folder / "ct" / f"{i:03d}.dcm")
    return series_uid


def _jpeg(folder: Path, study_uid: str) -> str:
    """One JPEG baseline (lossy) secondary capture. Lossy Image Compression is not
    set: the viewer must see the lossiness in the transfer syntax alone."""
    from PIL import Image

    series_uid = uid()
    gray = np.clip((phantom(5) + 160) / 400 * 255, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(gray, "L").save(out, format="JPEG", quality=75)
    ds = Dataset()
    _common(ds, study_uid)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid()
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "OT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "KEY IMAGE (JPEG)"
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = SIZE
    ds.Columns = SIZE
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([out.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    write(ds, folder / "jpeg" / "1.dcm")
    return series_uid


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _text_item(concept: Dataset, value: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = value
    return item


def _document_base(ds: Dataset, study_uid: str, sop_class: str, modality: str, number: int) -> None:
    _common(ds, study_uid)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid()
    ds.Modality = modality
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.ContentDate = "20260301"
    ds.ContentTime = "110000"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _sr(folder: Path, study_uid: str) -> str:
    series_uid = uid()
    ds = Dataset()
    _document_base(ds, study_uid, BASIC_TEXT_SR, "SR", 90)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = "Radiology report"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "Diagnostic Imaging Report", "LN")])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    findings = Dataset()
    findings.RelationshipType = "CONTAINS"
    findings.ValueType = "CONTAINER"
    findings.ContinuityOfContent = "SEPARATE"
    findings.ConceptNameCodeSequence = Sequence([_code("121070", "Findings")])
    findings.ContentSequence = Sequence([_text_item(_code("121071", "Finding"), FINDING)])
    impression = Dataset()
    impression.RelationshipType = "CONTAINS"
    impression.ValueType = "CONTAINER"
    impression.ContinuityOfContent = "SEPARATE"
    impression.ConceptNameCodeSequence = Sequence([_code("121072", "Impressions")])
    impression.ContentSequence = Sequence([_text_item(_code("121073", "Impression"), IMPRESSION)])
    ds.ContentSequence = Sequence([findings, impression])
    write(ds, folder / "sr" / "1.dcm")
    return series_uid


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` (ASCII), with a correct cross-reference table."""
    stream = f"BT /F1 18 Tf 40 760 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    # A comment line makes the file larger than the metadata's bulk data threshold,
    # so the viewer fetches it through its BulkDataURI.
    out = bytearray(b"%PDF-1.4\n%" + b"studybridge" * 120 + b"\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return bytes(out)


def _pdf(folder: Path, study_uid: str) -> str:
    series_uid = uid()
    ds = Dataset()
    _document_base(ds, study_uid, EncapsulatedPDFStorage, "DOC", 91)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = "Referral letter"
    ds.DocumentTitle = "Referral letter"
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "Diagnostic Imaging Report", "LN")])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = minimal_pdf("studybridge test referral letter " + "." * 40)
    ds.EncapsulatedDocument = data + (b"\x00" if len(data) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(data)
    write(ds, folder / "pdf" / "1.dcm")
    return series_uid


def make_study(folder: Path) -> ViewerStudy:
    study_uid = uid()
    return ViewerStudy(
        study_uid=study_uid,
        ct_series=_ct(folder, study_uid),
        jpeg_series=_jpeg(folder, study_uid),
        sr_series=_sr(folder, study_uid),
        pdf_series=_pdf(folder, study_uid),
    )
