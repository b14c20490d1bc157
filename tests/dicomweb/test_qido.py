"""QIDO-RS against a live uvicorn server, with the real dicomweb-client, on both backends.

Covers searches at every level with every kind of matching, includefield, paging and
its Warning header, every 400 case, 406, CORS (preflight and on errors), gzip, the
forwarded base URL of Retrieve URLs, the capability description, and C-FIND/QIDO
parity through a running pynetdicom SCP built by ``gateway.dimse.server.make_server``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from requests import HTTPError as RequestsHTTPError

from dicomweb import dicomjson
from dicomweb.app import create_app
from dicomweb.errors import HTTPError
from dicomweb.middleware import JSONGZip
from dicomweb.qido import parse_search
from gateway.archive import Archive, Level
from gateway.config import Settings
from tests.dicomweb.conftest import TEST_INSTITUTION, LiveServer, StudyRefs, ingest_study
from tests.servers import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.production,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# tags
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
PATIENT_ID = "00100020"
PATIENT_NAME = "00100010"
RETRIEVE_URL = "00081190"


@dataclass
class World:
    studies: dict[str, StudyRefs] = field(default_factory=dict)

    def uid(self, nick: str) -> str:
        return self.studies[nick].study_uid

    def nick(self, study_uid: str) -> str:
        return next(k for k, v in self.studies.items() if v.study_uid == study_uid)


# nickname: ingest_study keywords
STUDIES: dict[str, dict[str, Any]] = {
    "jane": dict(
        patient_id="P1",
        patient_name="DOE^JANE",
        study_date="20240115",
        study_time="101500",
        accession="ACC001",
        series=2,
        instances=2,
        modalities=["CT", "MR"],
    ),
    "john": dict(
        patient_id="P2",
        patient_name="DOE^JOHN",
        study_date="20240201",
        study_time="083000",
        accession="ACC002",
        series=1,
        instances=3,
        modalities=["MR"],
    ),
    "hans": dict(
        patient_id="P3",
        patient_name="Müller^Hans",
        study_date="20231231",
        study_time="235959",
        accession="ACC003",
        charset="ISO_IR 100",
        modalities=["US"],
        instances=1,
    ),
    "tarou": dict(
        patient_id="P4",
        patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
        study_date="",
        study_time="",
        accession="ACC004",
        charset="ISO_IR 192",
        modalities=["CT"],
        instances=1,
    ),
}


@pytest.fixture
def world(live_server: LiveServer) -> World:
    w = World()
    for nick, kw in STUDIES.items():
        w.studies[nick] = ingest_study(live_server.archive, live_server.tmp_path, **kw)
    return w


@pytest.fixture
def client(live_server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(live_server.dicomweb_url)


def get(server: LiveServer, path: str, params: Any = None, **kw: Any) -> httpx.Response:
    return httpx.get(server.dicomweb_url + path, params=params, timeout=30, **kw)


def value(result: dict[str, Any], tag: str) -> Any:
    values = result.get(tag, {}).get("Value")
    return values[0] if values else None


def study_nicks(world: World, results: list[dict[str, Any]]) -> set[str]:
    return {world.nick(value(r, STUDY_UID)) for r in results}


def qido_studies(server: LiveServer, world: World, **params: str) -> set[str]:
    response = get(server, "/studies", params)
    assert response.status_code in (200, 204), response.text
    return study_nicks(world, response.json()) if response.status_code == 200 else set()


# -- searches at every level -------------------------------------------------------------
def test_every_resource_with_dicomweb_client(
    live_server: LiveServer, world: World, client: DICOMwebClient
):
    jane = world.studies["jane"]
    studies = client.search_for_studies()
    assert study_nicks(world, studies) == set(STUDIES)
    assert len(client.search_for_series()) == 5
    assert len(client.search_for_instances()) == 9
    assert {value(s, SERIES_UID) for s in client.search_for_series(jane.study_uid)} == set(
        jane.series_uids
    )
    assert {value(i, SOP_UID) for i in client.search_for_instances(jane.study_uid)} == set(
        jane.all_sops
    )
    ct = jane.series_uids[0]
    found = client.search_for_instances(jane.study_uid, ct)
    assert [value(i, SOP_UID) for i in found] == jane.sop_uids[ct]
    # Unknown study: nothing matches -> 204, which the client reads as [].
    assert client.search_for_series("1.2.3.4") == []


def test_required_attributes_of_each_level(live_server: LiveServer, world: World):
    jane = world.studies["jane"]
    base = live_server.dicomweb_url
    [study] = get(live_server, "/studies", {"StudyInstanceUID": jane.study_uid}).json()
    assert {
        "00080020",  # Study Date
        "00080030",  # Study Time
        "00080050",  # Accession Number
        "00080056",  # Instance Availability
        "00080061",  # Modalities in Study
        "00080090",  # Referring Physician's Name
        RETRIEVE_URL,
        PATIENT_NAME,
        PATIENT_ID,
        "00100030",  # Patient's Birth Date
        "00100040",  # Patient's Sex
        STUDY_UID,
        "00200010",  # Study ID
        "00201206",  # Number of Study Related Series
        "00201208",  # Number of Study Related Instances
    } <= set(study)
    assert study["00080061"]["Value"] == ["CT", "MR"]
    assert value(study, "00201206") == 2 and value(study, "00201208") == 4
    assert value(study, "00080056") == "ONLINE"
    assert study[PATIENT_NAME] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}
    assert value(study, RETRIEVE_URL) == f"{base}/studies/{jane.study_uid}"
    assert study[RETRIEVE_URL]["vr"] == "UR"
    assert "00080052" not in study  # no Query/Retrieve Level in QIDO results

    series = get(live_server, f"/studies/{jane.study_uid}/series").json()
    assert len(series) == 2
    for s in series:
        assert {"00080060", SERIES_UID, "00200011", "00201209", RETRIEVE_URL} <= set(s)
        assert STUDY_UID in s
        assert value(s, RETRIEVE_URL) == (
            f"{base}/studies/{jane.study_uid}/series/{value(s, SERIES_UID)}"
        )
        assert "00201208" not in s  # study attributes only for the all-series resource
    all_series = get(live_server, "/series", {"SeriesInstanceUID": jane.series_uids[1]}).json()
    [mr] = all_series
    assert value(mr, "00080060") == "MR" and value(mr, "00201209") == 2
    assert value(mr, "00201208") == 4 and value(mr, PATIENT_ID) == "P1"  # study level too

    ct = jane.series_uids[0]
    instances = get(live_server, f"/studies/{jane.study_uid}/series/{ct}/instances").json()
    for i in instances:
        assert {
            "00080016",
            SOP_UID,
            "00080056",
            RETRIEVE_URL,
            "00200013",
            "00280010",
            "00280011",
            "00280100",
        } <= set(i)
        assert value(i, RETRIEVE_URL) == (
            f"{base}/studies/{jane.study_uid}/series/{ct}/instances/{value(i, SOP_UID)}"
        )
        assert value(i, "00280010") == 64
    [one] = get(live_server, "/instances", {"SOPInstanceUID": jane.sop_uids[ct][1]}).json()
    assert value(one, "00200013") == 2
    assert value(one, "00080060") == "CT" and value(one, PATIENT_ID) == "P1"


def test_person_names_as_json_objects(live_server: LiveServer, world: World):
    [tarou] = get(live_server, "/studies", {"PatientID": "P4"}).json()
    assert tarou[PATIENT_NAME]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]
    assert "Value" not in tarou["00080020"]  # empty Study Date: present, no value
    [hans] = get(live_server, "/studies", {"PatientID": "P3"}).json()
    assert hans[PATIENT_NAME]["Value"] == [{"Alphabetic": "Müller^Hans"}]


# -- matching ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"PatientID": "P1"}, {"jane"}),
        ({"00100020": "P2"}, {"john"}),  # by tag
        ({"PatientName": "DOE*"}, {"jane", "john"}),  # wildcard
        ({"PatientName": "doe^j?ne"}, {"jane"}),  # case-insensitive, single-char wildcard
        ({"PatientName": "muller*", "fuzzymatching": "true"}, {"hans"}),  # accents
        ({"PatientName": "MÜLLER*", "fuzzymatching": "false"}, {"hans"}),
        ({"PatientName": "山田*"}, {"tarou"}),  # ideographic group
        ({"AccessionNumber": "ACC00?"}, set(STUDIES)),
        ({"AccessionNumber": "ACC001"}, {"jane"}),
        ({"StudyDate": "20240115"}, {"jane"}),
        ({"StudyDate": "20240101-"}, {"jane", "john"}),  # open range
        ({"StudyDate": "-20231231"}, {"hans"}),
        ({"StudyDate": "20231201-20240131"}, {"jane", "hans"}),
        ({"StudyTime": "0800-0900"}, {"john"}),  # time range
        ({"StudyTime": "10-"}, {"jane", "hans"}),
        ({"ModalitiesInStudy": "MR"}, {"jane", "john"}),
        ({"ModalitiesInStudy": "US,CT"}, {"jane", "hans", "tarou"}),  # list, comma
        ({"ModalitiesInStudy": "US\\MR"}, {"jane", "john", "hans"}),  # list, backslash
        ({"PatientName": "*", "PatientID": ""}, set(STUDIES)),  # universal
        ({"ReferringPhysicianName": "ref^doc"}, set(STUDIES)),
        ({"PatientName": "nobody"}, set()),
        # emptyvaluematching: tarou has no Study Date
        ({"StudyDate": "20240101-", "emptyvaluematching": "true"}, {"jane", "john", "tarou"}),
        ({"StudyDate": "20240101-", "emptyvaluematching": "false"}, {"jane", "john"}),
    ],
)
def test_study_matching(live_server: LiveServer, world: World, params, expected):
    assert qido_studies(live_server, world, **params) == expected


def test_uid_lists(live_server: LiveServer, world: World, client: DICOMwebClient):
    jane, john = world.uid("jane"), world.uid("john")
    assert qido_studies(live_server, world, StudyInstanceUID=f"{jane},{john}") == {"jane", "john"}
    assert qido_studies(live_server, world, StudyInstanceUID=f"{jane}\\{john}") == {
        "jane",
        "john",
    }
    repeated = get(live_server, "/studies", [("StudyInstanceUID", jane), ("0020000D", john)])
    assert study_nicks(world, repeated.json()) == {"jane", "john"}
    found = client.search_for_studies(search_filters={"StudyInstanceUID": [jane, john]})
    assert study_nicks(world, found) == {"jane", "john"}
    sops = world.studies["jane"].all_sops[:2]
    found = get(live_server, "/instances", {"SOPInstanceUID": ",".join(sops)}).json()
    assert {value(i, SOP_UID) for i in found} == set(sops)


def test_series_and_instance_matching(live_server: LiveServer, world: World):
    def series_of(path: str, **params: str) -> set[str]:
        response = get(live_server, path, params)
        return {value(s, SERIES_UID) for s in response.json()} if response.content else set()

    jane, john = world.studies["jane"], world.studies["john"]
    mr_series = {jane.series_uids[1], john.series_uids[0]}
    assert series_of("/series", Modality="MR") == mr_series
    assert series_of("/series", Modality="MR", PatientID="P2") == {john.series_uids[0]}
    assert series_of("/series", Modality="C?") == {
        jane.series_uids[0],
        world.studies["tarou"].series_uids[0],
    }
    assert series_of(f"/studies/{jane.study_uid}/series", Modality="CT") == {jane.series_uids[0]}
    assert series_of(f"/studies/{jane.study_uid}/series", SeriesNumber="2") == {jane.series_uids[1]}
    assert series_of("/series", PatientName="doe*", Modality="CT,MR") == {
        jane.series_uids[0],
        *mr_series,
    }

    def sops_of(path: str, **params: str) -> list[str]:
        response = get(live_server, path, params)
        return [value(i, SOP_UID) for i in response.json()] if response.content else []

    assert sops_of("/instances", InstanceNumber="3") == [john.all_sops[2]]
    assert set(sops_of("/instances", Modality="MR")) == set(
        jane.sop_uids[jane.series_uids[1]] + john.all_sops
    )
    assert sops_of(f"/studies/{john.study_uid}/instances", InstanceNumber="2") == [john.all_sops[1]]
    assert len(sops_of("/instances", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")) == 9
    ct = jane.series_uids[0]
    assert sops_of(f"/studies/{jane.study_uid}/series/{ct}/instances", InstanceNumber="1") == [
        jane.sop_uids[ct][0]
    ]


def test_ohif_queries(live_server: LiveServer, world: World):
    """The parameters OHIF v3's DICOMweb data source sends (supportsWildcard: true)."""
    response = get(
        live_server,
        "/studies",
        {
            "PatientName": "*doe*",
            "00100020": "*P*",
            "AccessionNumber": "*ACC*",
            "StudyDescription": "*CT*",
            "ModalitiesInStudy": "CT,MR",  # an array, joined by the JS client
            "limit": "101",
            "offset": "0",
            "fuzzymatching": "true",
            "includefield": "00081030,00080060,00080090,00100030",
            "StudyDate": "19700102-20241231",
        },
        headers={"Accept": "application/dicom+json"},
    )
    assert response.status_code == 200, response.text
    results = response.json()
    assert study_nicks(world, results) == {"jane", "john"}
    for r in results:
        assert value(r, "00081030") == "CT HEAD"
        assert value(r, "00100030") == "19700101"
        assert r["00080090"]["Value"] == [{"Alphabetic": "REF^DOC"}]
        assert "00080060" not in r  # a series attribute: not returned for studies
        assert r["00080061"]["Value"]  # OHIF reads Modalities in Study instead
    assert "Warning" not in response.headers
    # StudyInstanceUID list as OHIF builds it (non-UID characters -> backslash)
    uids = f"{world.uid('jane')}\\{world.uid('tarou')}"
    assert qido_studies(live_server, world, StudyInstanceUID=uids) == {"jane", "tarou"}
    # the series of a study (lazy load): Series Description and Series Date included
    jane = world.studies["jane"]
    series = get(
        live_server,
        f"/studies/{jane.study_uid}/series",
        {"includefield": "0008103E,00080021"},
    ).json()
    assert {value(s, "0008103E") for s in series} == {"AXIAL"}
    assert all("00080021" in s for s in series)


