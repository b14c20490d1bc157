"""An in-process DICOM node for DIMSE tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.archive import Archive
from gateway.config import Settings
from gateway.dimse.server import configure_pynetdicom, make_server
from gateway.peers import PeerRegistry
from tests.servers import free_port


@contextlib.contextmanager
def in_process_node(
    tmp_path: Path, calling_ae: str, **overrides: Any
) -> Iterator[tuple[Settings, Archive]]:
    """A DIMSE server thread on a fresh archive, ``calling_ae`` registered from
    127.0.0.1 for "Test Hospital"; ``overrides`` are further settings."""
    configure_pynetdicom()
    settings = Settings(
        data_dir=tmp_path / "var", dimse_host="127.0.0.1", dimse_port=free_port(), **overrides
    )
    archive = Archive.open(settings, migrate_schema=True)
    PeerRegistry(archive.db).add(calling_ae, "127.0.0.1", 104, institution="Test Hospital")
    server = make_server(settings, archive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield settings, archive
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        archive.close()
