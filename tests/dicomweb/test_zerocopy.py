"""Stored parts sent from their files by the kernel (dicomweb.zerocopy), through the
live uvicorn server: on the file store with ``sendfile``, on S3 read and written by
the same worker thread; never over TLS. Every body is checked byte for byte."""

from __future__ import annotations

import os
import re
import ssl
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicomweb import zerocopy
from dicomweb.app import create_app
from gateway.archive.blobstore import FileStore
from gateway.archive.retrieve import get_instance
from tests.dicomweb.conftest import TEST_SOURCE, LiveServer, _DefaultToken, _serve
from tests.factories import ct_slice, uid, write

pytestmark = [pytest.mark.integration, pytest.mark.production]

STUDY_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SLICES = 4


class Spy:
    """What the zero-copy path did: raw bodies sent, ``sendfile`` calls, descriptors
    duplicated and closed."""

    def __init__(self) -> None:
        self.raw_bodies = 0
        self.sendfiles = 0
        self.dups: list[int] = []
        self.closed: list[int] = []


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    seen = Spy()
    send_raw = zerocopy.send_raw

    async def counting_send_raw(*args: Any, **kwargs: Any) -> None:
        seen.raw_bodies += 1
        await send_raw(*args, **kwargs)

    def sendfile(*args: Any) -> int:
        seen.sendfiles += 1
        return os.sendfile(*args)

    def dup(fd: int) -> int:
        new = os.dup(fd)
        seen.dups.append(new)
        return new

    def close(fd: int) -> None:
        seen.closed.append(fd)
        os.close(fd)

    # The module's own view of os: the server runs in this process, in a thread.
    fake_os = types.SimpleNamespace(
        **{name: getattr(os, name) for name in ("write", "fstat")},
        sendfile=sendfile,
        dup=dup,
        close=close,
    )
    monkeypatch.setattr(zerocopy, "send_raw", counting_send_raw)
    monkeypatch.setattr(zerocopy, "os", fake_os)
    return seen


