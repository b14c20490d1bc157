"""The query engine (C-FIND and QIDO-RS): matching rules of PS3.4 C.2.2.2 on both backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from gateway.archive import Archive, Level, Query
from gateway.archive.errors import InvalidQuery
from gateway.archive.models import Study
from gateway.archive.query import QueryResult
from tests.factories import ct_slice, uid, write
from tests.gateway.archive.helpers import SOURCE

pytestmark = [
    pytest.mark.fast,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.production,
]


@dataclass
class World:
    """What ``populate`` put in the archive, by nickname."""

    studies: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    sops: dict[str, list[str]] = field(default_factory=dict)


STUDIES = [
    # nickname, patient id, name, date, time, accession, charset, [(series nickname, modality,
    #   series time, instances)]
    (
        "jane",
        "P1",
        "DOE^JANE",
        "20240115",
        "101500",
        "ACC001",
        None,
        [("jane-ct", "CT", "101600", 2), ("jane-mr", "MR", "103000.250", 1)],
    ),
    (
        "john",
        "P2",
        "DOE^JOHN",
        "20240201",
        "083000",
        "ACC002",
        None,
        [("john-mr", "MR", "0830", 3)],
    ),
    (
        "hans",
        "P3",
        "Müller^Hans",
        "20231231",
        "235959.5",
        "ACC003",
        "ISO_IR 100",
        [("hans-us", "US", "235959", 1)],
    ),
    (
        "tarou",
        "P4",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "",
        "",
        "ACC004",
        "ISO_IR 192",
        [("tarou-ct", "CT", "", 1)],
    ),
    ("anna", "P5", "smith^anna", "20240115", "1015", "acc001", None, [("anna-cr", "CR", "12", 1)]),
]


def populate(archive: Archive, tmp_path: Path) -> World:
    world = World()
    n = 0
    for nick, pid, name, date, time, acc, charset, series_list in STUDIES:
        study_uid = uid()
        world.studies[nick] = study_uid
        for number, (snick, modality, stime, count) in enumerate(series_list, start=1):
            series_uid = uid()
            world.series[snick] = series_uid
            world.sops[snick] = []
            for i in range(1, count + 1):
                ds = ct_slice(
                    patient_id=pid,
                    patient_name=name,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    instance_number=i,
                    study_date=date,
                    study_time=time,
                    accession=acc,
                    modality=modality,
                    series_number=number,
                    charset=charset,
                    rows=8,
                    columns=8,
                )
                ds.SeriesTime = stime
                ds.SeriesDate = date
                if modality == "MR":
                    ds.SOPClassUID = MRImageStorage
                    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
                n += 1
                archive.ingest_file(write(ds, tmp_path / "in" / f"{n}.dcm"), SOURCE)
                world.sops[snick].append(ds.SOPInstanceUID)
    return world


@pytest.fixture
def world(archive: Archive, tmp_path: Path) -> World:
    return populate(archive, tmp_path)


def find(archive: Archive, level: Level | str, keys: dict[str, str], **kw) -> QueryResult:
    return archive.query(Query(level=Level(level), keys=keys, **kw))


def studies(archive: Archive, world: World, **keys: str) -> set[str]:
    """Nicknames of the studies a STUDY level query finds."""
    result = find(archive, "STUDY", keys)
    by_uid = {v: k for k, v in world.studies.items()}
    return {by_uid[ds.StudyInstanceUID] for ds in result.datasets}


# -- levels -----------------------------------------------------------------------------------
def test_patient_level_needs_patient_root(archive: Archive, world: World):
    with pytest.raises(InvalidQuery):
        find(archive, "PATIENT", {"PatientName": ""})
    with pytest.raises(InvalidQuery):
        find(archive, "PATIENT", {})
    result = find(archive, "PATIENT", {"PatientName": "DOE*"}, patient_root=True)
    assert sorted(ds.PatientID for ds in result.datasets) == ["P1", "P2"]
    assert {str(ds.PatientName) for ds in result.datasets} == {"DOE^JANE", "DOE^JOHN"}
    assert all(ds.QueryRetrieveLevel == "PATIENT" for ds in result.datasets)


def test_patient_root_study_level_returns_patient_id(archive: Archive, world: World):
    result = find(archive, "STUDY", {"PatientID": "P2"}, patient_root=True)
    [ds] = result.datasets
    assert ds.PatientID == "P2" and ds.StudyInstanceUID == world.studies["john"]


def test_study_level_returns_requested_attributes(archive: Archive, world: World):
    result = find(
        archive,
        "STUDY",
        {
            "StudyInstanceUID": world.studies["jane"],
            "PatientName": "",
            "PatientID": "",
            "StudyDate": "",
            "StudyTime": "",
            "AccessionNumber": "",
            "StudyDescription": "",
            "ReferringPhysicianName": "",
            "PatientBirthDate": "",
        },
    )
    [ds] = result.datasets
    assert ds.QueryRetrieveLevel == "STUDY"
    assert str(ds.PatientName) == "DOE^JANE" and ds.PatientID == "P1"
    assert (ds.StudyDate, ds.StudyTime, ds.AccessionNumber) == ("20240115", "101500", "ACC001")
    assert ds.StudyDescription == "CT HEAD"
    assert str(ds.ReferringPhysicianName) == "REF^DOC"
    assert ds.PatientBirthDate == "19700101"


def test_series_level(archive: Archive, world: World):
    result = find(
        archive,
        "SERIES",
        {"StudyInstanceUID": world.studies["jane"], "Modality": "", "SeriesNumber": ""},
    )
    got = {ds.SeriesInstanceUID: (ds.Modality, ds.SeriesNumber) for ds in result.datasets}
    assert got == {world.series["jane-ct"]: ("CT", 1), world.series["jane-mr"]: ("MR", 2)}
    assert all(ds.StudyInstanceUID == world.studies["jane"] for ds in result.datasets)


def test_image_level(archive: Archive, world: World):
    result = find(
        archive,
        "IMAGE",
        {
            "SeriesInstanceUID": world.series["jane-ct"],
            "InstanceNumber": "",
            "SOPClassUID": "",
            "Rows": "",
            "AvailableTransferSyntaxUID": "",
        },
    )
    assert [ds.SOPInstanceUID for ds in result.datasets] == world.sops["jane-ct"]
    assert [ds.InstanceNumber for ds in result.datasets] == [1, 2]
    assert {ds.SOPClassUID for ds in result.datasets} == {CTImageStorage}
    assert {ds.Rows for ds in result.datasets} == {8}
    assert {ds.AvailableTransferSyntaxUID for ds in result.datasets} == {"1.2.840.10008.1.2.1"}
    # Unique keys of the levels above are returned too.
    assert all(ds.StudyInstanceUID == world.studies["jane"] for ds in result.datasets)
    assert all(ds.SeriesInstanceUID == world.series["jane-ct"] for ds in result.datasets)


def test_image_level_by_sop_class(archive: Archive, world: World):
    result = find(archive, "IMAGE", {"SOPClassUID": MRImageStorage})
    assert sorted(ds.SOPInstanceUID for ds in result.datasets) == sorted(
        world.sops["jane-mr"] + world.sops["john-mr"]
    )


# -- single value, wildcards, universal ----------------------------------------------------------
def test_single_value_matching_is_case_sensitive_for_strings(archive: Archive, world: World):
    assert studies(archive, world, AccessionNumber="ACC001") == {"jane"}
    assert studies(archive, world, AccessionNumber="acc001") == {"anna"}
    assert studies(archive, world, AccessionNumber="ACC00") == set()


def test_wildcards(archive: Archive, world: World):
    assert studies(archive, world, AccessionNumber="ACC*") == {"jane", "john", "hans", "tarou"}
    assert studies(archive, world, AccessionNumber="ACC00?") == {"jane", "john", "hans", "tarou"}
    assert studies(archive, world, AccessionNumber="?CC002") == {"john"}
    assert studies(archive, world, AccessionNumber="*2") == {"john"}
    assert studies(archive, world, AccessionNumber="A*0*3") == {"hans"}
    assert studies(archive, world, AccessionNumber="ACC0?") == set()


def test_sql_wildcard_characters_are_literals(archive: Archive, world: World):
    assert studies(archive, world, AccessionNumber="ACC%") == set()
    assert studies(archive, world, AccessionNumber="ACC_01") == set()
    assert studies(archive, world, AccessionNumber="%") == set()


def test_universal_matching(archive: Archive, world: World):
    everything = set(world.studies)
    assert studies(archive, world) == everything
    assert studies(archive, world, AccessionNumber="") == everything
    assert studies(archive, world, AccessionNumber="*") == everything
    assert studies(archive, world, PatientName="*") == everything
    assert studies(archive, world, StudyDate="") == everything  # includes the empty date
    assert studies(archive, world, StudyInstanceUID="") == everything
    assert studies(archive, world, StudyInstanceUID="*") == everything


def test_empty_return_keys_are_present_without_value(archive: Archive, world: World):
    [ds] = find(
        archive, "STUDY", {"StudyInstanceUID": world.studies["tarou"], "StudyDate": ""}
    ).datasets
    assert "StudyDate" in ds and ds.StudyDate in (None, "")


# -- UID lists ------------------------------------------------------------------------------------
def test_uid_list_matching(archive: Archive, world: World):
    both = f"{world.studies['jane']}\\{world.studies['hans']}"
    assert studies(archive, world, StudyInstanceUID=both) == {"jane", "hans"}
    assert studies(archive, world, StudyInstanceUID=world.studies["john"]) == {"john"}
    assert studies(archive, world, StudyInstanceUID="1.2.3.4") == set()


@pytest.mark.parametrize("bad", ["1.2..3", "../../x", "1.2.3.*", "1.2.abc", "1." + "2" * 63])
def test_invalid_uid_in_a_query_is_refused(archive: Archive, world: World, bad: str):
    with pytest.raises(InvalidQuery):
        studies(archive, world, StudyInstanceUID=bad)
    with pytest.raises(InvalidQuery):
        studies(archive, world, StudyInstanceUID=f"{world.studies['jane']}\\{bad}")


# -- dates and times ------------------------------------------------------------------------------
def test_date_matching(archive: Archive, world: World):
    assert studies(archive, world, StudyDate="20240115") == {"jane", "anna"}
    assert studies(archive, world, StudyDate="20240101-20240131") == {"jane", "anna"}
    assert studies(archive, world, StudyDate="20240115-20240201") == {"jane", "anna", "john"}
    assert studies(archive, world, StudyDate="20240116-") == {"john"}
    assert studies(archive, world, StudyDate="-20231231") == {"hans"}
    assert studies(archive, world, StudyDate="-20240114") == {"hans"}
    assert studies(archive, world, StudyDate="19000101-") == {"jane", "john", "hans", "anna"}
    # The retired form YYYY.MM.DD is accepted.
    assert studies(archive, world, StudyDate="2024.01.15") == {"jane", "anna"}


@pytest.mark.parametrize(
    "bad",
    ["20240131-20240101", "-", "2024-01-01", "2024011", "20240115-2024", "yesterday", "1-2-3"],
)
def test_bad_date_range_is_refused(archive: Archive, world: World, bad: str):
    with pytest.raises(InvalidQuery):
        studies(archive, world, StudyDate=bad)


def test_time_matching(archive: Archive, world: World):
    # Stored: jane 101500, john 083000, hans 235959.5, anna 1015 (= 10:15:00), tarou empty.
    assert studies(archive, world, StudyTime="101500") == {"jane", "anna"}
    assert studies(archive, world, StudyTime="1000-1100") == {"jane", "anna"}
    assert studies(archive, world, StudyTime="-1015") == {"john", "jane", "anna"}
    assert studies(archive, world, StudyTime="-10") == {"john", "jane", "anna"}
    assert studies(archive, world, StudyTime="101501-") == {"hans"}
    assert studies(archive, world, StudyTime="235959.4-235959.6") == {"hans"}
    assert studies(archive, world, StudyTime="08:30:00") == {"john"}


@pytest.mark.parametrize("bad", ["1100-1000", "25", "1", "10-11-12", "ab", "101500.1234567"])
def test_bad_time_is_refused(archive: Archive, world: World, bad: str):
    with pytest.raises(InvalidQuery):
        studies(archive, world, StudyTime=bad)


def test_series_time_range(archive: Archive, world: World):
    """Series times are stored in several TM forms: ranges compare them as times."""

    def series(**keys: str) -> set[str]:
        result = find(archive, "SERIES", keys)
        by_uid = {v: k for k, v in world.series.items()}
        return {by_uid[ds.SeriesInstanceUID] for ds in result.datasets}

    # Stored: 101600, 103000.250, 0830, 235959, '' and 12.
    assert series(SeriesTime="1000-1100") == {"jane-ct", "jane-mr"}
    assert series(SeriesTime="-0830") == {"john-mr"}
    assert series(SeriesTime="-08") == {"john-mr"}
    assert series(SeriesTime="1030-") == {"jane-mr", "hans-us", "anna-cr"}
    assert series(SeriesTime="12-12") == {"anna-cr"}
    assert series(SeriesTime="083000") == {"john-mr"}


# -- numbers, modalities and computed attributes -----------------------------------------------
def test_integer_matching(archive: Archive, world: World):
    result = find(
        archive, "SERIES", {"StudyInstanceUID": world.studies["jane"], "SeriesNumber": "2"}
    )
    assert [ds.SeriesInstanceUID for ds in result.datasets] == [world.series["jane-mr"]]
    with pytest.raises(InvalidQuery):
        find(archive, "SERIES", {"SeriesNumber": "two"})


def test_modality_at_series_level(archive: Archive, world: World):
    result = find(archive, "SERIES", {"Modality": "MR"})
    assert {ds.SeriesInstanceUID for ds in result.datasets} == {
        world.series["jane-mr"],
        world.series["john-mr"],
    }


def test_modalities_in_study(archive: Archive, world: World):
    assert studies(archive, world, ModalitiesInStudy="MR") == {"jane", "john"}
    assert studies(archive, world, ModalitiesInStudy="CT") == {"jane", "tarou"}
    assert studies(archive, world, ModalitiesInStudy="US\\CR") == {"hans", "anna"}
    assert studies(archive, world, ModalitiesInStudy="XA") == set()
    assert studies(archive, world, ModalitiesInStudy="C?") == {"jane", "tarou", "anna"}
    [ds] = find(
        archive, "STUDY", {"StudyInstanceUID": world.studies["jane"], "ModalitiesInStudy": ""}
    ).datasets
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]


def test_modalities_in_study_below_the_study_level(archive: Archive, world: World):
    """A study-level key at the SERIES level filters the series of matching studies."""
    result = find(archive, "SERIES", {"ModalitiesInStudy": "MR", "Modality": "CT"})
    assert [ds.SeriesInstanceUID for ds in result.datasets] == [world.series["jane-ct"]]
    result = find(archive, "IMAGE", {"ModalitiesInStudy": "US"})
    assert [ds.SOPInstanceUID for ds in result.datasets] == world.sops["hans-us"]


def test_computed_counts(archive: Archive, world: World):
    result = find(
        archive,
        "STUDY",
        {
            "StudyInstanceUID": f"{world.studies['jane']}\\{world.studies['john']}",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
            "SOPClassesInStudy": "",
        },
    )
    got = {
        ds.StudyInstanceUID: (ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances)
        for ds in result.datasets
    }
    assert got == {world.studies["jane"]: (2, 3), world.studies["john"]: (1, 3)}
    jane = next(ds for ds in result.datasets if ds.StudyInstanceUID == world.studies["jane"])
    assert sorted(jane.SOPClassesInStudy) == sorted([CTImageStorage, MRImageStorage])

    result = find(
        archive,
        "SERIES",
        {"StudyInstanceUID": world.studies["jane"], "NumberOfSeriesRelatedInstances": ""},
    )
    assert {ds.SeriesInstanceUID: ds.NumberOfSeriesRelatedInstances for ds in result.datasets} == {
        world.series["jane-ct"]: 2,
        world.series["jane-mr"]: 1,
    }

    result = find(
        archive,
        "PATIENT",
        {
            "PatientID": "P1",
            "NumberOfPatientRelatedStudies": "",
            "NumberOfPatientRelatedSeries": "",
            "NumberOfPatientRelatedInstances": "",
        },
        patient_root=True,
    )
    [ds] = result.datasets
    assert (
        ds.NumberOfPatientRelatedStudies,
        ds.NumberOfPatientRelatedSeries,
        ds.NumberOfPatientRelatedInstances,
    ) == (1, 2, 3)


def test_computed_counts_of_a_higher_level(archive: Archive, world: World):
    """Study counts asked at the SERIES level are the study's, not zero."""
    result = find(
        archive,
        "SERIES",
        {
            "StudyInstanceUID": world.studies["jane"],
            "NumberOfStudyRelatedInstances": "",
            "ModalitiesInStudy": "",
        },
    )
    assert len(result.datasets) == 2
    for ds in result.datasets:
        assert ds.NumberOfStudyRelatedInstances == 3
        assert list(ds.ModalitiesInStudy) == ["CT", "MR"]


