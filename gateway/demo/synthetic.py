"""Synthetic DICOM studies for the demo (made up here, never real patient data).

Each generator returns the data sets of one series. The images are phantoms drawn
with numpy: a chest CT (body, lungs, heart, spine, ribs, a nodule that comes and
goes), a brain MR (head, ventricles, a lesion), a chest radiograph; the reports are
a Basic Text SR and an Encapsulated PDF. Every data set says in Patient Comments
that it is synthetic demo data.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
DEMO_COMMENT = "studybridge demo data: synthetic, not a real patient"
# UIDs under the prefix pydicom offers for generated UIDs, derived from names so a
# second run of the demo produces the same study, series and instance UIDs.
_PREFIX = "1.2.826.0.1.3680043.8.498."


def demo_uid(*parts: object) -> str:
    return generate_uid(_PREFIX, entropy_srcs=["studybridge-demo", *map(str, parts)])


@dataclass(frozen=True)
class Person:
    patient_id: str
    issuer: str
    name: str  # DICOM PN, with an ideographic group for Korean names
    birth_date: str
    sex: str


@dataclass(frozen=True)
class StudyInfo:
    key: str  # names the study for its UIDs ("kim-ct")
    person: Person
    institution: str
    date: str
    time: str
    accession: str
    description: str

    @property
    def study_uid(self) -> str:
        return demo_uid(self.key, "study")


def _base(info: StudyInfo, sop_class: str, modality: str, series: int, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = demo_uid(info.key, series, number)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = demo_uid(info.key, series, "series")
    p = info.person
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = p.issuer
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientComments = DEMO_COMMENT
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = info.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = info.time
    ds.AccessionNumber = info.accession
    ds.StudyID = info.accession[-6:]
    ds.StudyDescription = info.description
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.InstitutionName = info.institution
    ds.Manufacturer = "studybridge demo"
    ds.Modality = modality
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    return ds


def _image(ds: Dataset, pixels: np.ndarray, *, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:size, :size]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def chest_ct(info: StudyInfo, *, slices: int = 120, size: int = 512) -> list[Dataset]:
    """An axial chest CT in Hounsfield units (stored value = HU + 1024)."""
    out = []
    thickness = 2.5
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 12, (size, size)).astype(np.float32)
    c = size / 2
    for i in range(slices):
        z = i / max(slices - 1, 1)  # 0 at the top (apex), 1 at the bottom (base)
        hu = np.full((size, size), -1000.0, np.float32)
        hu[_ellipse(size, c + 10, c, size * 0.34, size * 0.45)] = 40  # body
        lung = 0.6 + 0.4 * np.sin(np.pi * min(1.0, 0.2 + z))
        for side in (-1, 1):
            hu[_ellipse(size, c, c + side * size * 0.2, size * 0.24 * lung, size * 0.15)] = -850
        heart = max(0.0, np.sin(np.pi * (z - 0.35) / 0.65)) if z > 0.35 else 0.0
        if heart > 0:
            hu[_ellipse(size, c + 30, c - 20, size * 0.13 * heart, size * 0.15 * heart)] = 45
        hu[_ellipse(size, c + size * 0.25, c, size * 0.045, size * 0.05)] = 700  # vertebra
        hu[_ellipse(size, c + size * 0.25, c, size * 0.025, size * 0.03)] = 250  # canal
        if 0.4 < z < 0.6:  # a small nodule in the right lung, a few slices long
            hu[_ellipse(size, c - 30, c - size * 0.2, 9, 9)] = 30
        for angle in np.linspace(0.3, np.pi - 0.3, 7):  # ribs on the body's edge
            for side in (-1, 1):
                y = c + 10 - np.sin(angle) * size * 0.31
                x = c + side * np.cos(angle) * size * 0.42
                hu[_ellipse(size, y, x, 7, 7)] = 900
        pixels = np.clip(hu + noise * (hu > -900) + 1024, 0, 4095)
        ds = _base(info, CTImageStorage, "CT", 2, i + 1)
        ds.SeriesDescription = "CHEST AXIAL 2.5mm"
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-size * 0.35, -size * 0.35, -i * thickness]
        ds.SliceLocation = -i * thickness
        ds.FrameOfReferenceUID = demo_uid(info.key, "frame")
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.KVP = 120
        _image(ds, pixels.astype(np.int16), signed=True)
        out.append(ds)
    return out


def brain_mr(info: StudyInfo, *, slices: int = 24, size: int = 256) -> list[Dataset]:
    """An axial T2-weighted brain MR."""
    out = []
    c = size / 2
    for i in range(slices):
        z = i / max(slices - 1, 1)
        scale = np.sqrt(max(0.05, 1 - (2 * z - 1) ** 2))
        img = np.zeros((size, size), np.float32)
        img[_ellipse(size, c, c, size * 0.42 * scale, size * 0.36 * scale)] = 900  # scalp, CSF
        img[_ellipse(size, c, c, size * 0.39 * scale, size * 0.33 * scale)] = 420  # brain
        if 0.3 < z < 0.7:
            for side in (-1, 1):
                img[_ellipse(size, c - 8, c + side * 12, 26 * scale, 7)] = 1500  # ventricles
        if 0.45 < z < 0.6:
            img[_ellipse(size, c + 40, c + 45, 10, 12)] = 1200  # a bright lesion
        img += np.random.default_rng(i).normal(0, 20, img.shape).astype(np.float32)
        ds = _base(info, MRImageStorage, "MR", 3, i + 1)
        ds.SeriesDescription = "AX T2"
        ds.BodyPartExamined = "HEAD"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MagneticFieldStrength = 3
        ds.PixelSpacing = [0.9, 0.9]
        ds.SliceThickness = 5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-115, -115, 60 - i * 5.0]
        ds.FrameOfReferenceUID = demo_uid(info.key, "frame")
        ds.WindowCenter = 700
        ds.WindowWidth = 1600
        _image(ds, np.clip(img, 0, 4095), signed=False)
        out.append(ds)
    return out


def chest_cr(info: StudyInfo, *, rows: int = 2140, columns: int = 1760) -> list[Dataset]:
    """A PA chest radiograph (12-bit, dark lungs, bright mediastinum and bones)."""
    y, x = np.mgrid[:rows, :columns].astype(np.float32)
    img = np.full((rows, columns), 300.0, np.float32)
    body = ((x - columns / 2) / (columns * 0.46)) ** 2 + ((y - rows * 0.55) / (rows * 0.5)) ** 2
    img[body <= 1] = 2600
    for side in (-1, 1):
        lung = ((x - columns / 2 - side * columns * 0.19) / (columns * 0.15)) ** 2 + (
            (y - rows * 0.47) / (rows * 0.3)
        ) ** 2
        img[lung <= 1] = 900
    img[np.abs(x - columns / 2) < columns * 0.05] = 3300  # spine and mediastinum
    heart = ((x - columns * 0.55) / (columns * 0.14)) ** 2
    heart += ((y - rows * 0.62) / (rows * 0.13)) ** 2
    img[heart <= 1] = 3000
    for k in range(9):  # ribs
        band = np.abs(y - rows * (0.22 + k * 0.06) - 0.08 * np.abs(x - columns / 2)) < 9
        img[band & (body <= 1)] += 500
    img += np.random.default_rng(3).normal(0, 30, img.shape).astype(np.float32)
    ds = _base(info, ComputedRadiographyImageStorage, "CR", 1, 1)
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PatientOrientation = ["L", "F"]
    ds.WindowCenter = 2000
    ds.WindowWidth = 3500
    _image(ds, np.clip(img, 0, 4095), signed=False)
    return [ds]


def text_report(info: StudyInfo, findings: str, impression: str) -> list[Dataset]:
    """A verified Basic Text SR: findings and impression."""
    ds = _base(info, BASIC_TEXT_SR, "SR", 90, 1)
    ds.SeriesDescription = "Radiology report"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = "DEMO^RADIOLOGIST"
    observer.VerifyingOrganization = info.institution
    observer.VerificationDateTime = info.date + info.time
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    items = []
    for code, meaning, text in (
        ("121071", "Finding", findings),
        ("121073", "Impression", impression),
    ):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code(code, "DCM", meaning)])
        item.TextValue = text
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return [ds]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def pdf_report(info: StudyInfo, title: str, lines: list[str]) -> list[Dataset]:
    """An Encapsulated PDF report (a one-page PDF written here)."""
    ds = _base(info, EncapsulatedPDFStorage, "DOC", 91, 1)
    ds.SeriesDescription = "Referral letter (PDF)"
    ds.DocumentTitle = title
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    pdf = one_page_pdf([title, "", *lines])
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return [ds]


def one_page_pdf(lines: list[str]) -> bytes:
    """A minimal PDF 1.4 page of Helvetica text lines (ASCII)."""

    def escape(text: str) -> str:
        safe = text.encode("ascii", "replace").decode()
        return safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    body = ["BT", "/F1 12 Tf", "16 TL", "56 780 Td"]
    for n, line in enumerate(lines):
        if n == 0:
            body += ["/F1 16 Tf", f"({escape(line)}) Tj", "/F1 12 Tf", "T*"]
        else:
            body += [f"({escape(line)}) Tj", "T*"]
    body.append("ET")
    stream = "\n".join(body).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def today() -> str:
    return dt.date.today().strftime("%Y%m%d")
