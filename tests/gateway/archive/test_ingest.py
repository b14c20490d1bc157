"""Ingest rules (see the docstring of gateway/archive/ingest.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import os
import resource
import shutil
import signal
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import event, select

from gateway.archive import Archive, Digests, Outcome, Source
from gateway.archive.errors import (
    ArchiveError,
    IndexUnavailable,
    InstanceConflict,
    InvalidDataset,
    InvalidUID,
    MissingAttribute,
    NotStorageSOPClass,
    PatientMismatch,
    StorageUnavailable,
)
from gateway.archive.models import Instance, Patient, Series, Study
from gateway.archive.removal import remove_study_rows
from tests.factories import (
    bare,
    ct_slice,
    dataset_bytes,
    nested_sequence,
    strip_meta,
    uid,
    with_inserted_before_pixels,
    write,
)
from tests.gateway.archive.helpers import (
    SOURCE,
    all_files,
    assert_nothing_stored,
    blob_bytes,
    blob_keys,
    count,
    events,
    instance,
    instances,
    read_blob,
)
from tests.servers import missing

pytestmark = [pytest.mark.production, pytest.mark.filterwarnings("ignore::UserWarning")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_ts(ds: Dataset, path: Path, ts: str) -> Path:
    """Write ``ds`` as Part 10 in transfer syntax ``ts`` (native pixel data only)."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- stored, duplicate, provenance -------------------------------------------------------
@pytest.mark.fast
def test_new_instance_is_stored_with_its_bytes_and_provenance(archive: Archive, tmp_path: Path):
    ds = ct_slice(patient_id="P1", issuer="HOSP-A", instance_number=7)
    path = write(ds, tmp_path / "in.dcm")
    original = path.read_bytes()

    result = archive.ingest_file(path, SOURCE)

    assert result.outcome is Outcome.STORED
    assert (result.sop_uid, result.study_uid, result.series_uid) == (
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
    )
    assert result.transfer_syntax == ExplicitVRLittleEndian
    assert path.read_bytes() == original  # not owned: left untouched
    row = instance(archive, ds.SOPInstanceUID)
    assert row is not None
    data = dataset_bytes(path)
    assert row.sha256 == sha256(data)
    assert row.size == len(data) == result.size
    assert row.instance_number == 7
    assert (row.rows, row.columns, row.bits_allocated) == (64, 64, 16)
    assert row.door == "test" and row.source_ae == "TESTSCU"
    assert row.source_institution == "Test Hospital"
    assert row.received_patient_id == "P1" and row.received_issuer == "HOSP-A"
    assert row.received_at.tzinfo is not None
    blob = blob_bytes(archive, row.blob_key)
    assert blob[row.dataset_offset :] == data
    # The blob is a Part 10 file pydicom reads back whole.
    stored = read_blob(archive, row.blob_key)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    assert blob_keys(archive) == [row.blob_key]
    assert (count(archive, Patient), count(archive, Study), count(archive, Series)) == (1, 1, 1)
    assert all_files(archive.settings.staging_dir) == []


@pytest.mark.fast
def test_digests_taken_by_the_writer_are_used_only_where_the_data_set_starts(
    archive: Archive, tmp_path: Path
):
    first, second = ct_slice(), ct_slice()
    marker = Digests(0, "e" * 64, "d" * 64)  # not this file's: shows whether it was used
    path = write(first, tmp_path / "a.dcm")
    offset = len(path.read_bytes()) - len(dataset_bytes(path))
    archive.ingest_file(path, SOURCE, digests=Digests(offset, marker.meta, marker.dataset))
    row = instance(archive, first.SOPInstanceUID)
    assert row is not None and row.sha256 == marker.dataset
    assert row.blob_key.endswith(f".{'d' * 16}.eeeeeeee.dcm")
    # Digests of another layout (the data set does not start there) are ignored.
    path = write(second, tmp_path / "b.dcm")
    archive.ingest_file(path, SOURCE, digests=Digests(offset + 2, marker.meta, marker.dataset))
    row = instance(archive, second.SOPInstanceUID)
    assert row is not None and row.sha256 == sha256(dataset_bytes(path))
    meta = hashlib.sha256(path.read_bytes()[:offset]).hexdigest()
    assert row.blob_key.endswith(f".{row.sha256[:16]}.{meta[:8]}.dcm")


@pytest.mark.fast
def test_blob_key_is_built_from_validated_uids(archive: Archive, tmp_path: Path):
    ds = ct_slice()
    archive.ingest_file(write(ds, tmp_path / "a.dcm"), SOURCE)
    key = instances(archive)[0].blob_key
    assert key.startswith(f"studies/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/")
    assert ds.SOPInstanceUID in key


@pytest.mark.fast
def test_same_bytes_again_is_a_duplicate_without_a_second_blob(archive: Archive, tmp_path):
    path = write(ct_slice(), tmp_path / "a.dcm")
    first = archive.ingest_file(path, SOURCE)
    copy = tmp_path / "copy.dcm"
    shutil.copyfile(path, copy)
    again = archive.ingest_file(copy, Source(door="stow"))

    assert first.outcome is Outcome.STORED
    assert again.outcome is Outcome.DUPLICATE
    assert count(archive, Instance) == 1
    assert len(blob_keys(archive)) == 1
    assert instances(archive)[0].door == "test"  # the first copy's provenance stays


@pytest.mark.fast
def test_owned_file_is_consumed_whatever_the_outcome(archive: Archive, tmp_path: Path):
    ds = ct_slice()
    first = write(ds, tmp_path / "first.dcm")
    second = write(ds, tmp_path / "second.dcm")
    assert archive.ingest_file(first, SOURCE, owned=True).outcome is Outcome.STORED
    assert not first.exists()
    assert archive.ingest_file(second, SOURCE, owned=True).outcome is Outcome.DUPLICATE
    assert not second.exists()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(InvalidDataset):
        archive.ingest_file(bad, SOURCE, owned=True)
    assert not bad.exists()
    assert len(blob_keys(archive)) == 1


