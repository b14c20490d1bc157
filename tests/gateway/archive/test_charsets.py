"""Character sets: real pydicom files indexed as Unicode and matched, and the character
set a C-FIND response goes out in (gateway.archive.charsets)."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.valuerep import PersonName

from gateway.archive import Archive, Level, Query
from gateway.archive.charsets import requested_terms, response_character_set
from gateway.archive.models import Patient
from gateway.archive.text import fold, split_pn
from tests.factories import ct_slice, write
from tests.gateway.archive.helpers import SOURCE

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.production]

CHARSET_FILES = {Path(p).name: Path(p) for p in get_charset_files() if p.endswith(".dcm")}
# Files that are valid storage instances with distinct SOP Instance UIDs.
INGESTIBLE = [
    "chrKoreanMulti.dcm",  # ['', 'ISO 2022 IR 149']  김희중
    "chrI2.dcm",  # ['', 'ISO 2022 IR 149']  Hong^Gildong=洪^吉洞=홍^길동
    "chrH31.dcm",  # ['', 'ISO 2022 IR 87']  Yamada^Tarou=山田^太郎=やまだ^たろう
    "chrH32.dcm",  # ['ISO 2022 IR 13', 'ISO 2022 IR 87']  ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう
    "chrX1.dcm",  # ISO_IR 192  Wang^XiaoDong=王^小東
    "chrX2.dcm",  # GB18030  Wang^XiaoDong=王^小东
    "chrGerm.dcm",  # ISO_IR 100  Äneas^Rüdiger
    "chrFren.dcm",  # ISO_IR 100  Buc^Jérôme
    "chrGreek.dcm",  # ISO_IR 126  Διονυσιος
    "chrRuss.dcm",  # ISO_IR 144
    "chrHbrw.dcm",  # ISO_IR 138
    "chrArab.dcm",  # ISO_IR 127
]


@pytest.fixture
def charset_archive(archive: Archive) -> Archive:
    for name in INGESTIBLE:
        assert archive.ingest_file(CHARSET_FILES[name], SOURCE).outcome == "stored"
    return archive


def names(archive: Archive, pattern: str) -> set[str]:
    result = archive.query(Query(level=Level.STUDY, keys={"PatientName": pattern}))
    return {str(ds.PatientName) for ds in result.datasets}


# -- indexing real files ---------------------------------------------------------------------
@pytest.mark.fast
def test_names_are_indexed_as_unicode(charset_archive: Archive):
    with charset_archive.db.reading() as session:
        stored = {
            row.patient_id: (row.patient_name, row.pn_ideographic, row.pn_phonetic)
            for row in session.query(Patient)
        }
    assert stored["I2EXAMPLE"] == ("Hong^Gildong=洪^吉洞=홍^길동", "洪^吉洞", "홍^길동")
    assert stored["H31EXAMPLE"] == (
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "山田^太郎",
        "やまだ^たろう",
    )
    assert stored["H32EXAMPLE"][0] == "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
    assert stored["X1EXAMPLE"][:2] == ("Wang^XiaoDong=王^小東", "王^小東")
    assert stored["X2EXAMPLE"][:2] == ("Wang^XiaoDong=王^小东", "王^小东")
    assert stored["SCSGERM"][0] == "Äneas^Rüdiger"
    assert stored["SCSFREN"][0] == "Buc^Jérôme"
    assert stored["SCSGREEK"][0] == "Διονυσιος"
    [korean] = [v for k, v in stored.items() if v[0] == "김희중"]
    assert korean


@pytest.mark.fast
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("김*", {"김희중"}),
        ("김희중", {"김희중"}),
        ("김?중", {"김희중"}),
        ("?희*", {"김희중"}),
        ("홍*", {"Hong^Gildong=洪^吉洞=홍^길동"}),
        ("홍^길동", {"Hong^Gildong=洪^吉洞=홍^길동"}),
        ("洪*", {"Hong^Gildong=洪^吉洞=홍^길동"}),
        ("==홍*", {"Hong^Gildong=洪^吉洞=홍^길동"}),
        ("=홍*", set()),  # Hangul is the phonetic group here, not the ideographic one
        ("hong*", {"Hong^Gildong=洪^吉洞=홍^길동"}),
        (
            "山田*",
            {"Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"},
        ),
        (
            "?田*",
            {"Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"},
        ),
        ("山田^太郎", {"Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"}),
        ("YAMADA^TAROU", {"Yamada^Tarou=山田^太郎=やまだ^たろう"}),
        # Half-width katakana are folded to full width: both spellings find it.
        ("ﾔﾏﾀﾞ*", {"ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"}),
        ("ヤマダ*", {"ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"}),
        ("ヤマ?^*", {"ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"}),
        (
            "やまだ^たろう",
            {"Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"},
        ),
        ("王*", {"Wang^XiaoDong=王^小東", "Wang^XiaoDong=王^小东"}),
        ("=王^小东", {"Wang^XiaoDong=王^小东"}),
        ("wang^xiaodong", {"Wang^XiaoDong=王^小東", "Wang^XiaoDong=王^小东"}),
        ("aneas*", {"Äneas^Rüdiger"}),
        ("ÄNEAS^RÜDIGER", {"Äneas^Rüdiger"}),
        ("buc^jerome", {"Buc^Jérôme"}),
        ("διονυσιος", {"Διονυσιος"}),
    ],
)
def test_names_match_in_every_script(charset_archive: Archive, pattern: str, expected: set):
    assert names(charset_archive, pattern) == expected


@pytest.mark.fast
def test_synthetic_latin1_and_gb18030_names(archive: Archive, tmp_path: Path):
    write(
        ct_slice(patient_id="L1", patient_name="Müller^Jürgen", charset="ISO_IR 100"),
        tmp_path / "latin1.dcm",
    )
    write(
        ct_slice(patient_id="G1", patient_name="Zhang^SanFeng=张^三丰", charset="GB18030"),
        tmp_path / "gb.dcm",
    )
    # The files really carry the legacy encodings.
    assert "Müller".encode("latin-1") in (tmp_path / "latin1.dcm").read_bytes()
    assert "张^三丰".encode("gb18030") in (tmp_path / "gb.dcm").read_bytes()
    for name in ("latin1.dcm", "gb.dcm"):
        archive.ingest_file(tmp_path / name, SOURCE)

    assert names(archive, "muller*") == {"Müller^Jürgen"}
    assert names(archive, "MÜLLER") == set()  # single value: the whole name
    assert names(archive, "MÜLLER^JÜRGEN") == {"Müller^Jürgen"}
    assert names(archive, "MULLER^J?RGEN") == {"Müller^Jürgen"}
    assert names(archive, "Müller*") == {"Müller^Jürgen"}
    assert names(archive, "张*") == {"Zhang^SanFeng=张^三丰"}
    assert names(archive, "=张^三?") == {"Zhang^SanFeng=张^三丰"}
    assert names(archive, "zhang*") == {"Zhang^SanFeng=张^三丰"}


@pytest.mark.fast
def test_fold_and_split():
    assert fold("MÜLLER") == fold("müller") == "muller"
    assert fold("Jérôme") == "jerome"
    assert fold("ﾔﾏﾀﾞ") == "ヤマダ"  # half-width katakana unified, voicing mark kept
    assert fold("김희중") == "김희중"  # Hangul syllables stay whole
    assert len(fold("김희중")) == 3
    assert fold("\uff21\uff22\uff23") == "abc"  # full-width Latin letters
    assert split_pn("Yamada^Tarou=山田^太郎=やまだ^たろう") == (
        "Yamada^Tarou",
        "山田^太郎",
        "やまだ^たろう",
    )
    assert split_pn("DOE^JANE^^^") == ("DOE^JANE", "", "")
    assert split_pn("=山田") == ("", "山田", "")


# -- response_character_set ------------------------------------------------------------------
def response(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.3"
    return ds


KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
JAPANESE_KANA = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "requested", "expected"),
    [
        ("DOE^JANE", None, ["ISO_IR 6"]),
        ("DOE^JANE", "", ["ISO_IR 6"]),
        ("DOE^JANE", [], ["ISO_IR 6"]),
        ("DOE^JANE", "ISO_IR 100", ["ISO_IR 100"]),
        ("Müller^Hans", None, ["ISO_IR 192"]),
        ("Müller^Hans", "ISO_IR 6", ["ISO_IR 192"]),
        ("Müller^Hans", "ISO_IR 100", ["ISO_IR 100"]),
        ("Müller^Hans", ["ISO_IR 100"], ["ISO_IR 100"]),
        ("Müller^Hans", "ISO_IR 144", ["ISO_IR 192"]),  # Cyrillic has no ü
        ("\u0418\u0432\u0430\u043d\u043e\u0432", "ISO_IR 144", ["ISO_IR 144"]),  # Cyrillic
        ("Διονυσιος", "ISO_IR 100", ["ISO_IR 192"]),
        ("Διονυσιος", "ISO_IR 126", ["ISO_IR 126"]),
        (KOREAN, ["", "ISO 2022 IR 149"], ["", "ISO 2022 IR 149"]),
        (KOREAN, "\\ISO 2022 IR 149", ["", "ISO 2022 IR 149"]),
        (KOREAN, None, ["ISO_IR 192"]),
        (KOREAN, ["", "ISO 2022 IR 87"], ["ISO_IR 192"]),  # no Hangul in JIS X 0208
        ("김희중", ["", "ISO 2022 IR 149"], ["", "ISO 2022 IR 149"]),
        (JAPANESE, ["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 87"]),
        (JAPANESE, ["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        (JAPANESE_KANA, ["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        (JAPANESE_KANA, ["", "ISO 2022 IR 87"], ["ISO_IR 192"]),  # no half-width kana
        (JAPANESE, ["", "ISO 2022 IR 149"], ["ISO_IR 192"]),  # not all of it in KS X 1001
        (JAPANESE, "ISO_IR 192", ["ISO_IR 192"]),
        (JAPANESE, "GB18030", ["GB18030"]),
        ("Wang^XiaoDong=王^小东", "GB18030", ["GB18030"]),
        ("Wang^XiaoDong=王^小东", "GBK", ["GBK"]),
        # Not usable requests: unknown terms, UTF-8 mixed with code extensions.
        ("DOE^JANE", "NOT A CHARSET", ["ISO_IR 192"]),
        ("DOE^JANE", ["ISO_IR 192", "ISO 2022 IR 149"], ["ISO_IR 192"]),
        ("DOE^JANE", ["ISO_IR 100", "ISO 2022 IR 149"], ["ISO_IR 192"]),
        # Latin-1 letters under an ASCII G0 with Korean G1: pydicom would write them in
        # Latin-1, which is not what the set declares.
        ("Müller^Hans", ["", "ISO 2022 IR 149"], ["ISO_IR 192"]),
    ],
)
def test_response_character_set(name: str, requested, expected: list[str]):
    chosen = response_character_set(response(PatientName=name), requested)
    assert chosen == expected
    assert_round_trips(response(PatientName=name), chosen)


def assert_round_trips(ds: Dataset, charset: list[str]) -> None:
    """Write ``ds`` with ``charset`` through pydicom and read it back: same values,
    and no replacement characters or warnings on the way."""
    ds = copy.deepcopy(ds)
    ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
        back = pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)
        for elem in ds:
            if elem.keyword == "SpecificCharacterSet":
                continue
            got = back[elem.tag].value
            if elem.VR == "PN":
                assert str(got or "") == str(elem.value or "")
            elif elem.VR == "SQ":
                assert len(got) == len(elem.value)
            else:
                assert (got or "") == (elem.value or "")


@pytest.mark.fast
def test_every_text_value_counts_including_sequences():
    ds = response(PatientName="DOE^JANE", StudyDescription="Kopf ÄÖÜ")
    assert response_character_set(ds, None) == ["ISO_IR 192"]
    assert response_character_set(ds, "ISO_IR 100") == ["ISO_IR 100"]
    item = Dataset()
    item.PatientID = "김"
    ds = response(PatientName="DOE^JANE")
    ds.OtherPatientIDsSequence = [item]
    assert response_character_set(ds, "ISO_IR 100") == ["ISO_IR 192"]
    assert response_character_set(ds, ["", "ISO 2022 IR 149"]) == ["", "ISO 2022 IR 149"]
    # Multi-valued text: each value counts.
    ds = response(PatientName="DOE^JANE")
    ds.OtherPatientNames = ["SMITH^A", "Müller^B"]
    assert response_character_set(ds, None) == ["ISO_IR 192"]
    assert response_character_set(ds, "ISO_IR 100") == ["ISO_IR 100"]
    # Values of other VRs (CS, DA, UI) are ASCII by definition and do not count.
    ds = response(PatientName="DOE^JANE", StudyDate="20240101", Modality="CT")
    assert response_character_set(ds, None) == ["ISO_IR 6"]


@pytest.mark.fast
def test_person_name_objects_and_empty_values():
    ds = response(StudyDescription="")
    ds.PatientName = PersonName("Buc^Jérôme")
    ds.add_new(0x00080090, "PN", None)  # ReferringPhysicianName, empty
    assert response_character_set(ds, "ISO_IR 100") == ["ISO_IR 100"]
    assert response_character_set(ds, None) == ["ISO_IR 192"]
    assert_round_trips(ds, ["ISO_IR 100"])


@pytest.mark.fast
def test_requested_terms():
    assert requested_terms(None) == []
    assert requested_terms("") == []
    assert requested_terms(["", ""]) == []
    assert requested_terms("\\ISO 2022 IR 149") == ["", "ISO 2022 IR 149"]
    assert requested_terms(["", "ISO 2022 IR 87 "]) == ["", "ISO 2022 IR 87"]
    ds = Dataset()
    ds.SpecificCharacterSet = ["ISO 2022 IR 13", "ISO 2022 IR 87"]
    assert requested_terms(ds.SpecificCharacterSet) == ["ISO 2022 IR 13", "ISO 2022 IR 87"]


@pytest.mark.fast
def test_query_results_of_real_files_round_trip_in_the_chosen_set(charset_archive: Archive):
    """The path of a C-FIND response: query, choose a set for the requester, encode."""
    cases = {
        "I2EXAMPLE": (["", "ISO 2022 IR 149"], ["", "ISO 2022 IR 149"]),
        "H31EXAMPLE": (["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 87"]),
        "H32EXAMPLE": (["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        "SCSGERM": ("ISO_IR 100", ["ISO_IR 100"]),
        "X2EXAMPLE": ("ISO_IR 100", ["ISO_IR 192"]),
    }
    for patient_id, (requested, expected) in cases.items():
        result = charset_archive.query(
            Query(
                level=Level.STUDY,
                keys={"PatientID": patient_id, "PatientName": "", "StudyDescription": ""},
            )
        )
        [ds] = result.datasets
        chosen = response_character_set(ds, requested)
        assert chosen == expected, patient_id
        assert_round_trips(ds, chosen)
