"""STOW-RS against a live server: the real dicomweb-client for what should work, raw
httpx and sockets for what should not.

Every refusal is a precise 4xx (never a 5xx), leaves nothing half stored (no index
row, no blob, no staging file) and the server goes on serving. The study stored by
STOW-RS is then found and moved by dcmtk's findscu/movescu against
``studybridge serve``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from dicomweb import stow
from dicomweb.multipart_parser import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_media_type,
)
from gateway.archive import Archive, Level, Query, RetrieveRequest
from gateway.archive.errors import IndexUnavailable, StorageUnavailable
from gateway.archive.models import Instance
from gateway.peers import PeerRegistry
from gateway.tasks.derived import PREPARE_SERIES
from tests.conftest import ServeStack
from tests.dicomweb.conftest import TEST_INSTITUTION, LiveServer, institution_token
from tests.factories import ct_series, ct_slice, dataset_bytes, uid
from tests.gateway.archive.helpers import all_files, count
from tests.servers import Gateway, require_tool, run_tool, running_gateway, storescp

B = "sb-boundary-4f2a"
CT = f'multipart/related; type="application/dicom"; boundary={B}'
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
# Also on PostgreSQL + S3 (tests/conftest.py).
pytestmark = pytest.mark.production

REAL_FILES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "gdcm-US-ALOKA-16.dcm",  # implicit VR little endian
    "image_dfl.dcm",  # deflated
    "SC_rgb_rle.dcm",  # RLE lossless
    "JPEG2000.dcm",  # JPEG 2000
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS, enhanced multi-frame
    "waveform_ecg.dcm",  # not an image
]


# -- helpers ---------------------------------------------------------------------------
def encode(ds: Dataset) -> bytes:
    """The bytes dicomweb-client sends for ``ds`` (it calls ``pydicom.dcmwrite``)."""
    with io.BytesIO() as out:
        pydicom.dcmwrite(out, ds)
        return out.getvalue()


def part10(ds: Dataset) -> bytes:
    with io.BytesIO() as out:
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        return out.getvalue()


def body_of(
    *parts: bytes | tuple[dict[str, str], bytes],
    boundary: str = B,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    close: bool = True,
) -> bytes:
    out = io.BytesIO()
    out.write(preamble)
    for part in parts:
        headers, data = (
            part if isinstance(part, tuple) else ({"Content-Type": "application/dicom"}, part)
        )
        out.write(f"\r\n--{boundary}\r\n".encode())
        for name, value in headers.items():
            out.write(f"{name}: {value}\r\n".encode())
        out.write(b"\r\n")
        out.write(data)
    if close:
        out.write(f"\r\n--{boundary}--\r\n".encode())
    out.write(epilogue)
    return out.getvalue()


def post(
    live: LiveServer, body: bytes, *, path: str = "/studies", **headers: str
) -> httpx.Response:
    hdrs = {"Content-Type": CT, "Accept": "application/dicom+json", **headers}
    return httpx.post(live.dicomweb_url + path, content=body, headers=hdrs, timeout=30)


def dicom_json(response: httpx.Response) -> Dataset:
    assert response.headers["content-type"] == "application/dicom+json"
    return Dataset.from_json(response.json())


def stored_uids(archive: Archive) -> set[str]:
    with archive.db.reading() as session:
        return set(session.scalars(select(Instance.sop_uid)))


def staging_files(live: LiveServer) -> list[Path]:
    return all_files(live.settings.staging_dir)


def blob_files(live: LiveServer) -> list[object]:
    """Every blob; on the filesystem store hidden partial copies count too."""
    if live.settings.blob_store == "file":
        return list(all_files(live.settings.resolved_blob_dir))
    return sorted(live.archive.store.iter_keys())


def assert_nothing_stored(live: LiveServer) -> None:
    assert count(live.archive, Instance) == 0
    assert blob_files(live) == []
    assert staging_files(live) == []


def assert_serving(live: LiveServer) -> None:
    """The server still answers, and still stores."""
    assert httpx.get(live.url + "/healthz", timeout=10).status_code == 200
    ds = ct_slice()
    response = post(live, body_of(part10(ds)))
    assert response.status_code == 200, response.text
    assert ds.SOPInstanceUID in stored_uids(live.archive)


def blob_dataset(archive: Archive, sop_uid: str) -> bytes:
    (inst,) = archive.find_instances(RetrieveRequest(level=Level.IMAGE, sop_uids=[sop_uid]))
    with archive.store.open(inst.blob_key) as fh:
        fh.seek(inst.dataset_offset)
        return fh.read()


def sent_dataset(data: bytes, tmp: Path) -> bytes:
    path = tmp / f"sent-{uid()}.dcm"
    path.write_bytes(data)
    return dataset_bytes(path)


def failure_reasons(ds: Dataset) -> list[int]:
    return [int(item.FailureReason) for item in ds.get("FailedSOPSequence", [])]


# -- the multipart parser --------------------------------------------------------------
def _parse(body: bytes, chunk: int, boundary: str = B) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    current: bytearray | None = None
    for i in range(0, len(body), chunk):
        for event in parser.feed(body[i : i + chunk]):
            if isinstance(event, PartStart):
                current = bytearray()
                parts.append((event.headers, b""))
            elif isinstance(event, PartData):
                assert current is not None
                current += event.data
            else:
                assert isinstance(event, PartEnd) and current is not None
                parts[-1] = (parts[-1][0], bytes(current))
                current = None
    parser.close()
    return parts


@pytest.mark.fast
def test_parser_finds_boundaries_across_every_chunk_edge() -> None:
    # Near misses of the delimiter "\r\n--sb-boundary-4f2a", the last one at the very end.
    tricky = b"\r\n--sb-boundary-4f2\r\n--sb-boundary-4f2b\n--sb-boundary-4f2a\r\n-\r\n--"
    contents = [b"first", b"", tricky, bytes(range(256)) * 3, b"--" + B.encode()]
    body = body_of(
        *[
            ({"Content-Type": "application/dicom", "X-N": str(i)}, c)
            for i, c in enumerate(contents)
        ],
        preamble=b"ignored preamble",
        epilogue=b"\r\nignored epilogue --" + B.encode() + b"\r\n",
    )
    for chunk in [1, 2, 3, 5, 7, 16, 19, 20, 21, 64, len(body)]:
        parts = _parse(body, chunk)
        assert [p[1] for p in parts] == contents, chunk
        assert [p[0]["x-n"] for p in parts] == [str(i) for i in range(len(contents))]


@pytest.mark.fast
def test_parser_accepts_delimiter_at_start_padding_empty_headers_and_folding() -> None:
    body = (
        f"--{B}  \t\r\nContent-Type: application/dicom;\r\n transfer-syntax=1.2.840.10008.1.2.1\r\n\r\nA"
        f"\r\n--{B}\r\n\r\nB\r\n--{B}--"
    ).encode()
    parts = _parse(body, 4)
    assert parts[0] == (
        {"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"},
        b"A",
    )
    assert parts[1] == ({}, b"B")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "no multipart boundary"),
        (b"garbage " * 10_000, "no multipart boundary delimiter in the first"),
        (f"--{B}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(), "inside a part"),
        (f"--{B}\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--{B}\r\n".encode(), "closing"),
        (f"--{B}\r\nContent-Type: application/dicom\r\n".encode(), "closing"),
        (f"--{B}xyz\r\n\r\nabc\r\n--{B}--".encode(), "not followed by a line break"),
        (f"--{B}\r\nno colon here\r\n\r\nabc\r\n--{B}--".encode(), "malformed part header"),
        (f"--{B}\r\nX: {'y' * 20_000}\r\n\r\nabc\r\n--{B}--".encode(), "headers too long"),
    ],
)
def test_parser_refuses_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        _parse(body, 7)


@pytest.mark.fast
def test_parser_holds_only_a_delimiter_of_a_large_part() -> None:
    parser = MultipartParser(B)
    parser.feed(f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    received = 0
    chunk = b"\x00\r\n-" * 16384
    for _ in range(200):  # 12.5 MiB through the parser
        for event in parser.feed(chunk):
            assert isinstance(event, PartData)
            received += len(event.data)
        assert parser.pending_bytes < len(B) + 4
    assert received > 200 * len(chunk) - len(B) - 4


@pytest.mark.fast
def test_media_type_parameters_quoted_or_not() -> None:
    assert parse_media_type('Multipart/Related; TYPE="application/dicom"; boundary="a b;c"') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "a b;c"},
    )
    assert parse_media_type("multipart/related;type=application/dicom;boundary=xyz") == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "xyz"},
    )
    assert parse_media_type(r'a/b; x="q\"uote"') == ("a/b", {"x": 'q"uote'})
    for bad in ["multipart", "a/b; x", 'a/b; x="open', "a/b; x=1 2"]:
        with pytest.raises(MultipartError):
            parse_media_type(bad)


@pytest.mark.fast
def test_failure_reason_table() -> None:
    from gateway.archive import errors

    assert stow.failure_reason(errors.StorageUnavailable("x")) == 0xA700
    assert stow.failure_reason(errors.IndexUnavailable("x")) == 0xA701
    assert stow.failure_reason(errors.NotStorageSOPClass("x")) == 0x0122
    assert stow.failure_reason(errors.MissingAttribute("x")) == 0xA900
    assert stow.failure_reason(errors.InvalidUID("x")) == 0xC002
    assert stow.failure_reason(errors.InvalidDataset("x")) == 0xC000
    assert stow.failure_reason(errors.InstanceConflict("x")) == 0xC010
    assert stow.failure_reason(errors.PatientMismatch("x")) == 0xC011
    assert stow.failure_reason(RuntimeError("x")) == 0x0110


# -- storing with the real client ------------------------------------------------------
def test_dicomweb_client_stores_synthetic_and_real_files(
    live_server: LiveServer, tmp_path: Path
) -> None:
    """A synthetic series big enough for the client's chunked upload, then pydicom's
    real files in several transfer syntaxes; the stored data sets are the bytes sent."""
    live = live_server
    client = DICOMwebClient(live.dicomweb_url)
    study = uid()
    series = [
        pydicom.dcmread(p)
        for p in ct_series(tmp_path / "in", 12, study_uid=study, rows=256, columns=256)
    ]
    sent = {ds.SOPInstanceUID: encode(ds) for ds in series}
    assert sum(map(len, sent.values())) > 10**6  # the client sends it chunked

    answer = client.store_instances(series)
    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL.endswith(f"/dicom-web/studies/{study}")
    refs = {item.ReferencedSOPInstanceUID: item for item in answer.ReferencedSOPSequence}
    assert refs.keys() == sent.keys()
    for ds in series:
        item = refs[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL.endswith(
            f"/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )
        assert "WarningReason" not in item
        assert blob_dataset(live.archive, ds.SOPInstanceUID) == sent_dataset(
            sent[ds.SOPInstanceUID], tmp_path
        )

    found = live.archive.query(
        Query(
            level=Level.STUDY, keys={"StudyInstanceUID": study, "NumberOfStudyRelatedInstances": ""}
        )
    ).datasets
    assert len(found) == 1
    assert found[0].NumberOfStudyRelatedInstances == 12

    # Real files, each to its own study's URL.
    for name in REAL_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        answer = client.store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
        assert "FailedSOPSequence" not in answer, name
        assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert blob_dataset(live.archive, ds.SOPInstanceUID) == sent_dataset(
            encode(ds), tmp_path
        ), name
        (inst,) = live.archive.find_instances(
            RetrieveRequest(level=Level.IMAGE, sop_uids=[ds.SOPInstanceUID])
        )
        assert inst.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID

    # The same instances again: exact duplicates are successes, no second copy.
    blobs = blob_files(live)
    answer = client.store_instances(series[:3], study_instance_uid=study)
    assert len(answer.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in answer
    assert blob_files(live) == blobs
    assert count(live.archive, Instance) == len(series) + len(REAL_FILES)
    assert staging_files(live) == []


@sqlite_only
@pytest.mark.fast
def test_raw_bodies_in_the_forms_clients_send(live_server: LiveServer) -> None:
    live = live_server
    a, b, c = ct_slice(), ct_slice(), ct_slice()
    # type parameter unquoted, boundary quoted, preamble and epilogue, a part without
    # Content-Type (taken as application/dicom), a part with a transfer-syntax parameter.
    body = body_of(
        part10(a),
        ({}, part10(b)),
        ({"Content-Type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}, part10(c)),
        preamble=b"This is a multipart message.",
        epilogue=b"the end\r\n",
    )
    response = post(
        live, body, **{"Content-Type": f'multipart/related; type=application/dicom; boundary="{B}"'}
    )
    assert response.status_code == 200, response.text
    answer = dicom_json(response)
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        a.SOPInstanceUID,
        b.SOPInstanceUID,
        c.SOPInstanceUID,
    ]
    # Without a type parameter, and with an Accept the answer satisfies.
    d = ct_slice()
    response = post(
        live,
        body_of(part10(d)),
        **{"Content-Type": f"multipart/related; boundary={B}", "Accept": "application/json, */*"},
    )
    assert response.status_code == 200, response.text
    assert stored_uids(live.archive) == {x.SOPInstanceUID for x in (a, b, c, d)}


@sqlite_only
@pytest.mark.fast
def test_alternate_syntax_and_several_studies(live_server: LiveServer) -> None:
    live = live_server
    first = ct_slice()
    again = ct_slice(
        sop_uid=first.SOPInstanceUID,
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
    )
    again.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    other = ct_slice()
    assert post(live, body_of(part10(first))).status_code == 200
    response = post(live, body_of(part10(again), part10(other)))
    # Stored with a warning (the copy in the first syntax is kept): 202.
    assert response.status_code == 202, response.text
    answer = dicom_json(response)
    items = {i.ReferencedSOPInstanceUID: i for i in answer.ReferencedSOPSequence}
    assert items[first.SOPInstanceUID].WarningReason == 0xB006
    assert "WarningReason" not in items[other.SOPInstanceUID]
    # Two studies: the study Retrieve URL is present and empty (type 2).
    assert answer["RetrieveURL"].value in (None, "", [])
    assert "FailedSOPSequence" not in answer


# -- per part failures -----------------------------------------------------------------
@sqlite_only
@pytest.mark.fast
def test_non_dicom_parts_fail_alone(live_server: LiveServer) -> None:
    live = live_server
    good = ct_slice()
    body = body_of(
        ({"Content-Type": "text/plain"}, b"hello"),
        part10(good),
        ({"Content-Type": "application/dicom+json"}, b"{}"),
        ({"Content-Type": "application/dicom"}, b"not dicom at all" * 20),
        ({"Content-Type": "application/dicom", "Content-Transfer-Encoding": "base64"}, b"AAAA"),
    )
    response = post(live, body)
    assert response.status_code == 202, response.text
    answer = dicom_json(response)
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        good.SOPInstanceUID
    ]
    assert failure_reasons(answer) == [0xC000] * 4
    for item in answer.FailedSOPSequence:
        assert "ReferencedSOPInstanceUID" not in item
    warnings = response.headers.get_list("warning")
    assert len(warnings) == 4
    assert "part 1: part of type text/plain" in warnings[0]
    assert "part 5: part Content-Transfer-Encoding base64" in warnings[3]
    assert stored_uids(live.archive) == {good.SOPInstanceUID}
    assert staging_files(live) == []

    # Only bad parts: 409, nothing more stored.
    response = post(live, body_of(({"Content-Type": "image/jpeg"}, b"\xff\xd8\xff")))
    assert response.status_code == 409
    assert failure_reasons(dicom_json(response)) == [0xC000]
    assert count(live.archive, Instance) == 1
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_instance_of_another_study_is_not_stored_under_the_target(
    live_server: LiveServer,
) -> None:
    live = live_server
    target = uid()
    mine = ct_slice(study_uid=target)
    stranger = ct_slice()
    response = post(live, body_of(part10(mine), part10(stranger)), path=f"/studies/{target}")
    assert response.status_code == 202, response.text
    answer = dicom_json(response)
    assert answer.RetrieveURL.endswith(f"/studies/{target}")
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        mine.SOPInstanceUID
    ]
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == stow.STUDY_MISMATCH == 0xC409
    assert failed.ReferencedSOPInstanceUID == stranger.SOPInstanceUID
    assert failed.ReferencedSOPClassUID == stranger.SOPClassUID
    assert stored_uids(live.archive) == {mine.SOPInstanceUID}

    # All of another study: 409, nothing stored.
    response = post(
        live, body_of(part10(ct_slice()), part10(ct_slice())), path=f"/studies/{target}"
    )
    assert response.status_code == 409
    assert failure_reasons(dicom_json(response)) == [0xC409, 0xC409]
    assert stored_uids(live.archive) == {mine.SOPInstanceUID}
    assert staging_files(live) == []


@sqlite_only
@pytest.mark.fast
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uids_and_attributes_fail_with_their_reasons(live_server: LiveServer) -> None:
    live = live_server
    bad_study = ct_slice(study_uid="1.2.3.abc")
    traversal = ct_slice(sop_uid="../../../../tmp/evil")
    traversal.file_meta.MediaStorageSOPInstanceUID = traversal.SOPInstanceUID
    no_study = ct_slice()
    del no_study.StudyInstanceUID
    not_storage = ct_slice()
    not_storage.SOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    not_storage.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    body = body_of(*(part10(ds) for ds in (bad_study, traversal, no_study, not_storage)))
    response = post(live, body)
    assert response.status_code == 409, response.text
    answer = dicom_json(response)
    assert failure_reasons(answer) == [0xC002, 0xC002, 0xA900, 0x0122]
    items = answer.FailedSOPSequence
    assert items[0].ReferencedSOPInstanceUID == bad_study.SOPInstanceUID
    assert "ReferencedSOPInstanceUID" not in items[1]  # not a UID: not echoed back
    assert items[2].ReferencedSOPInstanceUID == no_study.SOPInstanceUID
    assert_nothing_stored(live)
    assert not list(Path("/tmp").glob("evil*"))
    assert not [p for p in all_files(live.settings.data_dir) if "evil" in str(p)]
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_conflicting_copy_is_refused(live_server: LiveServer, tmp_path: Path) -> None:
    live = live_server
    ds = ct_slice()
    assert post(live, body_of(part10(ds))).status_code == 200
    changed = ct_slice(
        sop_uid=ds.SOPInstanceUID,
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        seed=99,
    )
    response = post(live, body_of(part10(changed)))
    assert response.status_code == 409
    assert failure_reasons(dicom_json(response)) == [0xC010]
    assert (
        blob_dataset(live.archive, ds.SOPInstanceUID)
        == part10(ds)[-len(blob_dataset(live.archive, ds.SOPInstanceUID)) :]
    )


@sqlite_only
@pytest.mark.fast
@pytest.mark.parametrize(
    ("error", "code"), [(StorageUnavailable, 0xA700), (IndexUnavailable, 0xA701)]
)
def test_backend_down_is_503_with_retry_after(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, error: type, code: int
) -> None:
    live = live_server

    def down(*_a: object, **_k: object) -> None:
        raise error("down for the test")

    monkeypatch.setattr(live.archive.ingestor, "ingest_file", down)
    response = post(live, body_of(part10(ct_slice()), part10(ct_slice())))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    assert failure_reasons(dicom_json(response)) == [code, code]
    assert_nothing_stored(live)
    monkeypatch.undo()
    assert_serving(live)


# -- refusals of the request as a whole ------------------------------------------------
@sqlite_only
@pytest.mark.fast
@pytest.mark.parametrize(
    ("content_type", "status", "message"),
    [
        ("application/dicom", 415, "application/dicom is not supported"),
        (f"multipart/mixed; boundary={B}", 415, "multipart/mixed is not supported"),
        (
            f'multipart/related; type="application/dicom+json"; boundary={B}',
            415,
            "metadata and bulk data uploads",
        ),
        (f"multipart/related; type=application/dicom+xml; boundary={B}", 415, "not supported"),
        (f"multipart/related; type=image/jpeg; boundary={B}", 415, "image/jpeg is not supported"),
        ("", 415, "is required"),
        ("garbage", 415, "malformed media type"),
        ('multipart/related; type="application/dicom"', 400, "without a boundary"),
        ('multipart/related; type="application/dicom"; boundary=""', 400, "without a boundary"),
        (f'multipart/related; type="application/dicom"; boundary={"x" * 71}', 400, "1-70"),
    ],
)
def test_unsupported_content_types(
    live_server: LiveServer, content_type: str, status: int, message: str
) -> None:
    live = live_server
    response = post(live, body_of(part10(ct_slice())), **{"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert message in response.json()["message"]
    assert_nothing_stored(live)
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_unacceptable_accept_and_encoding(live_server: LiveServer) -> None:
    live = live_server
    body = body_of(part10(ct_slice()))
    response = post(live, body, Accept="application/dicom+xml")
    assert response.status_code == 406
    response = post(live, body, **{"Content-Encoding": "br"})
    assert response.status_code == 415
    assert "Content-Encoding br" in response.json()["message"]
    response = post(live, body, **{"Content-Encoding": "gzip, gzip"})
    assert response.status_code == 415
    assert_nothing_stored(live)
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_malformed_bodies_are_400_and_keep_only_complete_parts(live_server: LiveServer) -> None:
    live = live_server
    for body in [
        b"garbage " * 20_000,  # no delimiter at all
        b"",  # empty
        body_of(part10(ct_slice()), close=False)[:-100],  # breaks off inside the only part
        body_of(part10(ct_slice()), boundary="other"),  # another boundary than declared
        f"--{B}--\r\n".encode(),  # no part at all
    ]:
        response = post(live, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"] in ("malformed-multipart", "no-parts")
        assert_nothing_stored(live)

    # Two complete parts, then the body breaks off inside the third: the two complete
    # ones were ingested as they arrived and stay stored; the answer lists them.
    first, second, third = ct_slice(), ct_slice(), ct_slice()
    body = body_of(part10(first), part10(second), part10(third), close=False)[:-500]
    response = post(live, body)
    assert response.status_code == 400
    assert response.headers["connection"] == "close"
    answer = dicom_json(response)
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        first.SOPInstanceUID,
        second.SOPInstanceUID,
    ]
    assert "body ended inside a part" in response.headers["warning"]
    assert stored_uids(live.archive) == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert staging_files(live) == []
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_path_traversal_in_the_url(live_server: LiveServer) -> None:
    live = live_server
    body = body_of(part10(ct_slice()))
    for path in [
        "/studies/..%2F..%2F..%2Fetc",
        "/studies/1.2.3%2F..%2F..%2Fx",
        "/studies/%2E%2E",
        "/studies/1.2.3.abc",
        "/studies/" + "1." * 40 + "1",
    ]:
        response = post(live, body, path=path)
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert_nothing_stored(live)
    response = post(live, body, path="/studies/1.2.3.abc")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid-uid"
    assert_serving(live)


# -- limits -------------------------------------------------------------------------------
def _open(live: LiveServer) -> socket.socket:
    port = int(live.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            break
        rest += more
    return status, headers, rest


def _head(live: LiveServer, **headers: str) -> bytes:
    lines = [
        f"POST {live.settings.dicomweb_prefix}/studies HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {CT}",
        *[f"{k.replace('_', '-')}: {v}" for k, v in headers.items()],
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@sqlite_only
@pytest.mark.fast
def test_content_length_over_the_limit_is_refused_before_reading(live_server: LiveServer) -> None:
    """Headers announcing a terabyte, then silence: the 413 arrives although not one
    byte of the body was sent, and the server closes the connection."""
    live = live_server
    with _open(live) as sock:
        sock.sendall(_head(live, Content_Length=str(10**12), Expect="100-continue"))
        started = time.monotonic()
        status, headers, body = _read_response(sock)
        assert time.monotonic() - started < 5
        assert status == 413
        assert headers["connection"] == "close"
        assert "exceeds the limit" in json.loads(body)["message"]
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed, no "100 Continue" was ever sent
    assert_nothing_stored(live)
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_chunked_body_over_the_limit_is_refused_while_streaming(live_server: LiveServer) -> None:
    live = live_server
    live.settings.stow_max_bytes = 1024 * 1024
    first = ct_slice()
    head_part = body_of(part10(first), close=False) + (
        f"\r\n--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    )
    sent = 0
    with _open(live) as sock:
        sock.sendall(_head(live, Transfer_Encoding="chunked"))
        pieces = [head_part] + [b"\x00" * 65536] * 64  # 4 MiB offered
        answered = False
        for piece in pieces:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            sock.settimeout(0.05)
            try:
                peek = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            answered = bool(peek)
            break
        assert answered
        status, headers, body = _read_response(sock)
    assert status == 413
    assert sent < 2 * 1024 * 1024  # answered long before the client sent it all
    # The complete first part was ingested and stays; the one breaking the limit is gone.
    answer = Dataset.from_json(json.loads(body))
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        first.SOPInstanceUID
    ]
    assert "exceeds the limit" in headers["warning"]
    assert stored_uids(live.archive) == {first.SOPInstanceUID}
    assert staging_files(live) == []
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_gzip_body_is_stored_and_a_gzip_bomb_is_stopped(live_server: LiveServer) -> None:
    live = live_server
    a, b = ct_slice(), ct_slice()
    response = post(
        live, gzip.compress(body_of(part10(a), part10(b))), **{"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    assert stored_uids(live.archive) == {a.SOPInstanceUID, b.SOPInstanceUID}

    # 1 GiB of zeros in one part, about 1 MiB compressed; the limit is 4 MiB.
    live.settings.stow_max_bytes = 4 * 1024 * 1024
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = [packer.compress(f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode())]
    zeros = b"\x00" * (1024 * 1024)
    bomb += [packer.compress(zeros) for _ in range(1024)]
    bomb.append(packer.compress(f"\r\n--{B}--".encode()) + packer.flush())
    data = b"".join(bomb)
    assert len(data) < live.settings.stow_max_bytes
    started = time.monotonic()
    response = post(live, data, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "decompressed request body exceeds" in response.json()["message"]
    assert time.monotonic() - started < 10
    assert staging_files(live) == []
    assert count(live.archive, Instance) == 2

    # Corrupt or truncated gzip: 400.
    good = gzip.compress(body_of(part10(ct_slice())))
    for broken in [b"\x1f\x8b\x08\x00garbage" * 10, good[: len(good) // 2]]:
        response = post(live, broken, **{"Content-Encoding": "gzip"})
        assert response.status_code == 400, response.text
    assert count(live.archive, Instance) == 2
    assert staging_files(live) == []
    assert_serving(live)


@sqlite_only
@pytest.mark.fast
def test_client_that_goes_away_leaves_no_staging(live_server: LiveServer) -> None:
    live = live_server
    with _open(live) as sock:
        body = body_of(part10(ct_slice()), close=False) + (
            f"\r\n--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"\x00" * 100_000
        )
        sock.sendall(_head(live, Content_Length=str(len(body) + 10**6)) + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while staging_files(live) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staging_files(live) == []
    assert count(live.archive, Instance) == 1
    assert_serving(live)


# -- the study is then found and moved over DIMSE ---------------------------------------
@pytest.fixture
def gateway_with_dest(
    tmp_path: Path, serve_stack: ServeStack
) -> Iterator[tuple[Gateway, Path, ServeStack]]:
    """A served gateway (embedded, or production with its worker) and a storescp."""
    require_tool("findscu")
    with (
        storescp(tmp_path / "dest") as (dest_port, out),
        running_gateway(tmp_path, serve_stack.env) as gw,
    ):
        # Registered in process (the CLI's `peers add` is tested in tests/gateway):
        # systems of the institution that stores over STOW-RS below, and DEST.
        archive = Archive.open(serve_stack.settings(gw.data_dir), migrate_schema=True)
        try:
            registry = PeerRegistry(archive.db)
            for aet in ("FINDSCU", "MOVESCU", "STORESCU"):
                registry.add(aet, "127.0.0.1", 104, institution=TEST_INSTITUTION)
            registry.add("DEST", "127.0.0.1", dest_port, institution=TEST_INSTITUTION)
        finally:
            archive.close()
        gw.start("--dimse-workers", "1")
        yield gw, out, serve_stack
        assert gw.stop() == 0, gw.log_text()


def _client(gw: Gateway, stack: ServeStack) -> DICOMwebClient:
    """A DICOMweb client of TEST_INSTITUTION (whose DIMSE peers are registered above)."""
    archive = Archive.open(stack.settings(gw.data_dir))
    try:
        token = institution_token(archive)
    finally:
        archive.close()
    return DICOMwebClient(
        f"http://127.0.0.1:{gw.http_port}/dicom-web", headers={"Authorization": f"Bearer {token}"}
    )


@pytest.mark.integration
def test_study_stored_by_stow_is_found_and_moved_over_dimse(
    gateway_with_dest: tuple[Gateway, Path, ServeStack], tmp_path: Path
) -> None:
    gw, out, stack = gateway_with_dest
    client = _client(gw, stack)
    study = uid()
    files = ct_series(
        tmp_path / "in", 5, study_uid=study, patient_id="STOW-1", patient_name="WEB^UPLOAD"
    )
    datasets = [pydicom.dcmread(f) for f in files]
    answer = client.store_instances(datasets, study_instance_uid=study)
    assert len(answer.ReferencedSOPSequence) == 5 and "FailedSOPSequence" not in answer

    addr = ["-aec", gw.ae_title, "127.0.0.1", str(gw.dimse_port)]
    result = run_tool(
        [
            require_tool("findscu"),
            "-aet",
            "FINDSCU",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=WEB^UP*",
            "-k",
            "StudyInstanceUID",
            "-k",
            "NumberOfStudyRelatedInstances",
            *addr,
        ]
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert study in text
    assert re.search(r"\[5 ?\].*NumberOfStudyRelatedInstances", text)

    result = run_tool(
        [
            require_tool("movescu"),
            "-aet",
            "MOVESCU",
            "-aem",
            "DEST",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            *addr,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sent = {ds.SOPInstanceUID: sent_dataset(encode(ds), tmp_path) for ds in datasets}
    received = {}
    for path in out.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.StudyInstanceUID == study:
            received[ds.SOPInstanceUID] = dataset_bytes(path)
    assert received == sent
    stack.wait_for_task(PREPARE_SERIES)  # production: the worker took the STOW's series


@pytest.mark.integration
def test_study_stored_by_storescu_is_found_and_retrieved_over_dicomweb(
    gateway_with_dest: tuple[Gateway, Path, ServeStack], tmp_path: Path
) -> None:
    gw, _, stack = gateway_with_dest
    study = uid()
    files = ct_series(
        tmp_path / "dimse", 4, study_uid=study, patient_id="DIMSE-1", patient_name="DCMTK^SENT"
    )
    result = run_tool(
        [
            require_tool("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            gw.ae_title,
            "127.0.0.1",
            str(gw.dimse_port),
            *map(str, files),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = _client(gw, stack)
    [found] = client.search_for_studies(search_filters={"PatientName": "dcmtk^s*"})
    assert found["0020000D"]["Value"] == [study]
    assert found["00201208"]["Value"] == [4]
    retrieved = client.retrieve_study(study, media_types=(("application/dicom", "*"),))
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    assert {str(ds.SOPInstanceUID) for ds in retrieved} == set(sent)
    for ds in retrieved:
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData
