"""DICOM JSON written from plain query values equals pydicom's encoding of data sets."""

from __future__ import annotations

import json

import pytest

from dicomweb import dicomjson
from gateway.archive.query import Level, QueryResult

pytestmark = pytest.mark.fast

KEYS = [
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "StudyDate",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "SeriesNumber",
    "Rows",
    "StudyDescription",
    "InstanceAvailability",
    "NotAKeyword",
]

ROWS = [
    (
        "1.2.3",
        "Hong^Gildong=洪^吉洞=홍^길동",
        "P1",
        "20200301",
        ["CT", "MR"],
        250,
        3,
        512,
        "Chest\\Abdomen",
        "ONLINE",
        None,
    ),
    ("1.2.4", "DOE^JANE", None, None, None, 0, None, None, None, "ONLINE", None),
    ("1.2.5", "=洪^吉洞", "P\\Q", "", ["CT"], 1, 0, 8, "Ünïcode", "ONLINE", None),
    ("1.2.6", "KIM^A==", "P2", "20240101", None, 5, 12, None, "", "ONLINE", None),
    ("1.2.7", "A^B\\C^D=E", "P3", "20240101", None, 5, 12, 16, "x", "ONLINE", None),
]


def test_encode_matches_equals_pydicom_encoding():
    result = QueryResult(level=Level.STUDY, keys=KEYS, rows=ROWS)
    fast = json.loads(dicomjson.encode_matches(result.keys, result.rows))
    datasets = result.datasets
    for ds in datasets:
        del ds.QueryRetrieveLevel
    slow = json.loads(dicomjson.encode(datasets))
    assert fast == slow
    # Tags in ascending order, as in a data set (pydicom keeps insertion order).
    assert all(list(obj) == sorted(obj) for obj in fast)


def test_encode_matches_extra_attribute_from_the_row():
    body = dicomjson.encode_matches(
        ["StudyInstanceUID", "PatientID"],
        [("1.2.3", "P1")],
        [("RetrieveURL", lambda values: f"http://x/studies/{values['StudyInstanceUID']}")],
    )
    [obj] = json.loads(body)
    assert list(obj) == ["00081190", "00100020", "0020000D"]
    assert obj["00081190"] == {"vr": "UR", "Value": ["http://x/studies/1.2.3"]}