@pytest.mark.fast
def test_owned_file_is_consumed_when_the_store_refuses_it(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Not moved into the store (it failed): the file is still removed, not left behind."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise StorageUnavailable("blob store cannot write: Input/output error")

    path = write(ct_slice(), tmp_path / "a.dcm")
    monkeypatch.setattr(archive.store, "place_file", refuse)
    with pytest.raises(StorageUnavailable):
        archive.ingest_file(path, SOURCE, owned=True)
    assert not path.exists()
    assert_nothing_stored(archive)


@pytest.mark.fast
def test_owned_bare_data_set_is_consumed_once_wrapped_and_stored(archive: Archive, tmp_path: Path):
    path = bare(ct_slice(), tmp_path / "bare.dcm", implicit_vr=True)
    assert archive.ingest_file(path, SOURCE, owned=True).outcome is Outcome.STORED
    assert not path.exists()
    assert all_files(archive.settings.staging_dir) == []
    assert len(blob_keys(archive)) == 1


@pytest.mark.fast
def test_ingest_dataset_in_memory(archive: Archive):
    ds = ct_slice()
    result = archive.ingestor.ingest_dataset(ds, SOURCE)
    assert result.outcome is Outcome.STORED
    assert instance(archive, ds.SOPInstanceUID) is not None
    assert all_files(archive.settings.staging_dir) == []


def test_concurrent_receivers_of_one_instance_store_it_once(archive: Archive, tmp_path: Path):
    """Several receivers get the same instance at once: one stores, the rest see duplicates."""
    ds = ct_slice()
    paths = [write(ds, tmp_path / f"{i}.dcm") for i in range(6)]
    others = [
        Archive(archive.settings, archive.db, archive.store),
        Archive(archive.settings, archive.db, archive.store),
        Archive(archive.settings, archive.db, archive.store),
    ]
    outcomes: list[object] = []
    barrier = threading.Barrier(len(paths))

    def run(i: int) -> None:
        arch = others[i % len(others)]
        barrier.wait()
        try:
            outcomes.append(arch.ingest_file(paths[i], SOURCE).outcome)
        except Exception as exc:  # recorded and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, outcomes)) == ["duplicate"] * 5 + ["stored"], outcomes
    assert count(archive, Instance) == 1
    assert len(blob_keys(archive)) == 1


def _race(archive: Archive, paths: list[Path]) -> list[object]:
    """Ingest ``paths`` at once, one thread and one Ingestor (receiver) each."""
    outcomes: list[object] = [None] * len(paths)
    barrier = threading.Barrier(len(paths))
    receivers = [Archive(archive.settings, archive.db, archive.store) for _ in paths]

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = receivers[i].ingest_file(paths[i], SOURCE).outcome
        except Exception as exc:  # asserted by the caller
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_different_content_is_one_store_and_one_conflict(
    archive: Archive, tmp_path: Path, attempt: int
):
    ds = ct_slice()
    changed = copy.deepcopy(ds)
    changed.StudyDescription = "OTHER"
    paths = [write(ds, tmp_path / "a.dcm"), write(changed, tmp_path / "b.dcm")]
    assert paths[0].read_bytes() != paths[1].read_bytes()
    outcomes = _race(archive, paths)
    assert sorted(type(o).__name__ for o in outcomes) == ["InstanceConflict", "Outcome"], outcomes
    [row] = instances(archive)
    winner = paths[[isinstance(o, Outcome) for o in outcomes].index(True)]
    loser = paths[[isinstance(o, InstanceConflict) for o in outcomes].index(True)]
    assert blob_bytes(archive, row.blob_key) == winner.read_bytes()
    [event] = events(archive, "conflict")
    assert blob_bytes(archive, event.blob_key) == loser.read_bytes()
    assert sorted(blob_keys(archive)) == sorted([row.blob_key, event.blob_key])


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_patients_for_one_study_file_one_of_them(
    archive: Archive, tmp_path: Path, attempt: int
):
    study = uid()
    paths = [
        write(ct_slice(patient_id="P1", study_uid=study), tmp_path / "a.dcm"),
        write(ct_slice(patient_id="P2", study_uid=study), tmp_path / "b.dcm"),
    ]
    outcomes = _race(archive, paths)
    assert sorted(type(o).__name__ for o in outcomes) == ["Outcome", "PatientMismatch"]
    assert count(archive, Instance) == 1 and count(archive, Study) == 1
    with archive.db.reading() as session:
        patients = {p.id: p.patient_id for p in session.query(Patient)}
        study_row = session.query(Study).one()
    winner = ["P1", "P2"][[isinstance(o, Outcome) for o in outcomes].index(True)]
    assert patients[study_row.patient_fk] == winner
    [event] = events(archive, "patient-mismatch")
    assert event.blob_key.startswith("quarantine/")
    assert len(blob_keys(archive, "studies")) == 1


@pytest.mark.fast
def test_ingest_dataset_that_cannot_be_encoded(archive: Archive):
    ds = Dataset()
    ds.PatientName = "NO^META"
    with pytest.raises(InvalidDataset):
        archive.ingestor.ingest_dataset(ds, SOURCE)
    assert_nothing_stored(archive)


# -- alternate syntax and conflicts ------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("second_ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_same_instance_in_another_syntax_keeps_the_first_copy(
    archive: Archive, tmp_path: Path, second_ts: str
):
    ds = ct_slice()
    first = write_ts(ds, tmp_path / "first.dcm", ExplicitVRLittleEndian)
    second = write_ts(ds, tmp_path / "second.dcm", second_ts)
    archive.ingest_file(first, SOURCE)
    stored = instances(archive)[0]

    result = archive.ingest_file(second, Source(door="stow", ae_title="OTHER"))

    assert result.outcome is Outcome.ALTERNATE_SYNTAX
    assert result.transfer_syntax == second_ts
    rows = instances(archive)
    assert len(rows) == 1
    assert rows[0].transfer_syntax_uid == ExplicitVRLittleEndian
    assert rows[0].blob_key == stored.blob_key and rows[0].sha256 == stored.sha256
    assert blob_keys(archive) == [stored.blob_key]
    assert blob_bytes(archive, stored.blob_key)[stored.dataset_offset :] == dataset_bytes(first)
    [event] = events(archive)
    assert event.kind == "alternate-syntax"
    assert event.sop_uid == ds.SOPInstanceUID and event.study_uid == ds.StudyInstanceUID
    assert event.door == "stow" and event.source_ae == "OTHER"
    assert second_ts in event.detail


