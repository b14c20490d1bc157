"""A suspension ends: its studies go back to the reopening clinic's PACS (dcmtk storescp),
from the embedded backend and from production (PostgreSQL + S3)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import Settings
from tests.conftest import backend_env
from tests.factories import ct_series
from tests.servers import dataset_bytes, storescp

pytestmark = [pytest.mark.integration, pytest.mark.production]


def test_suspension_handed_back(tmp_path: Path, settings: Settings) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(settings.data_dir)]
    env = backend_env(settings)  # the index and blob store of this backend

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        return result.exit_code, result.output

    sources = ct_series(tmp_path / "d" / "a", 2) + ct_series(tmp_path / "d" / "b", 1)
    with storescp(tmp_path, "REOPENED") as (port, out):
        run(
            "peers",
            "add",
            "REOPENED",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--institution",
            "Test Hospital",
            *data,
        )
        code, text = run(
            "transfer", "create", "--institution", "Lac", "--issuer", "LAC",
            "--reason", "suspension", "--effective-on", "2026-01-01",
            "--ends-on", "2026-06-30", *data,
        )  # fmt: skip
        assert code == 0, text
        assert run("import", str(tmp_path / "d"), "--transfer", "1", *data)[0] == 0
        code, text = run("transfer", "hand-back", "1", "--to", "REOPENED", *data)
        assert code == 0, text
        assert "2 forwarding jobs created" in text
        received = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    originals = {pydicom.dcmread(p).SOPInstanceUID: p for p in sources}
    assert set(received) == set(originals)
    for sop, path in received.items():  # as the clinic sent them
        assert dataset_bytes(path) == dataset_bytes(originals[sop])