def test_matching_on_a_count_is_refused(archive: Archive, world: World):
    with pytest.raises(InvalidQuery):
        studies(archive, world, NumberOfStudyRelatedInstances="3")


# -- paging --------------------------------------------------------------------------------------
def test_limit_and_offset(archive: Archive, world: World):
    everything = find(archive, "STUDY", {}).datasets
    assert len(everything) == 5
    seen = []
    offset = 0
    while True:
        page = find(archive, "STUDY", {}, limit=2, offset=offset)
        seen += [ds.StudyInstanceUID for ds in page.datasets]
        offset += 2
        if not page.truncated:
            break
        assert len(page.datasets) == 2
    assert seen == [ds.StudyInstanceUID for ds in everything]
    assert find(archive, "STUDY", {}, limit=5).truncated is False
    assert find(archive, "STUDY", {}, limit=4).truncated is True
    assert find(archive, "STUDY", {}, limit=10, offset=5).datasets == []
    assert find(archive, "STUDY", {}).truncated is False


def test_limit_applies_after_matching(archive: Archive, world: World):
    page = find(archive, "STUDY", {"AccessionNumber": "ACC*"}, limit=3)
    assert len(page.datasets) == 3 and page.truncated
    page = find(archive, "STUDY", {"AccessionNumber": "ACC*"}, limit=3, offset=3)
    assert len(page.datasets) == 1 and not page.truncated


