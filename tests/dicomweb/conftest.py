"""A live DICOMweb server for HTTP tests, on SQLite and PostgreSQL.

``live_server`` serves ``dicomweb.app.create_app(settings, archive)`` with uvicorn on
a free 127.0.0.1 port in a background thread, over the ``archive`` fixture of
``tests/conftest.py`` (so every test using it runs on both index backends). It
yields a ``LiveServer``: ``url`` is the server root (``http://127.0.0.1:PORT``),
``dicomweb_url`` the DICOMweb base (root + ``settings.dicomweb_prefix``); the
``dicomweb_url`` fixture yields just that string.

The app reads ``settings`` per request, so a test may change a setting (e.g.
``settings.qido_max_limit = 3``) before or after the server starts.

Put data in with ``ingest_study`` / ``ingest_datasets`` (synthetic data sets from
``tests/factories.py`` through the archive's one ingest, ``TEST_SOURCE``: sent by
the institution ``TEST_INSTITUTION``).

Every DICOMweb request needs a principal (``dicomweb.access``). The live server's
clients act as ``TEST_INSTITUTION``'s DICOMweb client: the server is wrapped so a
request without an ``Authorization`` header gets that client's real access token
(``LiveServer.token``), which then goes through the real token resolution, scope and
audit. A request that must arrive anonymous sends the header ``X-Test-Anonymous: 1``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydicom.dataset import Dataset

from consent.principals import ConsentError, add_dicomweb_client, add_institution
from consent.tokens import issue_for_system
from dicomweb.app import create_app
from gateway.archive import Archive, IngestResult, Source
from gateway.config import Settings
from tests.factories import ct_slice, uid, write

TEST_INSTITUTION = "Test Hospital"
TEST_SOURCE = Source(door="test", institution=TEST_INSTITUTION)


@dataclass
class LiveServer:
    url: str
    dicomweb_url: str
    archive: Archive
    settings: Settings
    tmp_path: Path
    token: str = ""  # TEST_INSTITUTION's client token, sent unless a request has its own

    def ingest(self, *datasets: Dataset) -> list[IngestResult]:
        return ingest_datasets(self.archive, self.tmp_path, *datasets)


@dataclass
class StudyRefs:
    """UIDs of a study made by ``ingest_study``."""

    study_uid: str
    series_uids: list[str] = field(default_factory=list)
    sop_uids: dict[str, list[str]] = field(default_factory=dict)  # series UID -> SOPs

    @property
    def all_sops(self) -> list[str]:
        return [sop for sops in self.sop_uids.values() for sop in sops]


_counter = iter(range(1_000_000))


def ingest_datasets(archive: Archive, folder: Path, *datasets: Dataset) -> list[IngestResult]:
    """Write each data set as a Part 10 file below ``folder`` and ingest it."""
    results = []
    for ds in datasets:
        path = write(ds, folder / "ingest" / f"{next(_counter):06d}.dcm")
        results.append(archive.ingest_file(path, TEST_SOURCE))
    return results


def ingest_study(
    archive: Archive,
    folder: Path,
    *,
    series: int = 1,
    instances: int = 2,
    modalities: list[str] | None = None,
    **slice_kw: Any,
) -> StudyRefs:
    """A synthetic CT study (``tests.factories.ct_slice``): ``series`` series of
    ``instances`` instances each. ``modalities`` gives each series' modality;
    other keywords (patient_id, patient_name, study_date, accession, ...) go to
    ``ct_slice`` for every instance."""
    refs = StudyRefs(study_uid=slice_kw.pop("study_uid", None) or uid())
    for s in range(series):
        series_uid = uid()
        refs.series_uids.append(series_uid)
        refs.sop_uids[series_uid] = []
        kw = dict(slice_kw)
        if modalities:
            kw["modality"] = modalities[s]
        for i in range(1, instances + 1):
            ds = ct_slice(
                study_uid=refs.study_uid,
                series_uid=series_uid,
                instance_number=i,
                series_number=s + 1,
                **kw,
            )
            refs.sop_uids[series_uid].append(ds.SOPInstanceUID)
            ingest_datasets(archive, folder, ds)
    return refs


def _serve(app: Any, **config: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    # As `studybridge serve` by default: proxy headers are not trusted.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            proxy_headers=False,
            **config,
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test HTTP server did not start")
        time.sleep(0.01)
    return server, thread, port


def institution_token(archive: Archive, institution: str = TEST_INSTITUTION) -> str:
    """A real access token of a DICOMweb client of ``institution`` (registered here)."""
    with contextlib.suppress(ConsentError):  # already registered
        add_institution(archive.db, institution)
    system_id, _secret = add_dicomweb_client(archive.db, institution, f"client-{uid()[-12:]}")
    return issue_for_system(archive.db, system_id, dt.timedelta(days=1)).token


class _DefaultToken:
    """ASGI wrapper: requests without credentials carry ``token`` (the test client's)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.header = (b"authorization", f"Bearer {token}".encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = list(scope["headers"])
            names = {name.lower() for name, _ in headers}
            if b"x-test-anonymous" not in names and b"authorization" not in names:
                scope = {**scope, "headers": [*headers, self.header]}
        await self.app(scope, receive, send)


@pytest.fixture
def live_server(settings: Settings, archive: Archive, tmp_path: Path) -> Iterator[LiveServer]:
    """``create_app(settings, archive)`` served by uvicorn on 127.0.0.1 (both backends),
    its clients acting as ``TEST_INSTITUTION``'s DICOMweb client."""
    token = institution_token(archive)
    server, thread, port = _serve(_DefaultToken(create_app(settings, archive), token))
    url = f"http://127.0.0.1:{port}"
    try:
        yield LiveServer(
            url=url,
            dicomweb_url=url + settings.dicomweb_prefix.rstrip("/"),
            archive=archive,
            settings=settings,
            tmp_path=tmp_path,
            token=token,
        )
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def dicomweb_url(live_server: LiveServer) -> str:
    """The DICOMweb base URL of the live server, e.g. ``http://127.0.0.1:PORT/dicom-web``."""
    return live_server.dicomweb_url
