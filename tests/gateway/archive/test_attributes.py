"""attributes: values read straight from raw elements equal what pydicom decodes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.archive.attributes import (
    PYDICOM,
    extract,
    integer,
    plain_integer,
    plain_string,
    tag_of,
    text,
    value_of,
)
from gateway.archive.frames import PixelAttributes
from tests.factories import ct_slice, write

pytestmark = [pytest.mark.fast, pytest.mark.filterwarnings("ignore::UserWarning")]

TEXT_KEYWORDS = [
    "PatientID",
    "IssuerOfPatientID",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "StudyDate",
    "StudyTime",
    "ContentDate",
    "ContentTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "InstitutionName",
    "PatientSex",
    "PhotometricInterpretation",
    "ImageType",
    "SpecificCharacterSet",
]
INTEGER_KEYWORDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "InstanceNumber",
    "SeriesNumber",
    "PixelRepresentation",
]


def reference_text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    """attributes.text as it was: pydicom decodes every value."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")[:limit]


def reference_integer(ds: Dataset, keyword: str) -> int | None:
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


def _files() -> list[str]:
    # The files in pydicom's wheel (get_testdata_files would also try to download).
    root = Path(pydicom.data.DATA_ROOT)
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix in (".dcm", ""))


def _read(path: str) -> Dataset | None:
    try:
        return pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return None


def test_values_read_directly_are_what_pydicom_decodes():
    compared = direct = 0
    for path in _files():
        ds = _read(path)
        if ds is None:
            continue
        compared += 1
        # Each value is read directly first (it stays raw), then decoded by pydicom.
        for keyword in TEXT_KEYWORDS:
            direct += plain_string(ds, tag_of(keyword)) is not PYDICOM
            plain, ours = value_of(ds, keyword), text(ds, keyword)
            assert ours == reference_text(ds, keyword), (path, keyword)
            decoded = ds.get(keyword)
            assert (plain is None) == (decoded is None), (path, keyword)
            if decoded is not None and not isinstance(decoded, MultiValue):
                assert str(plain) == str(decoded), (path, keyword)
        for keyword in INTEGER_KEYWORDS:
            direct += plain_integer(ds, tag_of(keyword)) is not PYDICOM
            ours_int = integer(ds, keyword)
            assert ours_int == reference_integer(ds, keyword), (path, keyword)
        converted = _converted(path)
        assert extract(_read(path)) == extract(converted), path
        assert PixelAttributes.from_dataset(_read(path)) == PixelAttributes.from_dataset(
            converted
        ), path
    assert compared > 100
    assert direct > 1000  # most values are read directly, not by asking pydicom


def _converted(path: str) -> Dataset:
    """The dataset with every element already decoded by pydicom (nothing raw left)."""
    ds = _read(path)
    assert ds is not None
    for elem in ds:  # iterating converts each raw element
        _ = elem.value
    return ds


def test_values_pydicom_must_decode_are_left_to_it(tmp_path: Path):
    ds = ct_slice()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "MÜLLER"  # not ASCII: decoded with the character set
    ds.ImageType = ["ORIGINAL", "PRIMARY"]  # two values
    ds.InstanceNumber = "1.0"  # not a plain integer
    ds.SliceThickness = "2.5"  # DS: pydicom makes a number of it
    path = write(ds, tmp_path / "a.dcm")
    read = pydicom.dcmread(path, stop_before_pixels=True)
    assert plain_string(read, tag_of("PatientID")) is PYDICOM
    assert text(read, "PatientID") == "MÜLLER"
    assert plain_string(read, tag_of("ImageType")) is PYDICOM
    assert text(read, "ImageType") == "ORIGINAL\\PRIMARY"
    assert plain_integer(read, tag_of("InstanceNumber")) is PYDICOM
    assert integer(read, "InstanceNumber") == 1
    assert plain_string(read, tag_of("SliceThickness")) is PYDICOM
    assert plain_string(read, tag_of("DerivationDescription")) is None  # absent
    assert plain_integer(read, tag_of("Rows")) == ds.Rows
    assert plain_string(read, tag_of("Modality")) == "CT"


def test_dates_left_to_pydicom_when_it_converts_them(tmp_path: Path, monkeypatch):
    path = write(ct_slice(), tmp_path / "a.dcm")
    read = pydicom.dcmread(path, stop_before_pixels=True)
    assert plain_string(read, tag_of("StudyDate")) is not PYDICOM
    monkeypatch.setattr(config, "datetime_conversion", True)
    assert plain_string(read, tag_of("StudyDate")) is PYDICOM
