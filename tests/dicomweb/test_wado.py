"""WADO-RS and WADO-URI against a live server, with the real client (dicomweb-client).

Data: pydicom's own test files (JPEG 2000, RLE, JPEG-LS, native multi-frame, CT with
rescale and window) given fresh UIDs, plus synthetic encapsulated files whose frames
span several fragments (with and without a Basic Offset Table). Each is compared with
what pydicom reads from the original file.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian
from requests.exceptions import HTTPError as ClientHTTPError

from dicomweb.multipart import MultipartWriter, Part, parse_accept
from dicomweb.rendered import parse_viewport, parse_window
from dicomweb.wado import dicom_syntaxes, frame_choice
from gateway.archive.frames import _encapsulated_ranges, decode_ranges
from gateway.archive.part10 import Layout
from gateway.archive.rendering import Window, _apply_window
from tests.dicomweb.conftest import TEST_SOURCE, LiveServer
from tests.factories import ct_slice, dataset_bytes, uid, write

pytestmark = [
    pytest.mark.integration,
    pytest.mark.production,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

EVRLE = str(ExplicitVRLittleEndian)
ORG = "1.2.826.0.1.3680043.10.1234."


# -- data ------------------------------------------------------------------------------
@dataclass
class Item:
    name: str
    path: Path  # the file ingested (fresh UIDs)
    study: str
    series: str
    sop: str

    @property
    def ds(self) -> pydicom.Dataset:
        return pydicom.dcmread(self.path)

    @property
    def frames(self) -> int:
        return int(self.ds.get("NumberOfFrames", 1) or 1)


@dataclass
class World:
    study: str
    items: dict[str, Item] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Item:
        return self.items[name]


SAMPLES = {
    "j2k_multi": "emri_small_jpeg_2k_lossless.dcm",  # 10 frames, no BOT, MONOCHROME2 16 bit
    "rle_rgb": "SC_rgb_rle.dcm",
    "j2k_ybr": "GDCMJ2K_TextGBR.dcm",  # YBR_RCT
    "jls_multi": "emri_small_jpeg_ls_lossless.dcm",
    "rle_multi": "emri_small_RLE.dcm",  # BOT present
    "native_multi": "emri_small.dcm",
    "ct": "CT_small.dcm",  # rescale, window
}


def _fresh(ds: pydicom.Dataset, study: str) -> pydicom.Dataset:
    ds.SOPInstanceUID = uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = uid()
    ds.PatientID = "WADO1"
    ds.IssuerOfPatientID = "TEST"
    return ds


def _ingest(live: LiveServer, ds: pydicom.Dataset, name: str) -> Item:
    path = live.tmp_path / "samples" / f"{name}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    result = live.archive.ingest_file(path, TEST_SOURCE)
    assert result.outcome.value == "stored", result
    return Item(name, path, result.study_uid, result.series_uid, result.sop_uid)


def _multi_fragment(study: str, *, bot: bool) -> pydicom.Dataset:
    """The JPEG 2000 multi-frame file with each frame split over two fragments."""
    ds = pydicom.dcmread(get_testdata_file(SAMPLES["j2k_multi"]))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=bot)
    return _fresh(ds, study)


def _build_world(live: LiveServer) -> World:
    study = uid()
    world = World(study)
    for key, name in SAMPLES.items():
        ds = _fresh(pydicom.dcmread(get_testdata_file(name)), study)
        world.items[key] = _ingest(live, ds, key)
    world.items["frag_bot"] = _ingest(live, _multi_fragment(study, bot=True), "frag_bot")
    world.items["frag_nobot"] = _ingest(live, _multi_fragment(study, bot=False), "frag_nobot")
    # A CT slice with a large private OB value and a large OB value inside a sequence.
    ct = ct_slice(study_uid=study, patient_id="WADO1", issuer="TEST", rows=32, columns=32)
    block = ct.private_block(0x0009, "STUDYBRIDGE TEST", create=True)
    block.add_new(0x01, "OB", bytes(range(256)) * 16)
    item = pydicom.Dataset()
    item.add_new(0x00091010, "LO", "STUDYBRIDGE TEST")
    item.add_new(0x00091001, "OB", b"\x01\x02" * 1500)
    ct.add_new(0x00400275, "SQ", pydicom.Sequence([item]))
    world.items["ct_private"] = _ingest(live, ct, "ct_private")
    return world


@pytest.fixture
def world(live_server: LiveServer) -> World:
    return _build_world(live_server)


@pytest.fixture
def client(live_server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(live_server.dicomweb_url)


def _instance_url(live: LiveServer, item: Item) -> str:
    return f"{live.dicomweb_url}/studies/{item.study}/series/{item.series}/instances/{item.sop}"


def split_multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related body: (headers, content) — independent of the server."""
    ctype = response.headers["content-type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = re.search(r"boundary=\"?([^\";]+)", ctype).group(1).encode()
    body = response.content
    assert body.startswith(b"--" + boundary + b"\r\n")
    assert body.endswith(b"--" + boundary + b"--\r\n")
    chunks = body[: -len(b"--" + boundary + b"--\r\n")].split(b"--" + boundary + b"\r\n")[1:]
    parts = []
    for chunk in chunks:
        head, _, content = chunk.partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content[:-2]))
    return parts