# -- person names -------------------------------------------------------------------------------
def test_person_name_matching_is_case_insensitive(archive: Archive, world: World):
    assert studies(archive, world, PatientName="DOE^JANE") == {"jane"}
    assert studies(archive, world, PatientName="doe^jane") == {"jane"}
    assert studies(archive, world, PatientName="Doe*") == {"jane", "john"}
    assert studies(archive, world, PatientName="SMITH^ANNA") == {"anna"}
    assert studies(archive, world, PatientName="DOE") == set()  # single value: whole name
    assert studies(archive, world, PatientName="DOE^J???") == {"jane", "john"}
    assert studies(archive, world, PatientName="DOE^JANE^^^") == {"jane"}


def test_person_name_accents_are_folded(archive: Archive, world: World):
    assert studies(archive, world, PatientName="muller*") == {"hans"}
    assert studies(archive, world, PatientName="MÜLLER^HANS") == {"hans"}
    assert studies(archive, world, PatientName="Müller^Hans") == {"hans"}
    assert studies(archive, world, PatientName="M?LLER*") == {"hans"}
    [ds] = find(
        archive, "STUDY", {"StudyInstanceUID": world.studies["hans"], "PatientName": ""}
    ).datasets
    assert str(ds.PatientName) == "Müller^Hans"  # returned as received


