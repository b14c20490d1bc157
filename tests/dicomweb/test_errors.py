"""HTTP answers when a backend is down: 503 with Retry-After, never a bare 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicomweb.app import create_app
from gateway.archive import Archive
from gateway.archive.blobstore import FileStore
from gateway.archive.db import Database
from gateway.config import Settings

pytestmark = pytest.mark.fast


def test_dead_index_answers_503(tmp_path: Path) -> None:
    # Nothing listens on port 1: every index access fails to connect.
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2"
    settings = Settings(data_dir=tmp_path / "var", database_url=url)
    archive = Archive(settings, Database(url), FileStore(tmp_path / "blobs"))
    with TestClient(create_app(settings, archive), raise_server_exceptions=False) as client:
        for path in ("/dicom-web/studies", "/dicom-web/studies/1.2.3/metadata"):
            # A token to resolve: the principal is looked up in the (dead) index too.
            response = client.get(path, headers={"Authorization": "Bearer sbat_" + "x" * 43})
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"]
            assert response.json()["error"] == "index-unavailable"
        assert client.get("/readyz").status_code == 503