def original_frames(item: Item) -> list[bytes]:
    ds = item.ds
    n = item.frames
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=n))
    size = len(ds.PixelData) // n
    return [ds.PixelData[i * size : (i + 1) * size] for i in range(n)]


def pixels(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array


# -- retrieve --------------------------------------------------------------------------
def test_retrieve_study_as_stored_is_byte_identical(live_server: LiveServer, world: World):
    url = f"{live_server.dicomweb_url}/studies/{world.study}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    response = httpx.get(url, headers={"Accept": accept}, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/dicom"; boundary='
    )
    assert "content-encoding" not in response.headers
    parts = split_multipart(response)
    assert len(parts) == len(world.items)
    by_sop = {}
    for headers, content in parts:
        ds = pydicom.dcmread(io.BytesIO(content))
        assert headers["content-type"] == (
            f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
        )
        by_sop[ds.SOPInstanceUID] = content
    for item in world.items.values():
        content = by_sop[item.sop]
        original = dataset_bytes(item.path)
        assert content.endswith(original)  # the data set exactly as received
        stored = pydicom.dcmread(io.BytesIO(content))
        assert stored.file_meta.TransferSyntaxUID == item.ds.file_meta.TransferSyntaxUID


def test_head_gives_the_headers_of_get(live_server: LiveServer, world: World):
    url = f"{live_server.dicomweb_url}/studies/{world.study}"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    got = httpx.get(url, headers=accept, timeout=60)
    head = httpx.head(url, headers=accept, timeout=60)
    assert head.status_code == 200 and head.content == b""
    # Every stored part is sized up front, so the length is declared (and exact).
    assert int(head.headers["content-length"]) == len(got.content)
    assert head.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    search = httpx.head(f"{live_server.dicomweb_url}/studies", params={"limit": "1"})
    assert search.status_code == 200 and search.content == b""
    assert search.headers["content-type"] == "application/dicom+json"
    missing = httpx.head(f"{live_server.dicomweb_url}/studies/{uid()}")
    assert missing.status_code == 404


def test_retrieve_with_the_client(live_server: LiveServer, world: World, client: DICOMwebClient):
    as_stored = (("application/dicom", "*"),)
    study = client.retrieve_study(world.study, media_types=as_stored)
    assert {ds.SOPInstanceUID for ds in study} == {i.sop for i in world.items.values()}
    item = world["j2k_multi"]
    series = client.retrieve_series(item.study, item.series, media_types=as_stored)
    assert [ds.SOPInstanceUID for ds in series] == [item.sop]
    ds = client.retrieve_instance(item.study, item.series, item.sop, media_types=as_stored)
    assert ds.file_meta.TransferSyntaxUID == item.ds.file_meta.TransferSyntaxUID
    assert ds.PixelData == item.ds.PixelData


@pytest.mark.parametrize("name", ["j2k_multi", "rle_rgb", "j2k_ybr", "jls_multi", "frag_nobot"])
def test_transcoding_to_explicit_vr_little_endian(
    live_server: LiveServer, world: World, client: DICOMwebClient, name: str
):
    item = world[name]
    # No transfer-syntax parameter means Explicit VR Little Endian (PS3.18 8.7.3).
    response = httpx.get(
        _instance_url(live_server, item),
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=60,
    )
    [(headers, content)] = split_multipart(response)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EVRLE}"
    default = pydicom.dcmread(io.BytesIO(content))
    explicit = client.retrieve_instance(
        item.study, item.series, item.sop, media_types=(("application/dicom", EVRLE),)
    )
    original = item.ds
    for ds in (default, explicit):
        assert ds.file_meta.TransferSyntaxUID == EVRLE
        assert ds.SOPInstanceUID == item.sop
        assert "PixelData" in ds and not ds["PixelData"].is_undefined_length
        np.testing.assert_array_equal(pixels(ds), pixels(original))
        assert ds.PatientID == original.PatientID


def test_native_instance_requested_as_explicit_le_is_stored_bytes(
    live_server: LiveServer, world: World
):
    item = world["native_multi"]
    url = _instance_url(live_server, item)
    response = httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    [(headers, content)] = split_multipart(response)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EVRLE}"
    assert content.endswith(dataset_bytes(item.path))


def test_unsupported_transfer_syntax_is_406(live_server: LiveServer, world: World):
    url = _instance_url(live_server, world["j2k_multi"])
    jpeg_baseline = "1.2.840.10008.1.2.4.50"
    response = httpx.get(
        url,
        headers={
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={jpeg_baseline}'
        },
    )
    assert response.status_code == 406
    assert "transfer-syntax=*" in response.json()["message"]
    for accept in ("application/dicom+json", 'multipart/related; type="image/png"'):
        assert httpx.get(url, headers={"Accept": accept}).status_code == 406