@pytest.mark.fast
def test_different_content_same_syntax_is_a_conflict_and_kept_aside(
    archive: Archive, tmp_path: Path
):
    ds = ct_slice()
    first = write(ds, tmp_path / "first.dcm")
    archive.ingest_file(first, SOURCE)
    stored = instances(archive)[0]
    stored_blob = blob_bytes(archive, stored.blob_key)
    changed = copy.deepcopy(ds)
    changed.StudyDescription = "CT HEAD WITH CONTRAST"
    second = write(changed, tmp_path / "second.dcm")

    with pytest.raises(InstanceConflict) as info:
        archive.ingest_file(second, SOURCE)

    assert not info.value.retryable
    [row] = instances(archive)
    assert (row.sha256, row.blob_key) == (stored.sha256, stored.blob_key)
    assert blob_bytes(archive, stored.blob_key) == stored_blob
    [event] = events(archive)
    assert event.kind == "conflict"
    assert event.blob_key is not None and event.blob_key.startswith("quarantine/")
    assert blob_bytes(archive, event.blob_key) == second.read_bytes()
    assert sorted(blob_keys(archive)) == sorted([stored.blob_key, event.blob_key])
    # The study's attributes are those of the first copy.
    with archive.db.reading() as session:
        assert session.query(Study.study_description).scalar() == "CT HEAD"


@pytest.mark.fast
def test_stored_instance_sent_again_with_another_patient_id_is_a_conflict(
    archive: Archive, tmp_path: Path
):
    # The series is in this process's placement cache after the first store: the copy
    # is decided on the index (the instance exists: a conflict), not refused as a
    # study of another patient on the cached placement.
    ds = ct_slice()
    archive.ingest_file(write(ds, tmp_path / "first.dcm"), SOURCE)
    changed = copy.deepcopy(ds)
    changed.PatientID = "SOMEONE-ELSE"
    with pytest.raises(InstanceConflict):
        archive.ingest_file(write(changed, tmp_path / "second.dcm"), SOURCE)
    assert [e.kind for e in events(archive)] == ["conflict"]
    assert count(archive, Instance) == 1


@pytest.mark.fast
def test_next_instances_of_a_series_after_a_duplicate_are_stored(archive: Archive, tmp_path):
    # A duplicate of a cached series goes through the unique key and clears the cache;
    # the series' next instances are filed under the same rows.
    ds = ct_slice()
    path = write(ds, tmp_path / "a.dcm")
    assert archive.ingest_file(path, SOURCE).outcome is Outcome.STORED
    assert archive.ingest_file(path, SOURCE).outcome is Outcome.DUPLICATE
    for n in range(3):
        more = copy.deepcopy(ds)
        more.SOPInstanceUID = uid()
        more.file_meta.MediaStorageSOPInstanceUID = more.SOPInstanceUID
        more.InstanceNumber = n + 2
        assert archive.ingest_file(write(more, tmp_path / f"{n}.dcm"), SOURCE).outcome is (
            Outcome.STORED
        )
    assert (count(archive, Instance), count(archive, Series), count(archive, Study)) == (4, 1, 1)
    assert len(blob_keys(archive)) == 4


