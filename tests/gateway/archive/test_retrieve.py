"""The retrieve path: which stored instances a request names, and their bytes as received."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway.archive import Archive, Level, RetrieveRequest
from gateway.archive.errors import InvalidQuery, NotFound
from gateway.archive.retrieve import iter_dataset_bytes, local_part10, open_dataset
from tests.factories import ct_slice, dataset_bytes, uid, write
from tests.gateway.archive.helpers import SOURCE

pytestmark = [
    pytest.mark.fast,
    pytest.mark.production,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture
def stored(archive: Archive, tmp_path: Path) -> dict[str, object]:
    """Two patients; the first has a study of two series whose instances arrive out of
    order, the second a study at another issuer."""
    study_a, series_1, series_2 = uid(), uid(), uid()
    files: dict[str, Path] = {}
    order = [
        (series_2, 2, 2),
        (series_1, 1, 3),
        (series_1, 1, 1),
        (series_2, 2, 1),
        (series_1, 1, 2),
    ]
    sops: dict[tuple[str, int], str] = {}
    for n, (series, number, instance) in enumerate(order):
        ds = ct_slice(
            patient_id="P1",
            study_uid=study_a,
            series_uid=series,
            series_number=number,
            instance_number=instance,
            rows=8,
            columns=8,
        )
        sops[(series, instance)] = ds.SOPInstanceUID
        files[ds.SOPInstanceUID] = write(ds, tmp_path / "in" / f"{n}.dcm")
        archive.ingest_file(files[ds.SOPInstanceUID], SOURCE)
    study_b = uid()
    other = ct_slice(patient_id="P1", issuer="ELSEWHERE", study_uid=study_b, rows=8, columns=8)
    files[other.SOPInstanceUID] = write(other, tmp_path / "in" / "other.dcm")
    archive.ingest_file(files[other.SOPInstanceUID], SOURCE)
    return {
        "study_a": study_a,
        "study_b": study_b,
        "series_1": series_1,
        "series_2": series_2,
        "sops": sops,
        "other": other.SOPInstanceUID,
        "files": files,
    }


def test_study_level_in_series_then_instance_order(archive: Archive, stored):
    found = archive.find_instances(RetrieveRequest(Level.STUDY, study_uids=[stored["study_a"]]))
    sops = stored["sops"]
    s1, s2 = stored["series_1"], stored["series_2"]
    assert [i.sop_uid for i in found] == [
        sops[(s1, 1)],
        sops[(s1, 2)],
        sops[(s1, 3)],
        sops[(s2, 1)],
        sops[(s2, 2)],
    ]
    assert {i.study_uid for i in found} == {stored["study_a"]}
    assert {i.transfer_syntax_uid for i in found} == {"1.2.840.10008.1.2.1"}


def test_series_and_image_levels(archive: Archive, stored):
    s2 = stored["series_2"]
    found = archive.find_instances(RetrieveRequest(Level.SERIES, series_uids=[s2]))
    assert [i.sop_uid for i in found] == [stored["sops"][(s2, 1)], stored["sops"][(s2, 2)]]
    # A series named with the wrong study finds nothing.
    found = archive.find_instances(
        RetrieveRequest(Level.SERIES, study_uids=[stored["study_b"]], series_uids=[s2])
    )
    assert found == []
    wanted = [stored["sops"][(s2, 2)], stored["other"]]
    found = archive.find_instances(RetrieveRequest(Level.IMAGE, sop_uids=wanted))
    assert sorted(i.sop_uid for i in found) == sorted(wanted)


def test_uid_lists_and_unknown_uids(archive: Archive, stored):
    found = archive.find_instances(
        RetrieveRequest(Level.STUDY, study_uids=[stored["study_a"], stored["study_b"], "1.2.3"])
    )
    assert len(found) == 6
    assert archive.find_instances(RetrieveRequest(Level.STUDY, study_uids=["1.2.3"])) == []


def test_patient_level_with_and_without_issuer(archive: Archive, stored):
    found = archive.find_instances(RetrieveRequest(Level.PATIENT, patient_ids=["P1"]))
    assert len(found) == 6
    found = archive.find_instances(
        RetrieveRequest(Level.PATIENT, patient_ids=["P1"], issuer="ELSEWHERE")
    )
    assert [i.sop_uid for i in found] == [stored["other"]]


@pytest.mark.parametrize(
    "request_",
    [
        RetrieveRequest(Level.STUDY),
        RetrieveRequest(Level.SERIES, study_uids=["1.2.3"]),
        RetrieveRequest(Level.IMAGE, series_uids=["1.2.3"]),
        RetrieveRequest(Level.PATIENT),
        RetrieveRequest(Level.STUDY, study_uids=["../../etc"]),
        RetrieveRequest(Level.STUDY, study_uids=["1.2..3"]),
        RetrieveRequest(Level.IMAGE, sop_uids=["1.2.3", "1.2.x"]),
    ],
)
def test_bad_requests_are_refused(archive: Archive, stored, request_: RetrieveRequest):
    with pytest.raises(InvalidQuery):
        archive.find_instances(request_)


def test_bytes_are_the_data_set_as_received(archive: Archive, stored):
    found = archive.find_instances(RetrieveRequest(Level.STUDY, study_uids=[stored["study_a"]]))
    for inst in found:
        original = stored["files"][inst.sop_uid]
        assert b"".join(iter_dataset_bytes(archive.store, inst, chunk_size=100)) == dataset_bytes(
            original
        )
        with open_dataset(archive.store, inst) as fh:
            assert fh.read(16) == dataset_bytes(original)[:16]
        with local_part10(archive.store, inst) as path:
            assert pydicom.dcmread(path).SOPInstanceUID == inst.sop_uid
        assert inst.size == len(dataset_bytes(original))


def test_wrapped_bare_data_set_is_retrieved_as_received(archive: Archive, tmp_path: Path):
    path = Path(get_testdata_file("ExplVR_BigEndNoMeta.dcm"))
    result = archive.ingest_file(path, SOURCE)
    [inst] = archive.find_instances(RetrieveRequest(Level.IMAGE, sop_uids=[result.sop_uid]))
    assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    assert b"".join(iter_dataset_bytes(archive.store, inst)) == path.read_bytes()


def test_missing_blob_is_not_found(archive: Archive, stored):
    [inst] = archive.find_instances(RetrieveRequest(Level.IMAGE, sop_uids=[stored["other"]]))
    archive.store.delete(inst.blob_key)
    with pytest.raises(NotFound):
        list(iter_dataset_bytes(archive.store, inst))