def test_person_name_component_groups(archive: Archive, world: World):
    assert studies(archive, world, PatientName="Yamada^Tarou") == {"tarou"}
    assert studies(archive, world, PatientName="山田^太郎") == {"tarou"}
    assert studies(archive, world, PatientName="やまだ*") == {"tarou"}
    assert studies(archive, world, PatientName="=山田*") == {"tarou"}
    assert studies(archive, world, PatientName="==やまだ^たろう") == {"tarou"}
    assert studies(archive, world, PatientName="Yamada*=山田*") == {"tarou"}
    # Groups must match in their own place.
    assert studies(archive, world, PatientName="山田*=") == set()
    assert studies(archive, world, PatientName="Yamada*=Tanaka*") == set()
    assert studies(archive, world, PatientName="?田*") == {"tarou"}


def test_referring_physician_name(archive: Archive, world: World):
    assert studies(archive, world, ReferringPhysicianName="ref^doc") == set(world.studies)
    assert studies(archive, world, ReferringPhysicianName="NOBODY*") == set()


# -- levels, unknown keys and access scope --------------------------------------------------------
def test_strict_levels(archive: Archive, world: World):
    # A series-level key with a value in a STUDY query: refused when strict (QIDO) ...
    with pytest.raises(InvalidQuery):
        find(archive, "STUDY", {"Modality": "CT"})
    # ... ignored otherwise (C-FIND, PS3.4 C.4.1.2.1), and not returned.
    result = find(archive, "STUDY", {"Modality": "CT"}, strict_levels=False)
    assert len(result.datasets) == 5
    assert all("Modality" not in ds for ds in result.datasets)
    # Without a value the key is just not returned, strict or not.
    result = find(archive, "STUDY", {"Modality": ""})
    assert len(result.datasets) == 5 and all("Modality" not in ds for ds in result.datasets)