@pytest.mark.fast
def test_a_cached_series_removed_meanwhile_is_never_filed_under_rows_that_reuse_its_ids(
    archive: Archive, tmp_path: Path
):
    # This process cached where series X is filed. Another process then removes its
    # study, and a new study takes the freed row ids (SQLite reuses the largest
    # rowid; PostgreSQL never does, the insert then misses its foreign key). X's next
    # instance must not land in the new study's series.
    first = ct_slice(patient_id="PAT-X")
    archive.ingest_file(write(first, tmp_path / "x1.dcm"), SOURCE)
    with archive.db.writing() as session:
        assert remove_study_rows(session, first.StudyInstanceUID) is not None
    other = ct_slice(patient_id="PAT-Y", patient_name="ROE^RICHARD", accession="ACC-Y")
    archive.ingest_file(write(other, tmp_path / "y1.dcm"), SOURCE)
    again = ct_slice(
        patient_id="PAT-X",
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
        instance_number=2,
    )
    path = write(again, tmp_path / "x2.dcm")
    try:
        archive.ingest_file(path, SOURCE)
    except IndexUnavailable as exc:  # retryable: the sender sends it again
        assert exc.retryable
        archive.ingest_file(path, SOURCE)
    with archive.db.reading() as session:
        filed = session.execute(
            select(Instance.sop_uid, Series.series_uid, Study.study_uid, Patient.patient_id)
            .join(Series, Series.id == Instance.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .join(Patient, Patient.id == Study.patient_fk)
            .order_by(Instance.sop_uid)
        ).all()
    assert sorted(tuple(r) for r in filed) == sorted(
        [
            (other.SOPInstanceUID, other.SeriesInstanceUID, other.StudyInstanceUID, "PAT-Y"),
            (again.SOPInstanceUID, first.SeriesInstanceUID, first.StudyInstanceUID, "PAT-X"),
        ]
    )


@pytest.mark.fast
def test_conflicting_owned_file_is_moved_to_quarantine(archive: Archive, tmp_path: Path):
    ds = ct_slice()
    archive.ingest_file(write(ds, tmp_path / "first.dcm"), SOURCE)
    changed = copy.deepcopy(ds)
    changed.PatientSex = "M"
    second = write(changed, tmp_path / "second.dcm")
    content = second.read_bytes()
    with pytest.raises(InstanceConflict):
        archive.ingest_file(second, SOURCE, owned=True)
    assert not second.exists()
    [event] = events(archive, "conflict")
    assert blob_bytes(archive, event.blob_key) == content


# -- patients and studies ------------------------------------------------------------------
@pytest.mark.fast
def test_study_under_another_patient_is_refused(archive: Archive, tmp_path: Path):
    study, series = uid(), uid()
    archive.ingest_file(
        write(ct_slice(patient_id="P1", study_uid=study, series_uid=series), tmp_path / "a.dcm"),
        SOURCE,
    )
    other = ct_slice(patient_id="P2", study_uid=study, series_uid=series, instance_number=2)
    path = write(other, tmp_path / "b.dcm")

    with pytest.raises(PatientMismatch):
        archive.ingest_file(path, SOURCE)

    assert instance(archive, other.SOPInstanceUID) is None
    assert count(archive, Patient) == 1
    [event] = events(archive)
    assert event.kind == "patient-mismatch"
    assert event.blob_key.startswith("quarantine/")
    assert blob_bytes(archive, event.blob_key) == path.read_bytes()


@pytest.mark.fast
def test_same_patient_id_from_another_issuer_is_another_patient(archive: Archive, tmp_path):
    study = uid()
    archive.ingest_file(
        write(ct_slice(patient_id="12345", issuer="HOSP-A", study_uid=study), tmp_path / "a.dcm"),
        SOURCE,
    )
    with pytest.raises(PatientMismatch):
        archive.ingest_file(
            write(
                ct_slice(patient_id="12345", issuer="HOSP-B", study_uid=study), tmp_path / "b.dcm"
            ),
            SOURCE,
        )
    # Another study of "12345" at HOSP-B files a second patient.
    archive.ingest_file(
        write(ct_slice(patient_id="12345", issuer="HOSP-B"), tmp_path / "c.dcm"), SOURCE
    )
    with archive.db.reading() as session:
        assert sorted(session.query(Patient.issuer, Patient.patient_id).all()) == [
            ("HOSP-A", "12345"),
            ("HOSP-B", "12345"),
        ]


@pytest.mark.fast
def test_source_issuer_and_default_issuer_apply_when_dataset_names_none(
    archive: Archive, tmp_path: Path
):
    archive.ingest_file(write(ct_slice(patient_id="A1"), tmp_path / "a.dcm"), SOURCE)
    archive.ingest_file(
        write(ct_slice(patient_id="A2"), tmp_path / "b.dcm"), Source(door="dimse", issuer="PEER")
    )
    with archive.db.reading() as session:
        assert dict(session.query(Patient.patient_id, Patient.issuer).all()) == {
            "A1": archive.settings.default_issuer,
            "A2": "PEER",
        }


def _with_other_ids(ds: Dataset, *pairs: tuple[str, str | None]) -> Dataset:
    items = []
    for pid, issuer in pairs:
        item = Dataset()
        item.PatientID = pid
        if issuer is not None:
            item.IssuerOfPatientID = issuer
        items.append(item)
    ds.OtherPatientIDsSequence = items
    return ds


@pytest.mark.fast
@pytest.mark.parametrize("issuer_in_item", ["HOSP-A", None])
def test_reconciled_copy_naming_the_filed_patient_is_accepted(
    archive: Archive, tmp_path: Path, issuer_in_item: str | None
):
    study, series = uid(), uid()
    archive.ingest_file(
        write(
            ct_slice(patient_id="A-77", issuer="HOSP-A", study_uid=study, series_uid=series),
            tmp_path / "a.dcm",
        ),
        SOURCE,
    )
    copy = _with_other_ids(
        ct_slice(
            patient_id="B-9", issuer="HOSP-B", study_uid=study, series_uid=uid(), instance_number=2
        ),
        ("X-1", "HOSP-X"),
        ("A-77", issuer_in_item),
    )
    result = archive.ingest_file(write(copy, tmp_path / "b.dcm"), SOURCE)

    assert result.outcome is Outcome.RECONCILED_COPY
    row = instance(archive, copy.SOPInstanceUID)
    assert (row.received_patient_id, row.received_issuer) == ("B-9", "HOSP-B")
    with archive.db.reading() as session:
        assert session.query(Patient.patient_id).all() == [("A-77",)]
        assert session.query(Study).count() == 1
        assert session.query(Series).count() == 2
    [event] = events(archive)
    assert event.kind == "reconciled-copy" and "B-9" in event.detail


@pytest.mark.fast
def test_other_patient_ids_naming_someone_else_do_not_reconcile(archive: Archive, tmp_path):
    study = uid()
    archive.ingest_file(
        write(ct_slice(patient_id="A-77", issuer="HOSP-A", study_uid=study), tmp_path / "a.dcm"),
        SOURCE,
    )
    copy = _with_other_ids(
        ct_slice(patient_id="B-9", issuer="HOSP-B", study_uid=study), ("A-77", "HOSP-Z")
    )
    with pytest.raises(PatientMismatch):
        archive.ingest_file(write(copy, tmp_path / "b.dcm"), SOURCE)
    assert instance(archive, copy.SOPInstanceUID) is None


@pytest.mark.fast
def test_series_under_another_study_is_refused(archive: Archive, tmp_path: Path):
    series = uid()
    archive.ingest_file(write(ct_slice(series_uid=series), tmp_path / "a.dcm"), SOURCE)
    other = ct_slice(series_uid=series, instance_number=2)  # new study, same series UID
    with pytest.raises(InvalidDataset) as info:
        archive.ingest_file(write(other, tmp_path / "b.dcm"), SOURCE)
    assert "another study" in str(info.value)
    assert instance(archive, other.SOPInstanceUID) is None
    assert count(archive, Study) == 1
    [event] = events(archive)
    assert event.kind == "series-mismatch" and event.blob_key.startswith("quarantine/")


@pytest.mark.fast
def test_unidentified_patients_are_never_merged(archive: Archive, tmp_path: Path):
    for i in range(2):
        ds = ct_slice(patient_id="")
        archive.ingest_file(write(ds, tmp_path / f"{i}.dcm"), SOURCE)
    assert count(archive, Patient) == 2
    # A second instance of the same unidentified study joins its patient.
    with archive.db.reading() as session:
        study_uid = session.query(Study.study_uid).first()[0]
    archive.ingest_file(
        write(ct_slice(patient_id="", study_uid=study_uid), tmp_path / "3.dcm"), SOURCE
    )
    assert count(archive, Patient) == 2
    assert count(archive, Instance) == 3


@pytest.mark.fast
def test_series_of_many_instances_is_filed_once(archive: Archive, tmp_path: Path):
    study, series = uid(), uid()
    for i in range(1, 6):
        ds = ct_slice(study_uid=study, series_uid=series, instance_number=i)
        assert archive.ingest_file(write(ds, tmp_path / f"{i}.dcm"), SOURCE).outcome == "stored"
    assert (count(archive, Study), count(archive, Series), count(archive, Instance)) == (1, 1, 5)


# -- refusals: nothing indexed, nothing left behind ---------------------------------------
REQUIRED = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


@pytest.mark.fast
@pytest.mark.parametrize("keyword", REQUIRED)
@pytest.mark.parametrize("how", ["deleted", "empty"])
def test_missing_required_attribute(archive: Archive, tmp_path: Path, keyword: str, how: str):
    ds = ct_slice()
    if how == "deleted":
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, "")
    path = write(ds, tmp_path / "in.dcm")
    with pytest.raises(MissingAttribute) as info:
        archive.ingest_file(path, SOURCE)
    assert keyword in str(info.value)
    assert_nothing_stored(archive)