# -- includefield --------------------------------------------------------------------------
def test_includefield(live_server: LiveServer, world: World, client: DICOMwebClient):
    jane = world.uid("jane")
    [r] = get(
        live_server,
        "/studies",
        [
            ("StudyInstanceUID", jane),
            ("includefield", "InstitutionName"),
            ("includefield", "00201200"),
        ],
    ).json()
    assert "00080080" in r and value(r, "00201200") == 1  # Number of Patient Related Studies
    [r] = client.search_for_studies(
        search_filters={"StudyInstanceUID": jane}, fields=["SOPClassesInStudy"]
    )
    assert r["00080062"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    # all: every attribute the index holds at the series level and above
    [s] = get(
        live_server,
        "/series",
        {"SeriesInstanceUID": world.studies["jane"].series_uids[0], "includefield": "all"},
    ).json()
    assert {"00180015", "00080021", "00080031", "00080080"} <= set(s)
    assert "00200013" not in s  # no instance attributes in series results
    # an attribute the index does not hold: named in a Warning, not returned
    response = get(live_server, "/studies", {"StudyInstanceUID": jane, "includefield": "ImageType"})
    assert response.status_code == 200
    assert "00080008" not in response.json()[0]
    assert "includefield ImageType is not supported" in response.headers["Warning"]
    assert response.headers["Warning"].startswith("299 ")


# -- paging --------------------------------------------------------------------------------
def test_limit_offset_and_warning(live_server: LiveServer, world: World, client: DICOMwebClient):
    live_server.settings.qido_default_limit = 2
    live_server.settings.qido_max_limit = 3
    order = [world.uid(n) for n in reversed(STUDIES)]  # newest arrival first

    def page(**params: str) -> httpx.Response:
        return get(live_server, "/studies", params)

    first = page()
    assert [value(r, STUDY_UID) for r in first.json()] == order[:2]
    warning = first.headers["Warning"]
    assert warning.startswith(f"299 127.0.0.1:{live_server.url.rsplit(':', 1)[1]}: ")
    assert (
        '"The number of results exceeded the maximum supported by the server. '
        'Additional results can be requested."'
    ) in warning
    capped = page(limit="100")
    assert len(capped.json()) == 3 and "Warning" in capped.headers
    assert [value(r, STUDY_UID) for r in page(limit="1", offset="2").json()] == order[2:3]
    last = page(limit="3", offset="1")
    assert [value(r, STUDY_UID) for r in last.json()] == order[1:]
    assert "Warning" not in last.headers  # nothing left behind this page
    beyond = page(offset="10")
    assert beyond.status_code == 204 and beyond.content == b""
    # The client pages through everything with offset.
    everything = client.search_for_studies(get_remaining=True)
    assert [value(r, STUDY_UID) for r in everything] == order
    assert len(client.search_for_instances(limit=2, offset=8)) == 1


# -- refusals ------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/studies", {"Foo": "1"}, "'Foo'"),
    ("/studies", {"foo": "1"}, "unsupported query parameter 'foo'"),
    ("/studies", {"multiplevaluematching": "true"}, "multiplevaluematching"),
    ("/studies", {"ImageType": "ORIGINAL"}, "ImageType"),
    ("/studies", {"00091001": "x"}, "private"),
    ("/studies", {"7FE00011": "x"}, "7FE00011"),
    ("/studies", {"RequestAttributesSequence.ScheduledProcedureStepID": "1"}, "sequences"),
    ("/studies", {"SOPInstanceUID": "1.2.3"}, "SOPInstanceUID"),
    ("/series", {"InstanceNumber": "1"}, "InstanceNumber"),
    ("/studies", {"StudyDate": "2024-13-01"}, "StudyDate"),
    ("/studies", {"StudyDate": "20240201-20240101"}, "StudyDate"),
    ("/studies", {"StudyDate": "yesterday"}, "StudyDate"),
    ("/studies", {"StudyTime": "2500"}, "StudyTime"),
    ("/studies", {"StudyInstanceUID": "1.2.abc"}, "StudyInstanceUID"),
    ("/studies", {"StudyInstanceUID": "1.2.3,1..2"}, "StudyInstanceUID"),
    ("/studies/1.2.x/series", {}, "Study Instance UID"),
    ("/studies/1.2.3/series/1.2.-3/instances", {}, "Series Instance UID"),
    ("/studies/1.2.3/series", {"StudyInstanceUID": "1.2.3"}, "StudyInstanceUID"),
    ("/studies", {"SeriesNumber": "two"}, "SeriesNumber"),
    ("/studies", {"limit": "-1"}, "limit"),
    ("/studies", {"limit": "ten"}, "limit"),
    ("/studies", {"limit": "0"}, "limit"),
    ("/studies", {"offset": "-5"}, "offset"),
    ("/studies", {"offset": "1.5"}, "offset"),
    ("/studies", {"fuzzymatching": "maybe"}, "fuzzymatching"),
    ("/studies", {"emptyvaluematching": "yes"}, "emptyvaluematching"),
    ("/studies", {"includefield": "NoSuchThing"}, "NoSuchThing"),
    ("/studies", {"includefield": ""}, "includefield"),
    ("/studies", [("PatientID", "P1"), ("PatientID", "P2")], "PatientID"),
    ("/studies", [("limit", "1"), ("limit", "2")], "limit"),
]