def test_unknown_keys(archive: Archive, world: World):
    with pytest.raises(InvalidQuery):
        find(archive, "STUDY", {"PatientWeight": "70"})
    result = find(archive, "STUDY", {"PatientWeight": "70"}, strict_levels=False)
    assert len(result.datasets) == 5
    result = find(archive, "STUDY", {"PatientWeight": ""})
    assert all("PatientWeight" in ds and ds.PatientWeight is None for ds in result.datasets)


def test_include_adds_return_attributes(archive: Archive, world: World):
    result = archive.query(
        Query(
            level=Level.STUDY,
            keys={"StudyInstanceUID": world.studies["john"]},
            include=["AccessionNumber", "NumberOfStudyRelatedInstances"],
        )
    )
    [ds] = result.datasets
    assert ds.AccessionNumber == "ACC002" and ds.NumberOfStudyRelatedInstances == 3


def test_study_scope_limits_every_level(archive: Archive, world: World):
    def scope():
        return Study.accession_number.in_(["ACC001", "ACC002"])

    result = archive.query(Query(level=Level.STUDY, study_scope=scope))
    assert {ds.StudyInstanceUID for ds in result.datasets} == {
        world.studies["jane"],
        world.studies["john"],
    }
    result = archive.query(Query(level=Level.PATIENT, patient_root=True, study_scope=scope))
    assert sorted(ds.PatientID for ds in result.datasets) == ["P1", "P2"]
    result = archive.query(Query(level=Level.IMAGE, study_scope=scope, limit=4))
    assert len(result.datasets) == 4 and result.truncated
    result = archive.query(Query(level=Level.IMAGE, study_scope=scope, limit=4, offset=4))
    assert len(result.datasets) == 2 and not result.truncated