BAD_UIDS = [
    "../../../etc/passwd",
    "1.2/../../3",
    "1.2..3",
    ".1.2.3",
    "1.2.3.",
    "1." + "2" * 63,  # 65 characters
    "1.2.840.abc",
    "1.2.3a",
    "1.2.3 4",
    "1.2.3\\1.2.4",  # two values where one is allowed
]


@pytest.mark.fast
@pytest.mark.parametrize("keyword", REQUIRED)
@pytest.mark.parametrize("bad", BAD_UIDS)
def test_invalid_uid_is_refused(archive: Archive, tmp_path: Path, keyword: str, bad: str):
    ds = ct_slice()
    setattr(ds, keyword, bad)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = bad
    if keyword == "SOPClassUID":
        ds.file_meta.MediaStorageSOPClassUID = bad
    path = write(ds, tmp_path / "in.dcm")
    with pytest.raises(InvalidUID):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)
    assert events(archive) == []


@pytest.mark.fast
def test_uid_of_exactly_64_characters_is_accepted(archive: Archive, tmp_path: Path):
    long_uid = "1." + "2" * 62
    assert len(long_uid) == 64
    result = archive.ingest_file(write(ct_slice(sop_uid=long_uid), tmp_path / "a.dcm"), SOURCE)
    assert result.outcome is Outcome.STORED and result.sop_uid == long_uid


def patch_meta(path: Path, old: str, new: str) -> Path:
    """Replace a value in the file meta by another of the same padded length (pydicom
    refuses to write inconsistent file meta, senders do not)."""
    raw = path.read_bytes()
    old_b = old.encode() + (b"\x00" if len(old) % 2 else b"")
    new_b = new.encode() + (b"\x00" if len(new) % 2 else b"")
    assert len(old_b) == len(new_b)
    meta_end = len(raw) - len(dataset_bytes(path))
    at = raw.index(old_b, 132)
    assert at < meta_end
    path.write_bytes(raw[:at] + new_b + raw[at + len(old_b) :])
    return path


@pytest.mark.fast
def test_invalid_transfer_syntax_uid_is_refused(archive: Archive, tmp_path: Path):
    path = write(ct_slice(), tmp_path / "in.dcm")
    patch_meta(path, ExplicitVRLittleEndian, "../../../../etc/pass")
    with pytest.raises(InvalidUID):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
def test_meta_naming_another_instance_is_refused(archive: Archive, tmp_path: Path):
    ds = ct_slice()
    path = write(ds, tmp_path / "in.dcm")
    sop = ds.SOPInstanceUID
    other = sop[:-1] + ("1" if sop[-1] != "1" else "2")
    patch_meta(path, sop, other)
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == other
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
def test_dicomdir_is_not_a_storage_sop_class(archive: Archive):
    with pytest.raises(NotStorageSOPClass):
        archive.ingest_file(Path(get_testdata_file("DICOMDIR")), SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR)
        "1.2.840.10008.1.1",  # Verification
        "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Query/Retrieve FIND
        "1.2.3.4.5",  # unknown
    ],
)
def test_non_storage_sop_class_is_refused(archive: Archive, tmp_path: Path, sop_class: str):
    ds = ct_slice()
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    with pytest.raises(NotStorageSOPClass):
        archive.ingest_file(write(ds, tmp_path / "in.dcm"), SOURCE)
    assert_nothing_stored(archive)