@pytest.mark.parametrize(("path", "params", "named"), BAD_REQUESTS)
def test_bad_requests_are_400_naming_the_problem(live_server: LiveServer, path, params, named):
    response = get(live_server, path, params, headers={"Origin": "https://viewer.example.org"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid-query"
    assert named in body["message"]
    assert response.headers["access-control-allow-origin"] == "*"  # CORS on errors too


def test_client_raises_on_400(live_server: LiveServer, client: DICOMwebClient):
    with pytest.raises(RequestsHTTPError) as err:
        client.search_for_studies(search_filters={"StudyDate": "tomorrow"})
    assert err.value.response.status_code == 400


# -- media types ---------------------------------------------------------------------------
def test_content_negotiation(live_server: LiveServer, world: World):
    def fetch(accept_header: str | None, **params: str) -> httpx.Response:
        headers = {"Accept": accept_header} if accept_header is not None else {}
        return get(live_server, "/studies", {"PatientID": "P1", **params}, headers=headers)

    assert fetch("application/dicom+json").headers["content-type"] == "application/dicom+json"
    assert fetch("application/json").headers["content-type"] == "application/json"
    assert fetch("*/*").headers["content-type"] == "application/dicom+json"
    assert fetch("application/*;q=0.5").headers["content-type"] == "application/dicom+json"
    assert fetch("text/html, */*;q=0.1").status_code == 200
    for refused in (
        "application/dicom+xml",
        'multipart/related; type="application/dicom+xml"',
        "text/html",
        "application/dicom+json;q=0",
    ):
        response = fetch(refused)
        assert response.status_code == 406, refused
        assert response.json()["error"] == "not-acceptable"
    # The accept query parameter (PS3.18 8.3.3.1) overrides the header.
    assert fetch("text/html", accept="application/json").status_code == 200
    assert fetch(None, charset="utf-8").status_code == 200
    assert fetch(None, charset="latin-1").status_code == 406


# -- browser headers -----------------------------------------------------------------------
def test_cors_preflight_and_headers(live_server: LiveServer, world: World):
    origin = "https://viewer.example.org"
    preflight = httpx.options(
        live_server.dicomweb_url + "/studies",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "accept" in allowed
    assert "GET" in preflight.headers["access-control-allow-methods"]

    response = get(live_server, "/studies", headers={"Origin": origin})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert "warning" in response.headers["access-control-expose-headers"].lower()
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    not_acceptable = get(live_server, "/studies", headers={"Origin": origin, "Accept": "image/png"})
    assert not_acceptable.status_code == 406
    assert not_acceptable.headers["access-control-allow-origin"] == "*"


def test_json_is_gzipped(live_server: LiveServer, world: World):
    plain = get(live_server, "/instances", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and len(plain.content) > 1024
    zipped = get(live_server, "/instances", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(plain.content)
    assert zipped.json() == plain.json()  # httpx decodes it
    assert "Accept-Encoding" in zipped.headers["vary"]


def test_retrieve_url_behind_a_proxy(live_server: LiveServer, world: World):
    jane = world.uid("jane")
    forged = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "attacker.example"}
    # By default forwarded headers are not trusted: any client can send them.
    response = get(live_server, "/studies", {"StudyInstanceUID": jane}, headers=forged)
    assert value(response.json()[0], RETRIEVE_URL).startswith(live_server.dicomweb_url)
    # A configured public base URL wins over everything.
    live_server.settings.public_base_url = "https://bridge.example.org"
    try:
        response = get(live_server, "/studies", {"StudyInstanceUID": jane}, headers=forged)
        prefix = live_server.settings.dicomweb_prefix
        assert value(response.json()[0], RETRIEVE_URL) == (
            f"https://bridge.example.org{prefix}/studies/{jane}"
        )
    finally:
        live_server.settings.public_base_url = ""
    live_server.settings.trust_forwarded_headers = True
    try:
        _forwarded_retrieve_urls(live_server, jane)
    finally:
        live_server.settings.trust_forwarded_headers = False


def _forwarded_retrieve_urls(live_server: LiveServer, jane: str) -> None:
    response = get(
        live_server,
        "/studies",
        {"StudyInstanceUID": jane},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"},
    )
    [study] = response.json()
    prefix = live_server.settings.dicomweb_prefix
    assert value(study, RETRIEVE_URL) == f"https://pacs.example.org{prefix}/studies/{jane}"
    # A forwarded host that is not a host name is ignored.
    response = get(
        live_server,
        "/studies",
        {"StudyInstanceUID": jane},
        headers={"X-Forwarded-Host": "evil/x?y"},
    )
    assert value(response.json()[0], RETRIEVE_URL).startswith(live_server.dicomweb_url)


def test_capability_description_and_openapi(live_server: LiveServer):
    for url in (live_server.dicomweb_url + "/", live_server.dicomweb_url):
        response = httpx.get(url)
        assert response.status_code == 200
        description = response.json()
        qido_paths = {r["path"] for r in description["resources"] if r["service"] == "QIDO-RS"}
        assert qido_paths == {
            "/studies",
            "/series",
            "/instances",
            "/studies/{study}/series",
            "/studies/{study}/instances",
            "/studies/{study}/series/{series}/instances",
        }
        qido = description["services"]["QIDO-RS"]
        assert "includefield" in qido["query_parameters"]
        assert "PatientName" in qido["matching"]["attributes"]["study"]
        assert qido["max_limit"] == live_server.settings.qido_max_limit
        assert "1.2.840.10008.1.2.1" in description["storage_transfer_syntaxes"]
    openapi = httpx.get(live_server.url + description["openapi"]).json()
    assert f"{live_server.settings.dicomweb_prefix}/studies" in openapi["paths"]


# -- C-FIND and QIDO-RS give the same matches ----------------------------------------------
@pytest.fixture
def find_scp(live_server: LiveServer) -> Iterator[int]:
    """A DIMSE node (gateway.dimse.server.make_server) on the same archive."""
    from gateway.dimse.server import make_server
    from gateway.peers import PeerRegistry

    # The test SCU is a system of the institution that sent the test data.
    PeerRegistry(live_server.archive.db).add(
        "FINDSCU", "127.0.0.1", 104, institution=TEST_INSTITUTION
    )
    settings = live_server.settings.model_copy(
        update={"dimse_host": "127.0.0.1", "dimse_port": free_port()}
    )
    server = make_server(settings, live_server.archive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield settings.dimse_port
    server.shutdown()
    server.server_close()
    thread.join(10)


def c_find(port: int, level: str, keys: dict[str, str], unique: str) -> set[str]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="STUDYBRIDGE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    identifier.SpecificCharacterSet = "ISO_IR 192"
    setattr(identifier, unique, "")
    for keyword, val in keys.items():
        setattr(identifier, keyword, val)
    found = set()
    try:
        for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            assert status is not None and status.Status in (0x0000, 0xFF00), status
            if status.Status == 0xFF00:
                found.add(str(getattr(ds, unique)))
    finally:
        assoc.release()
    return found


PARITY = [
    ("/studies", "STUDY", {"PatientName": "doe*"}),
    ("/studies", "STUDY", {"PatientName": "MULLER^HANS"}),
    ("/studies", "STUDY", {"PatientName": "山田*"}),
    ("/studies", "STUDY", {"StudyDate": "20231201-20240131"}),
    ("/studies", "STUDY", {"StudyTime": "-1000"}),
    ("/studies", "STUDY", {"ModalitiesInStudy": "MR"}),
    ("/studies", "STUDY", {"AccessionNumber": "ACC00?", "PatientID": "P*"}),
    ("/series", "SERIES", {"Modality": "CT"}),
    ("/series", "SERIES", {"SeriesNumber": "2"}),
    ("/instances", "IMAGE", {"InstanceNumber": "2"}),
    ("/instances", "IMAGE", {"Modality": "MR", "InstanceNumber": "1"}),
]


def test_c_find_and_qido_agree(live_server: LiveServer, world: World, find_scp: int):
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
    tags = {"STUDY": STUDY_UID, "SERIES": SERIES_UID, "IMAGE": SOP_UID}
    uid_lists = [
        ("/studies", "STUDY", {"StudyInstanceUID": f"{world.uid('jane')}\\{world.uid('hans')}"}),
        ("/series", "SERIES", {"SeriesInstanceUID": "\\".join(world.studies["jane"].series_uids)}),
    ]
    for path, level, keys in PARITY + uid_lists:
        response = get(live_server, path, {**keys, "limit": "1000"})
        qido = {value(r, tags[level]) for r in response.json()} if response.content else set()
        dimse = c_find(find_scp, level, keys, unique[level])
        assert qido == dimse, (path, keys)
        assert qido, (path, keys)  # every case matches something


# -- quick unit tests ----------------------------------------------------------------------
@pytest.mark.fast
def test_parse_search_unit():
    search = parse_search(
        [
            ("PatientID", "P1"),
            ("includefield", "00081030,StudyID"),
            ("includefield", "Modality"),
            ("limit", "5000"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
        ],
        Level.STUDY,
        (Level.STUDY,),
        {},
        default_limit=100,
        max_limit=1000,
    )
    assert search.keys == {"PatientID": "P1", "StudyInstanceUID": "1.2.3\\1.2.4"}
    assert search.limit == 1000 and search.capped
    assert "StudyDescription" in search.include and "Modality" in search.include
    assert "NumberOfStudyRelatedInstances" in search.include
    with pytest.raises(HTTPError) as err:
        parse_search(
            [("offset", "x")], Level.STUDY, (Level.STUDY,), {}, default_limit=1, max_limit=1
        )
    assert err.value.status == 400


@pytest.mark.fast
@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/dicom+json"),
        ("", "application/dicom+json"),
        ("application/dicom+json, application/json", "application/dicom+json"),
        ("application/json", "application/json"),
        ("application/json;q=0.9, application/dicom+json", "application/dicom+json"),
        ("application/dicom+json;q=0.1, application/json;q=0.8", "application/json"),
        ("*/*", "application/dicom+json"),
        ("*/*;q=0.2, application/dicom+json;q=0", "application/json"),
        ("image/jpeg", None),
        ("multipart/related; type=application/dicom", None),
    ],
)
def test_choose_json_type(accept, chosen):
    assert dicomjson.choose_json_type(accept) == chosen


@pytest.mark.fast
def test_gzip_only_touches_json():
    """Multipart and pixel responses pass through uncompressed, JSON is compressed."""
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    big = b"x" * 10000

    async def json_route(_request):
        return Response(b'["' + big + b'"]', media_type="application/dicom+json")

    async def multipart_route(_request):
        async def parts():
            yield b"--b\r\nContent-Type: application/octet-stream\r\n\r\n" + big
            yield b"\r\n--b--"

        return StreamingResponse(
            parts(), media_type='multipart/related; type="application/octet-stream"; boundary=b'
        )

    async def pixels_route(_request):
        return Response(big, media_type="application/octet-stream")

    app = JSONGZip(
        Starlette(
            routes=[
                Route("/json", json_route),
                Route("/multipart", multipart_route),
                Route("/pixels", pixels_route),
            ]
        ),
        minimum_size=1024,
    )
    with TestClient(app) as http:
        headers = {"Accept-Encoding": "gzip"}
        assert http.get("/json", headers=headers).headers["content-encoding"] == "gzip"
        for path in ("/multipart", "/pixels"):
            response = http.get(path, headers=headers)
            assert "content-encoding" not in response.headers, path
            assert big in response.content
        refused = http.get("/json", headers={"Accept-Encoding": "gzip;q=0, identity"})
        assert "content-encoding" not in refused.headers


@pytest.mark.fast
def test_unhandled_errors_are_json_500_with_cors(tmp_path):
    from starlette.testclient import TestClient

    settings = Settings(data_dir=tmp_path / "var")
    archive = Archive.open(settings, migrate_schema=True)
    app = create_app(settings, archive)

    def boom() -> None:
        raise RuntimeError("kaboom")

    app.add_api_route(settings.dicomweb_prefix + "/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get(
            settings.dicomweb_prefix + "/boom", headers={"Origin": "https://viewer.example.org"}
        )
    assert response.status_code == 500
    assert response.json() == {"error": "internal-error", "message": "internal server error"}
    assert response.headers["access-control-allow-origin"] == "*"
    assert "kaboom" not in response.text