def test_results_are_datasets_pydicom_can_encode(archive: Archive, world: World, tmp_path):
    """What a door will send: every returned value must have an encodable VR and value."""
    from pydicom.filewriter import dcmwrite

    result = find(
        archive,
        "STUDY",
        {
            "PatientName": "",
            "StudyDate": "",
            "NumberOfStudyRelatedInstances": "",
            "ModalitiesInStudy": "",
        },
    )
    for i, ds in enumerate(result.datasets):
        plain = Dataset()
        plain.update(ds)
        plain.SpecificCharacterSet = "ISO_IR 192"
        dcmwrite(tmp_path / f"{i}.dcm", plain, implicit_vr=True, little_endian=True)


def test_computed_attributes_of_a_large_unpaged_result(archive: Archive):
    """Counts are computed in chunks of ids; every row still gets its own count."""
    from sqlalchemy import insert

    from gateway.archive.models import Instance, Patient, Series, utcnow

    n = 2500
    now = utcnow()
    with archive.db.writing() as session:
        session.execute(
            insert(Patient),
            [
                {"id": i, "issuer": "X", "patient_id": f"P{i}", "created_at": now}
                for i in range(1, n + 1)
            ],
        )
        session.execute(
            insert(Study),
            [
                {"id": i, "study_uid": f"1.2.{i}", "patient_fk": i, "created_at": now}
                for i in range(1, n + 1)
            ],
        )
        session.execute(
            insert(Series),
            [
                {
                    "id": i,
                    "series_uid": f"1.3.{i}",
                    "study_fk": i,
                    "modality": "CT" if i % 2 else "MR",
                    "created_at": now,
                }
                for i in range(1, n + 1)
            ],
        )
        session.execute(
            insert(Instance),
            [
                {
                    "sop_uid": f"1.4.{i}.{k}",
                    "series_fk": i,
                    "sop_class_uid": CTImageStorage,
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "blob_key": f"k/{i}/{k}",
                    "dataset_offset": 0,
                    "size": 1,
                    "sha256": "0" * 64,
                    "received_at": now,
                }
                for i in range(1, n + 1)
                for k in range(i % 3 + 1)
            ],
        )
    result = archive.query(
        Query(
            level=Level.STUDY,
            keys={"NumberOfStudyRelatedInstances": "", "ModalitiesInStudy": ""},
        )
    )
    assert len(result.datasets) == n
    for ds in result.datasets:
        i = int(ds.StudyInstanceUID.rsplit(".", 1)[1])
        assert ds.NumberOfStudyRelatedInstances == i % 3 + 1
        assert ds.ModalitiesInStudy == ("CT" if i % 2 else "MR")