# -- truncated and garbage files ------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize(
    "name",
    ["MR_truncated.dcm", "rtplan_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"],
)
def test_pydicom_truncated_files_are_refused(archive: Archive, name: str):
    path = get_testdata_file(name)
    if path is None:
        missing(f"{name} not available (pydicom-data not installed)")
    with pytest.raises(InvalidDataset) as info:
        archive.ingest_file(Path(path), SOURCE)
    assert "truncat" in str(info.value) or "past the end" in str(info.value)
    assert_nothing_stored(archive)


def _cut_points(path: Path) -> dict[str, int]:
    from gateway.archive.part10 import read_layout

    raw = path.read_bytes()
    with open(path, "rb") as fh:
        layout = read_layout(fh, len(raw))
    start = layout.dataset_offset
    return {
        "in file meta": 150,
        "in first element header": start + 3,
        "in first element value": start + 10,
        "in pixel data header": layout.pixel_offset - 6,
        "in pixel data": layout.pixel_offset + 100,
        "last byte missing": len(raw) - 1,
    }


@pytest.mark.fast
@pytest.mark.parametrize(
    "where",
    [
        "in file meta",
        "in first element header",
        "in first element value",
        "in pixel data header",
        "in pixel data",
        "last byte missing",
    ],
)
def test_truncated_native_file_is_refused(archive: Archive, tmp_path: Path, where: str):
    whole = write(ct_slice(), tmp_path / "whole.dcm")
    cut = _cut_points(whole)[where]
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
@pytest.mark.parametrize("drop", [1, 4, 8, 100, 2000])
def test_truncated_encapsulated_file_is_refused(archive: Archive, tmp_path: Path, drop: int):
    raw = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[:-drop])
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
@pytest.mark.parametrize("drop", [9, 50, 2000])
def test_truncated_deflated_file_is_refused(archive: Archive, tmp_path: Path, drop: int):
    # image_dfl.dcm has 8 bytes after the end of its deflate stream: cut more than that.
    raw = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[:-drop])
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


GARBAGE = {
    "empty": b"",
    "one byte": b"\x00",
    "zeros": b"\x00" * 4096,
    "random": os.urandom(8192),
    "text": b"Patient: DOE^JANE\nThis is a report, not DICOM.\n" * 40,
    "png": b"\x89PNG\r\n\x1a\n" + os.urandom(500),
    "preamble only": b"\x00" * 128 + b"DICM",
    "preamble and garbage": b"\x00" * 128 + b"DICM" + os.urandom(1000),
    "meta then garbage": None,  # filled in by the test
    "zip": b"PK\x03\x04" + os.urandom(300),
}


@pytest.mark.fast
@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_is_refused(archive: Archive, tmp_path: Path, kind: str):
    data = GARBAGE[kind]
    if data is None:
        whole = write(ct_slice(), tmp_path / "whole.dcm").read_bytes()
        meta_len = len(whole) - len(dataset_bytes(tmp_path / "whole.dcm"))
        data = whole[:meta_len] + os.urandom(4000)
    path = tmp_path / "garbage.dcm"
    path.write_bytes(data)
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
def test_missing_file_is_an_invalid_dataset_not_a_crash(archive: Archive, tmp_path: Path):
    with pytest.raises(InvalidDataset):
        archive.ingest_file(tmp_path / "nope.dcm", SOURCE)
    with pytest.raises(InvalidDataset):
        archive.ingest_file(tmp_path, SOURCE)  # a directory


@pytest.mark.fast
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-length", "defined-length"])
def test_deeply_nested_sequences_are_refused(
    archive: Archive, tmp_path: Path, explicit: bool, undefined: bool
):
    ts = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    base = write_ts(ct_slice(), tmp_path / "base.dcm", ts)
    path = with_inserted_before_pixels(
        base, nested_sequence(200, explicit=explicit, undefined=undefined), tmp_path / "deep.dcm"
    )
    with pytest.raises(InvalidDataset) as info:
        archive.ingest_file(path, SOURCE)
    assert "nest" in str(info.value)
    assert_nothing_stored(archive)