def _all_closed(spy: Spy) -> bool:
    """Whether every duplicated descriptor was closed (the server closes it just
    after the last byte went out, so the client may have the body first)."""
    deadline = time.monotonic() + 10
    while sorted(spy.dups) != sorted(spy.closed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return sorted(spy.dups) == sorted(spy.closed)


def _study(
    live_server: LiveServer, slices: int = SLICES, size: int = 64
) -> tuple[str, list[bytes]]:
    """A study of CT slices of size x size pixels; the bytes of each stored file."""
    study, series = uid(), uid()
    stored = []
    for n in range(1, slices + 1):
        ds = ct_slice(
            study_uid=study, series_uid=series, instance_number=n, rows=size, columns=size
        )
        path = write(ds, live_server.tmp_path / "zc" / f"{n}.dcm")
        stored.append(path.read_bytes())
        live_server.archive.ingest_file(path, TEST_SOURCE)
    return study, stored


def _parts(response: httpx.Response) -> list[bytes]:
    boundary = re.search(r"boundary=([^;\s]+)", response.headers["content-type"])
    assert boundary is not None
    body = response.content
    assert int(response.headers["content-length"]) == len(body)
    delimiter = b"--" + boundary.group(1).strip('"').encode()
    pieces = body.split(delimiter)
    assert pieces[0] == b"" and pieces[-1] == b"--\r\n"
    return [p.split(b"\r\n\r\n", 1)[1][:-2] for p in pieces[1:-1]]


def test_a_study_is_sent_from_its_files_byte_for_byte(live_server: LiveServer, spy: Spy) -> None:
    study, stored = _study(live_server)
    url = f"{live_server.dicomweb_url}/studies/{study}"
    with httpx.Client(timeout=30) as client:
        for _ in range(2):  # a second request on the same (kept-alive) connection
            response = client.get(url, headers={"Accept": STUDY_AS_STORED})
            assert response.status_code == 200, response.text
            assert sorted(_parts(response)) == sorted(stored)
    assert spy.raw_bodies == 2
    if isinstance(live_server.archive.store, FileStore):
        assert spy.sendfiles >= 2 * SLICES
    else:
        assert spy.sendfiles == 0  # S3 objects are streams: read and written
    assert spy.dups and _all_closed(spy)


def test_a_range_of_an_instance_is_sent_from_its_file(live_server: LiveServer, spy: Spy) -> None:
    study, _stored = _study(live_server)
    with httpx.Client(timeout=30) as client:
        found = client.get(
            f"{live_server.dicomweb_url}/studies/{study}/instances",
            headers={"Accept": "application/dicom+json"},
        ).json()
        url = (
            f"{live_server.dicomweb_url}/studies/{study}"
            f"/series/{found[0]['0020000E']['Value'][0]}"
            f"/instances/{found[0]['00080018']['Value'][0]}"
        )
        whole = client.get(url, headers={"Accept": STUDY_AS_STORED})
        assert whole.status_code == 200
        part = client.get(url, headers={"Accept": STUDY_AS_STORED, "Range": "bytes=1000-70999"})
    assert part.status_code == 206
    assert part.content == whole.content[1000:71000]
    assert spy.raw_bodies == 2


@pytest.mark.file_store
def test_a_shortened_blob_breaks_the_body_and_the_server_goes_on(
    live_server: LiveServer, spy: Spy
) -> None:
    """Never a silently shortened part: the connection closes before the declared
    length, so the client sees a broken body; the next request is served."""
    study, _stored = _study(live_server)
    archive = live_server.archive
    ds = ct_slice(study_uid=uid(), instance_number=1)
    result = archive.ingest_file(write(ds, live_server.tmp_path / "short.dcm"), TEST_SOURCE)
    study = result.study_uid
    inst = get_instance(archive.db, study, result.series_uid, result.sop_uid)
    with archive.store.local_path(inst.blob_key) as path:
        Path(path).write_bytes(Path(path).read_bytes()[:-100])
    url = f"{live_server.dicomweb_url}/studies/{study}"
    with httpx.Client(timeout=30) as client, pytest.raises(httpx.HTTPError):
        client.get(url, headers={"Accept": STUDY_AS_STORED})
    with httpx.Client(timeout=30) as client:
        again = client.get(f"{live_server.dicomweb_url}/studies", headers={"Accept": "*/*"})
    assert again.status_code == 200
    assert _all_closed(spy)


def test_a_client_leaving_mid_body_leaves_nothing_open(live_server: LiveServer, spy: Spy) -> None:
    # 32 MB: more than the socket buffers on both sides hold, so the server is still
    # writing when the client goes.
    study, _stored = _study(live_server, slices=8, size=2048)
    url = f"{live_server.dicomweb_url}/studies/{study}"
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", url, headers={"Accept": STUDY_AS_STORED}) as response,
    ):
        assert response.status_code == 200
        next(response.iter_raw(4096))
    # The server notices when its next write fails or the event loop sees the close.
    assert _all_closed(spy)
    with httpx.Client(timeout=30) as client:
        answer = client.get(url, headers={"Accept": STUDY_AS_STORED})
    assert answer.status_code == 200


@pytest.fixture
def tls_server(live_server: LiveServer, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    from tests.pki import Pki, make_ca

    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    key, cert = make_ca(pki_dir)
    pki = Pki(pki_dir, key, cert)
    from cryptography.hazmat.primitives import serialization

    pki.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_key, server_cert = pki.issue("localhost", ips=["127.0.0.1"], server=True)
    app = _DefaultToken(create_app(live_server.settings, live_server.archive), live_server.token)
    server, thread, port = _serve(app, ssl_keyfile=str(server_key), ssl_certfile=str(server_cert))
    try:
        yield f"https://127.0.0.1:{port}{live_server.settings.dicomweb_prefix}", pki.ca_file
    finally:
        server.should_exit = True
        thread.join(15)


def test_never_over_tls(live_server: LiveServer, tls_server: tuple[str, Path], spy: Spy) -> None:
    study, stored = _study(live_server)
    base, ca = tls_server
    context = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(timeout=30, verify=context) as client:
        response = client.get(f"{base}/studies/{study}", headers={"Accept": STUDY_AS_STORED})
    assert response.status_code == 200
    assert sorted(_parts(response)) == sorted(stored)
    assert spy.raw_bodies == 0 and spy.sendfiles == 0