# -- metadata and bulk data ------------------------------------------------------------
def _metadata(url: str) -> list[dict]:
    """Metadata fetched with a correct Host header. (dicomweb-client sends ``Host``
    without the port on GETs, so absolute URIs built from it would lack the port.)"""
    response = httpx.get(url, headers={"Accept": "application/dicom+json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    return response.json()


def test_metadata_with_bulkdata_uris_that_resolve(
    live_server: LiveServer, world: World, client: DICOMwebClient
):
    base = live_server.dicomweb_url
    study = client.retrieve_study_metadata(world.study)
    assert {m["00080018"]["Value"][0] for m in study} == {i.sop for i in world.items.values()}
    again = _metadata(f"{base}/studies/{world.study}/metadata")
    assert [m["00080018"] for m in again] == [m["00080018"] for m in study]
    native = world["native_multi"]
    [meta] = client.retrieve_series_metadata(native.study, native.series)
    assert meta["00083002"]["Value"] == [EVRLE]
    assert meta["00100020"]["Value"] == ["WADO1"]
    [meta] = _metadata(f"{base}/studies/{native.study}/series/{native.series}/metadata")
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith(base + "/studies/")
    [data] = client.retrieve_bulkdata(uri)
    assert data == native.ds.PixelData

    item = world["ct_private"]
    meta = client.retrieve_instance_metadata(item.study, item.series, item.sop)
    assert set(meta["00091001"]) == {"vr", "BulkDataURI"}
    [meta] = _metadata(f"{_instance_url(live_server, item)}/metadata")
    private = meta["00091001"]
    assert private["vr"] == "OB" and private["BulkDataURI"].startswith(base)
    [value] = client.retrieve_bulkdata(private["BulkDataURI"])
    assert value == bytes(range(256)) * 16
    nested = meta["00400275"]["Value"][0]["00091001"]
    [value] = client.retrieve_bulkdata(nested["BulkDataURI"])
    assert value == b"\x01\x02" * 1500
    # Pixel data of a compressed instance is bulk data too, served uncompressed by default.
    j2k = world["j2k_multi"]
    [meta] = _metadata(f"{_instance_url(live_server, j2k)}/metadata")
    assert meta["7FE00010"]["vr"] in ("OB", "OW")
    [raw] = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert raw == pixels(j2k.ds).tobytes()


def test_metadata_behind_a_proxy(live_server: LiveServer, world: World):
    item = world["native_multi"]
    url = f"{live_server.dicomweb_url}/studies/{item.study}/series/{item.series}/metadata"
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org:8443"}
    # Not trusted unless configured: the URIs keep pointing at this server.
    untrusted = httpx.get(url, headers=forwarded).json()
    assert untrusted[0]["7FE00010"]["BulkDataURI"].startswith(live_server.dicomweb_url)
    live_server.settings.trust_forwarded_headers = True
    try:
        _check_forwarded_metadata(live_server, item, url, forwarded)
    finally:
        live_server.settings.trust_forwarded_headers = False


def _check_forwarded_metadata(live_server: LiveServer, item, url: str, forwarded) -> None:
    response = httpx.get(url, headers=forwarded)
    [meta] = response.json()
    uri = meta["7FE00010"]["BulkDataURI"]
    prefix = live_server.settings.dicomweb_prefix
    assert uri.startswith(f"https://pacs.example.org:8443{prefix}/studies/{item.study}/")
    # A malformed forwarded host is ignored.
    response = httpx.get(url, headers={"X-Forwarded-Host": 'evil"host/x'})
    assert response.json()[0]["7FE00010"]["BulkDataURI"].startswith(live_server.dicomweb_url)


def test_series_metadata_is_cached_and_follows_new_instances(live_server: LiveServer, world: World):
    store = live_server.archive.store
    item = world["ct_private"]
    url = f"{live_server.dicomweb_url}/studies/{item.study}/series/{item.series}/metadata"
    assert len(httpx.get(url).json()) == 1
    keys = list(store.iter_keys(f"metadata/{item.study}/{item.series}/"))
    assert len(keys) == 1 and keys[0].endswith(".json.gz")
    # A second instance in the series: the cached copy is replaced.
    extra = ct_slice(
        study_uid=item.study,
        series_uid=item.series,
        instance_number=2,
        patient_id="WADO1",
        issuer="TEST",
        rows=32,
        columns=32,
    )
    live_server.archive.ingest_file(write(extra, live_server.tmp_path / "x.dcm"), TEST_SOURCE)
    got = httpx.get(url).json()
    assert {m["00080018"]["Value"][0] for m in got} == {item.sop, extra.SOPInstanceUID}
    new_keys = list(store.iter_keys(f"metadata/{item.study}/{item.series}/"))
    assert len(new_keys) == 1 and new_keys != keys


# -- frames ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["native_multi", "j2k_multi", "rle_multi", "jls_multi", "frag_bot", "frag_nobot"]
)
def test_frames_as_stored(live_server: LiveServer, world: World, client: DICOMwebClient, name: str):
    item = world[name]
    originals = original_frames(item)
    wanted = [1, 3, item.frames]
    got = client.retrieve_instance_frames(
        item.study,
        item.series,
        item.sop,
        frame_numbers=wanted,
        media_types=(("application/octet-stream", "*"),),
    )
    assert got == [originals[n - 1] for n in wanted]
    response = httpx.get(
        f"{_instance_url(live_server, item)}/frames/2",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    [(headers, content)] = split_multipart(response)
    ts = item.ds.file_meta.TransferSyntaxUID
    media = {
        "1.2.840.10008.1.2.4.90": "image/jp2",
        "1.2.840.10008.1.2.4.80": "image/jls",
        "1.2.840.10008.1.2.5": "image/dicom-rle",
    }.get(ts, "application/octet-stream")
    shown_ts = ts if ts.is_encapsulated else EVRLE
    assert headers["content-type"] == f"{media}; transfer-syntax={shown_ts}"
    assert response.headers["content-type"].startswith(f'multipart/related; type="{media}"')
    assert content == originals[1]


def test_frames_recorded_at_ingest(live_server: LiveServer, world: World):
    from gateway.archive.retrieve import get_instance

    for name in ("native_multi", "j2k_multi", "rle_multi", "frag_bot", "frag_nobot", "ct"):
        item = world[name]
        inst = get_instance(live_server.archive.db, item.study, item.series, item.sop)
        ranges = decode_ranges(inst.frame_offsets)
        assert ranges is not None and len(ranges) == item.frames, name


@pytest.mark.parametrize("name", ["native_multi", "j2k_multi", "frag_bot", "rle_rgb"])
def test_frames_uncompressed(
    live_server: LiveServer, world: World, client: DICOMwebClient, name: str
):
    item = world[name]
    expected = pixels(item.ds)
    if item.frames == 1:
        expected = expected[np.newaxis]
    got = client.retrieve_instance_frames(
        item.study, item.series, item.sop, frame_numbers=[item.frames, 1]
    )
    assert got == [expected[item.frames - 1].tobytes(), expected[0].tobytes()]
    # An image media type the frames are not stored in cannot be made here.
    if name != "j2k_multi":
        return
    url = f"{_instance_url(live_server, item)}/frames/1"
    assert (
        httpx.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'}).status_code
        == 406
    )
    response = httpx.get(url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert split_multipart(response)[0][1] == original_frames(item)[0]


def test_frame_numbers_out_of_range_are_400(live_server: LiveServer, world: World):
    item = world["native_multi"]
    base = _instance_url(live_server, item)
    for frames in ("0", "11", "1,11", "a", "1,,2", "-1"):
        response = httpx.get(f"{base}/frames/{frames}")
        assert response.status_code == 400, frames


# -- rendered and thumbnails ----------------------------------------------------------
def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_rendered_instance_and_frame(live_server: LiveServer, world: World, client: DICOMwebClient):
    ct = world["ct"]
    data = client.retrieve_instance_rendered(
        ct.study, ct.series, ct.sop, media_types=("image/jpeg",)
    )
    image = _image(data)
    assert image.format == "JPEG" and image.size == (128, 128)
    lo, hi = image.convert("L").getextrema()
    assert hi - lo > 50  # not blank
    data = client.retrieve_instance_rendered(
        ct.study,
        ct.series,
        ct.sop,
        media_types=("image/png",),
        params={"viewport": "64,32", "window": "40,400,linear"},
    )
    image = _image(data)
    assert image.format == "PNG" and image.size == (32, 32)
    multi = world["j2k_multi"]
    data = client.retrieve_instance_frames_rendered(
        multi.study, multi.series, multi.sop, frame_numbers=[5], media_types=("image/png",)
    )
    image = _image(data)
    assert image.size == (64, 64) and image.getextrema()[1] > 0
    # RGB stays RGB, exactly (PNG is lossless).
    rgb = world["rle_rgb"]
    data = client.retrieve_instance_rendered(
        rgb.study, rgb.series, rgb.sop, media_types=("image/png",)
    )
    image = _image(data)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels(rgb.ds))


def test_rendered_study_and_series_are_the_representative_image(
    live_server: LiveServer, world: World, client: DICOMwebClient
):
    study, series = uid(), uid()
    items = []
    for number in (1, 2, 3):
        ds = ct_slice(study_uid=study, series_uid=series, patient_id="WADO2", issuer="TEST")
        ds.InstanceNumber = number
        ds.PixelData = (np.full((64, 64), number * 1000, dtype=np.uint16)).tobytes()
        items.append(_ingest(live_server, ds, f"rendered-{number}"))
    middle = items[1]
    expected = client.retrieve_instance_rendered(
        study, series, middle.sop, media_types=("image/png",), params={"window": "1000,4000"}
    )
    # The real client reads a rendered series as one image.
    data = client.retrieve_series_rendered(
        study, series, media_types=("image/png",), params={"window": "1000,4000"}
    )
    assert data == expected
    assert _image(data).size == (64, 64)
    response = httpx.get(
        f"{live_server.dicomweb_url}/studies/{study}/rendered",
        params={"window": "1000,4000", "viewport": "32,32"},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert _image(response.content).size == (32, 32)
    assert "etag" in response.headers
    missing = httpx.get(f"{live_server.dicomweb_url}/studies/{uid()}/rendered")
    assert missing.status_code == 404


def test_rendered_window_and_monochrome1(live_server: LiveServer, world: World):
    study = world.study
    series = uid()
    two = []
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        ds = ct_slice(study_uid=study, series_uid=series, patient_id="WADO1", issuer="TEST")
        ds.PhotometricInterpretation = photometric
        ds.PixelData = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).tobytes()
        two.append(_ingest(live_server, ds, photometric))
    images = []
    for item in two:
        response = httpx.get(
            f"{_instance_url(live_server, item)}/rendered",
            params={"window": "1000,2000"},
            headers={"Accept": "image/png"},
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        images.append(np.asarray(_image(response.content), dtype=int))
    m2, m1 = images
    assert m2.min() == 0 and m2.max() == 255
    np.testing.assert_array_equal(m1, 255 - m2)
    for bad in (
        {"window": "40"},
        {"viewport": "0,10"},
        {"quality": "101"},
        {"window": "1,2,cubic"},
    ):
        url = f"{_instance_url(live_server, two[0])}/rendered"
        assert httpx.get(url, params=bad).status_code == 400, bad
    url = f"{_instance_url(live_server, two[0])}/rendered"
    assert httpx.get(url, headers={"Accept": "image/webp"}).status_code == 406


def test_accept_query_parameter_wins_over_the_header(live_server: LiveServer, world: World):
    """PS3.18 8.3.3.1: OHIF asks ...?accept=image/jpeg with a multipart Accept header."""
    url = f"{_instance_url(live_server, world['ct'])}/thumbnail?accept=image%2Fjpeg"
    header = {"Accept": 'multipart/related; type="application/octet-stream"'}
    response = httpx.get(url, headers=header)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    png = httpx.get(url.replace("image%2Fjpeg", "image%2Fpng"), headers=header)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_thumbnails(live_server: LiveServer, world: World):
    base = live_server.dicomweb_url
    ct = world["ct"]
    urls = [
        f"{base}/studies/{world.study}/thumbnail",
        f"{base}/studies/{ct.study}/series/{ct.series}/thumbnail",
        f"{_instance_url(live_server, ct)}/thumbnail",
        f"{_instance_url(live_server, world['j2k_multi'])}/frames/3/thumbnail",
    ]
    for url in urls:
        response = httpx.get(url)
        assert response.status_code == 200, url
        image = _image(response.content)
        assert image.format == "JPEG" and max(image.size) == 128
        assert httpx.get(url).content == response.content
    assert any(live_server.archive.store.iter_keys("thumbnails/"))
    response = httpx.get(urls[2], params={"viewport": "64,64"}, headers={"Accept": "image/png"})
    assert _image(response.content).size == (64, 64)


# -- WADO-URI --------------------------------------------------------------------------
def test_wado_uri(live_server: LiveServer, world: World):
    url = f"{live_server.dicomweb_url}/wado"
    item = world["j2k_multi"]
    ids = {"requestType": "WADO", "studyUID": item.study, "seriesUID": item.series}
    ids["objectUID"] = item.sop
    response = httpx.get(url, params={**ids, "contentType": "application/dicom"})
    assert response.status_code == 200
    ds = pydicom.dcmread(io.BytesIO(response.content))
    assert ds.file_meta.TransferSyntaxUID == EVRLE
    np.testing.assert_array_equal(ds.pixel_array, pixels(item.ds))
    stored_ts = str(item.ds.file_meta.TransferSyntaxUID)
    response = httpx.get(
        url, params={**ids, "contentType": "application/dicom", "transferSyntax": stored_ts}
    )
    assert response.content.endswith(dataset_bytes(item.path))
    response = httpx.get(url, params=ids)
    assert response.headers["content-type"] == "image/jpeg"
    assert _image(response.content).size == (64, 64)
    response = httpx.get(
        url,
        params={
            **ids,
            "contentType": "image/png",
            "frameNumber": "4",
            "rows": "32",
            "windowCenter": "200",
            "windowWidth": "400",
        },
    )
    assert _image(response.content).size == (32, 32)
    response = httpx.get(url, params={**ids, "contentType": "image/png", "region": "0,0,0.5,0.25"})
    assert _image(response.content).size == (32, 16)
    assert httpx.get(url, params={**ids, "requestType": "RS"}).status_code == 400
    assert httpx.get(url, params={"requestType": "WADO", "studyUID": item.study}).status_code == 400
    assert httpx.get(url, params={**ids, "objectUID": "1.2.3.4"}).status_code == 404
    assert httpx.get(url, params={**ids, "contentType": "text/html"}).status_code == 406
    assert httpx.get(url, params={**ids, "frameNumber": "99"}).status_code == 400


# -- caching headers, errors -----------------------------------------------------------
def test_etag_and_if_none_match(live_server: LiveServer, world: World):
    item = world["j2k_multi"]
    url = _instance_url(live_server, item)
    as_stored = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    response = httpx.get(url, headers=as_stored)
    digest = hashlib.sha256(dataset_bytes(item.path)).hexdigest()
    assert response.headers["etag"] == f'"{digest}"'
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    again = httpx.get(url, headers={**as_stored, "If-None-Match": f'"{digest}"'})
    assert again.status_code == 304 and again.content == b""
    # Another representation has another ETag.
    transcoded = httpx.get(url, headers={"If-None-Match": f'"{digest}"'})
    assert transcoded.status_code == 200 and transcoded.headers["etag"] != f'"{digest}"'
    for path, headers in (
        ("/frames/1,2", {}),
        ("/rendered", {"Accept": "image/jpeg"}),
        ("/metadata", {}),
    ):
        first = httpx.get(url + path, headers=headers)
        assert first.status_code == 200 and first.headers["etag"].startswith(f'"{digest}')
        second = httpx.get(url + path, headers={**headers, "If-None-Match": first.headers["etag"]})
        assert second.status_code == 304, path
        weak = httpx.get(
            url + path, headers={**headers, "If-None-Match": "W/" + first.headers["etag"]}
        )
        assert weak.status_code == 304, path


def test_pixel_data_is_never_gzipped(live_server: LiveServer, world: World):
    item = world["native_multi"]
    url = _instance_url(live_server, item)
    for path in ("", "/frames/1", "/bulk/7FE00010"):
        response = httpx.get(url + path, headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200
        assert "content-encoding" not in response.headers, path
    response = httpx.get(url + "/metadata", headers={"Accept-Encoding": "gzip"})
    assert response.headers.get("content-encoding") == "gzip"


def test_not_found_and_bad_uids(live_server: LiveServer, world: World):
    base = live_server.dicomweb_url
    item = world["ct"]
    missing = f"{ORG}999"
    not_found = [
        f"/studies/{missing}",
        f"/studies/{missing}/metadata",
        f"/studies/{item.study}/series/{missing}",
        f"/studies/{item.study}/series/{missing}/metadata",
        f"/studies/{item.study}/series/{item.series}/instances/{missing}",
        f"/studies/{item.study}/series/{item.series}/instances/{missing}/frames/1",
        f"/studies/{item.study}/series/{item.series}/instances/{missing}/rendered",
        f"/studies/{missing}/thumbnail",
        # the right instance under the wrong series
        f"/studies/{item.study}/series/{world['native_multi'].series}/instances/{item.sop}",
        f"/studies/{item.study}/series/{item.series}/instances/{item.sop}/bulk/00191099",
    ]
    for path in not_found:
        response = httpx.get(base + path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "not-found"
    bad = [
        "/studies/1.2.abc",
        "/studies/1..2",
        "/studies/%2E%2E",
        "/studies/..%2F..%2Fetc",
        f"/studies/{'1' * 65}",
        f"/studies/{item.study}/series/.1/metadata",
        f"/studies/{item.study}/series/{item.series}/instances/1.2.-3/frames/1",
        f"/studies/{item.study}/series/{item.series}/instances/{item.sop}/bulk/zz",
        f"/studies/{item.study}/series/{item.series}/instances/{item.sop}/bulk/../../x",
    ]
    for path in bad:
        response = httpx.get(base + path)
        # 400 naming the bad UID; a decoded "/" may also leave no route at all (404).
        assert response.status_code in (400, 404), path
    for path in (*bad[:3], *bad[4:7]):
        assert httpx.get(base + path).status_code == 400, path


def test_client_raises_on_errors(live_server: LiveServer, world: World, client: DICOMwebClient):
    with pytest.raises(ClientHTTPError):
        client.retrieve_study(f"{ORG}999")
    with pytest.raises(ClientHTTPError):
        client.retrieve_instance_frames(
            world["ct"].study, world["ct"].series, world["ct"].sop, frame_numbers=[2]
        )


def _traced_download(url: str, accept: str) -> tuple[int, int]:
    """Bytes received and peak traced allocation (server and client share the process)."""
    tracemalloc.start()
    try:
        received = 0
        with httpx.stream("GET", url, headers={"Accept": accept}, timeout=120) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw(256 * 1024):
                received += len(chunk)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return received, peak


@pytest.mark.slow
def test_streaming_a_large_study_keeps_memory_flat(live_server: LiveServer):
    """About 100 MB through the live server (same process), as stored and converted
    from RLE frame by frame: traced allocations stay far below the study's size."""
    study = uid()
    size = 0
    series = uid()
    for n in range(1, 7):
        ds = ct_slice(
            study_uid=study, series_uid=series, instance_number=n, rows=2048, columns=2048
        )
        ds.NumberOfFrames = 2
        rng = np.random.default_rng(n)
        ds.PixelData = rng.integers(0, 4096, (2, 2048, 2048), np.uint16).tobytes()
        path = write(ds, live_server.tmp_path / "big" / f"{n}.dcm")
        size += path.stat().st_size
        live_server.archive.ingest_file(path, TEST_SOURCE, owned=True)
    started = time.monotonic()
    received, peak = _traced_download(
        f"{live_server.dicomweb_url}/studies/{study}",
        'multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert received > size
    assert peak < 24 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB study"
    assert time.monotonic() - started < 60

    # One RLE instance of 48 frames (96 MB decoded), converted to Explicit VR LE.
    rle = ct_slice(study_uid=uid(), patient_id="BIG2", rows=1024, columns=1024)
    frames = 48
    rle.NumberOfFrames = frames
    yy, xx = np.mgrid[0:1024, 0:1024]
    stack = np.stack([((xx + yy + k * 10) % 4096).astype(np.uint16) for k in range(frames)])
    rle.compress("1.2.840.10008.1.2.5", stack, encoding_plugin="pylibjpeg")
    del stack
    result = live_server.archive.ingest_file(
        write(rle, live_server.tmp_path / "big" / "rle.dcm"), TEST_SOURCE
    )
    received, peak = _traced_download(
        f"{live_server.dicomweb_url}/studies/{result.study_uid}",
        'multipart/related; type="application/dicom"',
    )
    assert received > frames * 1024 * 1024 * 2
    assert peak < 40 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB converting 96 MB of frames"


# -- units -----------------------------------------------------------------------------
@pytest.mark.fast
def test_accept_parsing():
    ranges = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5, '
        'multipart/related; type="application/dicom; transfer-syntax=1.2.840.10008.1.2.1", '
        "image/png;q=0"
    )
    assert [(r.part_type, r.transfer_syntax, r.q) for r in ranges] == [
        ("application/dicom", EVRLE, 1.0),
        ("application/dicom", "*", 0.5),
    ]
    assert dicom_syntaxes(None) == [EVRLE]
    assert dicom_syntaxes("*/*") == [EVRLE]
    assert dicom_syntaxes('multipart/related; type="application/dicom"; transfer-syntax=*') == ["*"]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("accept", "stored", "mode", "media"),
    [
        (None, "1.2.840.10008.1.2.4.90", "uncompressed", "application/octet-stream"),
        ("*/*", "1.2.840.10008.1.2.4.90", "uncompressed", "application/octet-stream"),
        (
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            "1.2.840.10008.1.2.4.90",
            "stored",
            "image/jp2",
        ),
        ('multipart/related; type="image/jp2"', "1.2.840.10008.1.2.4.91", "stored", "image/jp2"),
        (
            'multipart/related; type="image/x-dicom-rle"',
            "1.2.840.10008.1.2.5",
            "stored",
            "image/dicom-rle",
        ),
        (
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            "1.2.840.10008.1.2",
            "uncompressed",
            "application/octet-stream",
        ),
        ('multipart/related; type="image/jpeg"', "1.2.840.10008.1.2.4.90", None, None),
    ],
)
def test_frame_negotiation(accept, stored, mode, media):
    from dicomweb.errors import HTTPError

    if mode is None:
        with pytest.raises(HTTPError) as info:
            frame_choice(accept, stored)
        assert info.value.status == 406
        return
    choice = frame_choice(accept, stored)
    assert (choice.mode, choice.media_type) == (mode, media)


@pytest.mark.fast
def test_encapsulated_frame_boundaries():
    # Two frames of two fragments each: items at 100 (BOT empty) ...
    fragments = [(108, 10), (126, 20), (154, 10), (172, 30)]
    layout = Layout(size=300, dataset_offset=0, file_meta=None, transfer_syntax="")
    layout.pixel_offset = 90
    layout.fragments = fragments
    layout.basic_offset_table = [0, 46]
    assert _encapsulated_ranges(None, layout, 2) == [(100, 46), (146, 56)]
    assert _encapsulated_ranges(None, layout, 1) == [(100, 102)]
    assert _encapsulated_ranges(None, layout, 4) == [(100, 18), (118, 28), (146, 18), (164, 38)]
    layout.basic_offset_table = [0, 45]  # not an item boundary: not trusted
    assert _encapsulated_ranges(None, layout, 2) is None


@pytest.mark.fast
def test_window_functions_and_parameters():
    values = np.array([-1000.0, 39.5, 40.0, 240.0, 1000.0])
    out = _apply_window(values, Window(40, 400))
    assert out[0] == 0 and out[-1] == 255 and 120 <= out[2] <= 135
    exact = _apply_window(np.array([-160.0, 40.0, 240.0]), Window(40, 400, "LINEAR_EXACT"))
    assert list(exact) == [0, 128, 255]
    sigmoid = _apply_window(np.array([40.0]), Window(40, 400, "SIGMOID"))
    assert sigmoid[0] == 128
    assert parse_window("40,400,LINEAR_EXACT") == Window(40.0, 400.0, "LINEAR_EXACT")
    assert parse_viewport("512,256").width == 512
    assert parse_viewport("10,10,0,0,5,5").region == (0, 0, 5, 5)


@pytest.mark.fast
def test_multipart_writer_sized_parts_and_content_length(tmp_path: Path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"0123456789")
    sized = Part("a/b", size=10, source=lambda: blob.open("rb"))
    writer = MultipartWriter("a/b", boundary="b1")
    body = b"".join(writer.iter_body([sized, sized], chunk_size=4))
    part = b"--b1\r\nContent-Type: a/b\r\n\r\n0123456789\r\n"
    assert body == part + part + b"--b1--\r\n"
    assert writer.content_length([sized, sized]) == len(body)
    # An unsized part (e.g. transcoded) makes the length unknown; framing is the same.
    mixed = [sized, Part("a/b", [b"0123", b"456789"])]
    assert writer.content_length(mixed) is None
    assert b"".join(writer.iter_body(mixed)) == body
    # A blob shorter than its recorded size is an error, not a short part.
    short = Part("a/b", size=11, source=lambda: blob.open("rb"))
    with pytest.raises(OSError, match="1 bytes before"):
        b"".join(writer.iter_body([short]))
    long = Part("a/b", size=9, source=lambda: blob.open("rb"))
    with pytest.raises(OSError, match="longer than its recorded size"):
        b"".join(writer.iter_body([long]))


@pytest.mark.fast
def test_batched_stream_sends_everything_and_closes_the_source():
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from dicomweb.streaming import BatchedStream

    closed = []

    def chunks():
        try:
            for i in range(50):
                yield bytes([i]) * 1000
        finally:
            closed.append(True)

    def endpoint(request):
        return BatchedStream(chunks(), media_type="x/y", content_length=50_000, batch_size=3000)

    with TestClient(Starlette(routes=[Route("/", endpoint)])) as client:
        response = client.get("/")
    assert response.headers["content-length"] == "50000"
    assert response.content == b"".join(bytes([i]) * 1000 for i in range(50))
    assert closed == [True]


@pytest.mark.fast
def test_multipart_writer_frames_parts():
    writer = MultipartWriter("application/dicom", boundary="b0")
    body = b"".join(
        writer.iter_body([Part("application/dicom", [b"ab", b"c"]), Part("x/y", [b""])])
    )
    assert body == (
        b"--b0\r\nContent-Type: application/dicom\r\n\r\nabc\r\n"
        b"--b0\r\nContent-Type: x/y\r\n\r\n\r\n--b0--\r\n"
    )
    assert writer.content_type == 'multipart/related; type="application/dicom"; boundary=b0'
    assert json.loads("[]") == []


def _ranged(url: str, headers: dict[str, str], spec: str, **extra: str) -> httpx.Response:
    return httpx.get(url, headers={**headers, "Range": spec, **extra})


def test_range_requests_on_an_instance_and_bulk_data(live_server: LiveServer, world: World):
    """One instance as stored and bulk data values answer byte ranges (206, 416), and
    the pieces put together are the whole body, byte for byte."""
    item = world["native_multi"]
    url = _instance_url(live_server, item)
    as_stored = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    whole = httpx.get(url, headers=as_stored)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    body, total = whole.content, len(whole.content)
    assert int(whole.headers["content-length"]) == total
    [(_, stored)] = split_multipart(whole)
    assert stored == item.path.read_bytes()[-len(stored) :]
    etag = whole.headers["etag"]

    pieces = []
    for spec, lo, hi in (
        ("bytes=0-99", 0, 100),
        ("bytes=100-5000", 100, 5001),
        (f"bytes=5001-{total - 51}", 5001, total - 50),
        ("bytes=-50", total - 50, total),
    ):
        part = _ranged(url, as_stored, spec)
        assert part.status_code == 206, spec
        assert part.headers["content-range"] == f"bytes {lo}-{hi - 1}/{total}"
        assert part.headers["content-type"] == whole.headers["content-type"]  # one boundary
        assert part.headers["etag"] == etag
        assert part.content == body[lo:hi], spec
        pieces.append(part.content)
    assert b"".join(pieces) == body
    assert _ranged(url, as_stored, "bytes=1000-").content == body[1000:]
    assert _ranged(url, as_stored, f"bytes=10-{total + 500}").content == body[10:]
    assert _ranged(url, as_stored, "bytes=10-20", **{"If-Range": etag}).status_code == 206

    beyond = _ranged(url, as_stored, f"bytes={total}-")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{total}"
    assert beyond.json()["error"] == "range-not-satisfiable"
    # Taken as a plain GET: several ranges, another unit, bad syntax, a stale If-Range.
    for spec, extra in (
        ("bytes=0-9,20-29", {}),
        ("items=0-9", {}),
        ("bytes=9-2", {}),
        ("bytes=0-9", {"If-Range": '"not-the-etag"'}),
    ):
        plain = _ranged(url, as_stored, spec, **extra)
        assert plain.status_code == 200 and plain.content == body, spec

    # Uncompressed pixel data of a native instance: the stored pixel bytes, by range.
    pixels_url = url + "/bulk/7FE00010"
    full = httpx.get(pixels_url)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    [(_, pixel_bytes)] = split_multipart(full)
    assert pixel_bytes == item.ds.PixelData
    size = len(full.content)
    middle = _ranged(pixels_url, {}, f"bytes={size // 2}-{size // 2 + 4095}")
    assert (
        middle.status_code == 206 and middle.content == full.content[size // 2 : size // 2 + 4096]
    )
    # An attribute's bulk data value.
    private = world["ct_private"]
    value_url = _instance_url(live_server, private) + "/bulk/00091001"
    value = httpx.get(value_url)
    tail = _ranged(value_url, {}, "bytes=-300")
    assert tail.status_code == 206 and tail.content == value.content[-300:]

    # A representation built while it is sent (transcoded) has no ranges: 200, whole.
    j2k = _instance_url(live_server, world["j2k_multi"])
    transcoded = _ranged(j2k, {}, "bytes=0-99")
    assert transcoded.status_code == 200 and "accept-ranges" not in transcoded.headers
    assert len(split_multipart(transcoded)) == 1