@pytest.mark.fast
def test_deeply_nested_deflated_data_set_is_refused(archive: Archive, tmp_path: Path):
    base = write_ts(ct_slice(), tmp_path / "base.dcm", ExplicitVRLittleEndian)
    deep = with_inserted_before_pixels(base, nested_sequence(200), tmp_path / "deep.dcm")
    raw = deep.read_bytes()
    data = dataset_bytes(deep)
    meta_end = len(raw) - len(data)
    # Re-wrap with a deflated transfer syntax: new meta, then the zlib-compressed data set.
    ds = ct_slice()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    meta = ds.file_meta
    meta.MediaStorageSOPInstanceUID = pydicom.dcmread(base).SOPInstanceUID
    write_file_meta_info(buf, meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    buf.write(compressor.compress(raw[meta_end:]) + compressor.flush())
    path = tmp_path / "deep_dfl.dcm"
    path.write_bytes(buf.getvalue())
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


@pytest.mark.fast
def test_moderately_nested_sequences_are_fine(archive: Archive, tmp_path: Path):
    base = write(ct_slice(), tmp_path / "base.dcm")
    path = with_inserted_before_pixels(base, nested_sequence(8), tmp_path / "nested.dcm")
    assert archive.ingest_file(path, SOURCE).outcome is Outcome.STORED
    row = instances(archive)[0]
    assert blob_bytes(archive, row.blob_key)[row.dataset_offset :] == dataset_bytes(path)


# -- storage failures ------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.file_store
def test_blob_store_replaced_by_a_file_is_storage_unavailable(archive: Archive, tmp_path: Path):
    """Permissions cannot be used to make the store unwritable: the tests run as root, which
    ignores them. A regular file where the store's root folder should be makes every write
    fail (ENOTDIR/EEXIST) for root too."""
    root = archive.settings.resolved_blob_dir
    shutil.rmtree(root)
    root.write_bytes(b"not a folder")
    path = write(ct_slice(), tmp_path / "a.dcm")
    with pytest.raises(StorageUnavailable) as info:
        archive.ingest_file(path, SOURCE)
    assert info.value.retryable
    assert count(archive, Instance) == 0
    assert path.exists()
    # Once the store is back, the same file goes in.
    root.unlink()
    root.mkdir()
    assert archive.ingest_file(path, SOURCE).outcome is Outcome.STORED


@pytest.mark.fast
@pytest.mark.file_store
@pytest.mark.parametrize("bare_input", [False, True], ids=["part10", "bare"])
def test_full_blob_store_is_storage_unavailable_and_leaves_no_partial_file(
    archive: Archive, tmp_path: Path, bare_input: bool
):
    """A full disk, simulated honestly for root: RLIMIT_FSIZE makes the kernel refuse to
    write a file past the limit (EFBIG, with SIGXFSZ ignored), and root is not exempt.
    chmod does not stop root, and no tmpfs can be mounted here.

    A Part 10 file is copied into the store (not owned); a bare data set is first written
    to the staging folder with a file meta header: both writes must fail cleanly."""
    ds = ct_slice(rows=256, columns=256)  # 128 KiB of pixels
    if bare_input:
        path = bare(ds, tmp_path / "big.dcm", implicit_vr=True)
    else:
        path = write(ds, tmp_path / "big.dcm")
    original = path.read_bytes()
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(StorageUnavailable) as info:
            archive.ingest_file(path, SOURCE)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert info.value.retryable
    assert "full" in str(info.value)
    assert_nothing_stored(archive)
    assert all_files(archive.settings.resolved_blob_dir) == []  # no partial copy
    assert path.read_bytes() == original  # the sender's data is not lost
    assert archive.ingest_file(path, SOURCE).outcome is Outcome.STORED


# -- data sets without file meta ------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize(
    ("implicit", "little", "ts"),
    [
        (True, True, ImplicitVRLittleEndian),
        (False, True, ExplicitVRLittleEndian),
        (False, False, ExplicitVRBigEndian),
    ],
)
def test_bare_data_set_is_wrapped_and_stored(
    archive: Archive, tmp_path: Path, implicit: bool, little: bool, ts: str
):
    ds = ct_slice()
    path = bare(ds, tmp_path / "bare.dcm", implicit_vr=implicit, little_endian=little)
    original = path.read_bytes()

    result = archive.ingest_file(path, SOURCE)

    assert result.outcome is Outcome.STORED
    assert result.transfer_syntax == ts
    row = instance(archive, ds.SOPInstanceUID)
    blob = blob_bytes(archive, row.blob_key)
    assert blob[128:132] == b"DICM"
    assert blob[row.dataset_offset :] == original
    assert row.sha256 == sha256(original) and row.size == len(original)
    stored = read_blob(archive, row.blob_key)
    assert stored.file_meta.TransferSyntaxUID == ts
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert stored.PixelData == ds.PixelData
    assert all_files(archive.settings.staging_dir) == []
    assert path.read_bytes() == original


@pytest.mark.fast
@pytest.mark.parametrize("name", ["ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"])
def test_pydicom_files_without_meta_are_wrapped(archive: Archive, name: str):
    path = Path(get_testdata_file(name))
    original = path.read_bytes()
    result = archive.ingest_file(path, SOURCE)
    assert result.outcome is Outcome.STORED
    row = instances(archive)[0]
    assert blob_bytes(archive, row.blob_key)[row.dataset_offset :] == original
    expected = pydicom.dcmread(path, force=True)
    stored = read_blob(archive, row.blob_key)
    assert stored.SOPInstanceUID == expected.SOPInstanceUID
    assert stored.Modality == expected.Modality
    assert len(stored) == len(expected)


@pytest.mark.fast
def test_ct_small_without_meta_is_wrapped(archive: Archive, tmp_path: Path):
    """What pydicom's no_meta.dcm means to be: CT_small.dcm's data set without file meta.

    no_meta.dcm itself starts one byte early (a stray 0x20 from the end of the meta group
    precedes the first element), so even pydicom reads it as one garbage element; it is
    refused (see the next test)."""
    path = strip_meta(Path(get_testdata_file("CT_small.dcm")), tmp_path / "no_meta.dcm")
    result = archive.ingest_file(path, SOURCE)
    assert result.outcome is Outcome.STORED
    assert result.transfer_syntax == ExplicitVRLittleEndian
    row = instances(archive)[0]
    assert blob_bytes(archive, row.blob_key)[row.dataset_offset :] == path.read_bytes()


@pytest.mark.fast
def test_pydicom_no_meta_file_is_refused_cleanly(archive: Archive):
    with pytest.raises(InvalidDataset):
        archive.ingest_file(Path(get_testdata_file("no_meta.dcm")), SOURCE)
    assert_nothing_stored(archive)


# -- real files in many transfer syntaxes -----------------------------------------------------
REAL_FILES = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("SC_rgb_rle_2frame.dcm", "1.2.840.10008.1.2.5"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "1.2.840.10008.1.2.4.91"),
    ("UN_sequence.dcm", None),  # refused: no SOP Class UID, but parsed without trouble
    ("waveform_ecg.dcm", "1.2.840.10008.1.2.1"),
    ("rtstruct.dcm", "1.2.840.10008.1.2"),
]