def test_modalities_in_study_with_other_keys(archive: Archive, world: World):
    """Beside another key, ModalitiesInStudy probes the studies that key selects."""
    assert studies(archive, world, ModalitiesInStudy="CT", StudyDate="20240101-20240131") == {
        "jane"
    }
    assert studies(archive, world, ModalitiesInStudy="MR", PatientID="P2") == {"john"}
    assert studies(archive, world, ModalitiesInStudy="C?", StudyDate="20240115") == {
        "jane",
        "anna",
    }
    assert studies(archive, world, ModalitiesInStudy="US", StudyDate="20240115") == set()
    result = find(archive, "SERIES", {"ModalitiesInStudy": "MR", "StudyDate": "20240115"})
    assert {ds.SeriesInstanceUID for ds in result.datasets} == {
        world.series["jane-ct"],
        world.series["jane-mr"],
    }


def _bulk_rows(archive: Archive, n: int) -> None:
    """``n`` studies of one series and one instance each, one per day from 2000-01-01."""
    import datetime as dt

    from sqlalchemy import insert

    from gateway.archive.models import Patient, Series, utcnow

    now = utcnow()
    day = dt.date(2000, 1, 1)
    with archive.db.writing() as session:
        session.execute(
            insert(Patient),
            [{"id": i, "issuer": "X", "patient_id": f"P{i}", "created_at": now} for i in range(n)],
        )
        session.execute(
            insert(Study),
            [
                {
                    "id": i,
                    "study_uid": f"1.2.{i}",
                    "patient_fk": i,
                    "study_date": (day + dt.timedelta(days=i)).strftime("%Y%m%d"),
                    "created_at": now,
                }
                for i in range(n)
            ],
        )
        session.execute(
            insert(Series),
            [
                {
                    "id": i,
                    "series_uid": f"1.3.{i}",
                    "study_fk": i,
                    "modality": ("CT", "MR", "CR", "US")[i % 4],
                    "created_at": now,
                }
                for i in range(n)
            ],
        )


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_date_and_modality_plan_without_statistics(archive: Archive):
    """PostgreSQL without statistics (a bulk load autovacuum has not yet seen) still
    finds date + modality matches from the date index, probing each study's series,
    instead of hashing every CT series of the archive first (73 ms at 100k studies)."""
    from sqlalchemy import event, text

    _bulk_rows(archive, 20_000)
    with archive.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            text(
                "DELETE FROM pg_statistic WHERE starelid IN "
                "('patients'::regclass, 'studies'::regclass, 'series'::regclass)"
            )
        )
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    event.listen(archive.db.engine, "before_cursor_execute", capture)
    try:
        result = archive.query(
            Query(
                level=Level.STUDY,
                keys={"StudyDate": "20200301-20200331", "ModalitiesInStudy": "CT"},
                limit=100,
            )
        )
    finally:
        event.remove(archive.db.engine, "before_cursor_execute", capture)
    # Days 7365..7395 after 2000-01-01; every fourth study is CT.
    assert len(result.rows) == len([i for i in range(7365, 7396) if i % 4 == 0])
    page, params = statements[0]
    with archive.db.engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute("EXPLAIN " + page, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "ix_studies_study_date" in plan, plan
    assert "SubPlan" in plan and "ix_series_study_fk_modality" in plan, plan
    assert "HashAggregate" not in plan and "Semi Join" not in plan, plan


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_analyze_keeps_its_statistics(archive: Archive):
    """Database.analyze() commits PostgreSQL's statistics (ANALYZE in a transaction
    that is rolled back throws them away, which the benchmark once did)."""
    from sqlalchemy import text

    _bulk_rows(archive, 500)
    count = "SELECT count(*) FROM pg_stats WHERE tablename = 'series' AND attname = 'modality'"
    with archive.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DELETE FROM pg_statistic WHERE starelid = 'series'::regclass"))
        assert conn.execute(text(count)).scalar_one() == 0
    assert archive.db.analyze() is True
    with archive.db.engine.connect() as conn:
        assert conn.execute(text(count)).scalar_one() == 1


def test_analyze_on_sqlite_does_nothing(tmp_path: Path):
    from gateway.archive.db import Database

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert db.analyze() is False
    finally:
        db.dispose()