@pytest.mark.fast
@pytest.mark.parametrize(("name", "ts"), REAL_FILES)
def test_real_files_are_stored_byte_identical(archive: Archive, name: str, ts: str | None):
    path = Path(get_testdata_file(name))
    if ts is None:
        with pytest.raises(MissingAttribute):
            archive.ingest_file(path, SOURCE)
        return
    result = archive.ingest_file(path, SOURCE)
    assert result.outcome is Outcome.STORED
    assert result.transfer_syntax == ts
    row = instances(archive)[0]
    assert row.transfer_syntax_uid == ts
    blob = blob_bytes(archive, row.blob_key)
    assert blob[row.dataset_offset :] == dataset_bytes(path)
    assert row.sha256 == sha256(dataset_bytes(path))
    original = pydicom.dcmread(path, force=True)
    assert row.number_of_frames == (
        int(original.NumberOfFrames) if "NumberOfFrames" in original else None
    )
    if path.read_bytes()[128:132] == b"DICM":
        assert blob == path.read_bytes()  # Part 10 input is stored whole, meta included


@pytest.mark.fast
def test_archive_errors_say_whether_to_retry():
    assert StorageUnavailable.retryable
    for cls in (InvalidDataset, InvalidUID, MissingAttribute, InstanceConflict, PatientMismatch):
        assert issubclass(cls, ArchiveError) and not cls.retryable


@pytest.mark.fast
@pytest.mark.parametrize(
    ("declared", "written_implicit"),
    [(ExplicitVRLittleEndian, True), (ImplicitVRLittleEndian, False)],
)
def test_data_set_not_in_its_declared_vr_encoding_is_refused(
    archive: Archive, tmp_path: Path, declared: str, written_implicit: bool
):
    ds = ct_slice()
    ds.file_meta.TransferSyntaxUID = declared
    declared_file = write(ds, tmp_path / "declared.dcm")
    raw = declared_file.read_bytes()
    offset = len(raw) - len(dataset_bytes(declared_file))
    other = bare(ds, tmp_path / "bare.dcm", implicit_vr=written_implicit).read_bytes()
    path = tmp_path / "in.dcm"
    path.write_bytes(raw[:offset] + other)
    with pytest.raises(InvalidDataset):
        archive.ingest_file(path, SOURCE)
    assert_nothing_stored(archive)


def _hold_group_commit(archive: Archive) -> tuple[threading.Thread, threading.Event]:
    """Keep the index's grouped-write transaction busy until the event is set: ingests
    started meanwhile queue behind it and are settled (their blobs flushed) together."""
    started, release = threading.Event(), threading.Event()

    def hold(_conn: object) -> None:
        started.set()
        release.wait(20)

    thread = threading.Thread(target=archive.db.write_grouped, args=(hold,))
    thread.start()
    assert started.wait(10)
    return thread, release


def _ingest_in_threads(archive: Archive, paths: list[Path]) -> tuple[list[threading.Thread], dict]:
    outcomes: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            outcomes[i] = archive.ingest_file(paths[i], SOURCE, owned=True)
        except Exception as exc:  # asserted by the caller
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    return threads, outcomes


@pytest.mark.file_store
def test_failed_blob_flushes_fail_their_instances_and_index_none(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from gateway.archive import blobstore
    from gateway.dimse.status import store_failure_status

    store = archive.store
    rounds: list[int] = []
    sync = type(store).sync

    def failing_sync(self: object, placed: list) -> None:
        rounds.append(len(placed))
        sync(self, placed)

    def eio(_path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(type(store), "sync", failing_sync)
    monkeypatch.setattr(blobstore, "_fsync_path", eio)
    study, series = uid(), uid()
    paths = [
        write(ct_slice(study_uid=study, series_uid=series), tmp_path / f"{i}.dcm") for i in range(3)
    ]
    holder, release = _hold_group_commit(archive)
    threads, outcomes = _ingest_in_threads(archive, paths)
    deadline = time.monotonic() + 10
    while len(outcomes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [holder, *threads]:
        t.join(20)

    # Each flushed (and failed) by its own thread while the held transaction ran.
    assert rounds == [1, 1, 1]
    assert all(isinstance(outcomes[i], StorageUnavailable) for i in range(3)), outcomes
    # A retryable failure for the sender (Out of Resources).
    assert {store_failure_status(outcomes[i])[0] >> 8 for i in range(3)} == {0xA7}
    assert instances(archive) == []  # no row points at a blob that was not flushed

    monkeypatch.undo()
    again = [
        write(ct_slice(study_uid=study, series_uid=series), tmp_path / f"again{i}.dcm")
        for i in range(3)
    ]
    assert all(archive.ingest_file(p, SOURCE).outcome is Outcome.STORED for p in again)
    assert len(instances(archive)) == 3


@pytest.mark.file_store
def test_success_is_not_reported_before_the_blob_is_flushed(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from gateway.archive import blobstore

    entered, release = threading.Event(), threading.Event()
    order: list[str] = []
    fsync_file = blobstore._fsync_path

    def slow_fsync(path: Path) -> None:
        if path.name.endswith(".dcm"):
            entered.set()
            release.wait(20)
            order.append("blob flushed")
        fsync_file(path)

    monkeypatch.setattr(blobstore, "_fsync_path", slow_fsync)
    grouped = archive.db._grouped_engine.engine  # ingest's index writes (SQLite: their own)
    event.listen(grouped, "commit", lambda _conn: order.append("index commit"))
    path = write(ct_slice(), tmp_path / "a.dcm")
    threads, outcomes = _ingest_in_threads(archive, [path])
    try:
        assert entered.wait(10), "the blob was never flushed"
        time.sleep(0.2)
        # Waiting for the flush: not answered, nothing indexed.
        assert threads[0].is_alive() and outcomes == {}
        assert instances(archive) == []
    finally:
        release.set()
        threads[0].join(20)
    assert outcomes[0].outcome is Outcome.STORED
    assert order == ["blob flushed", "index commit"]
    assert len(instances(archive)) == 1
