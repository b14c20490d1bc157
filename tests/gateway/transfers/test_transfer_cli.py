"""``studybridge transfer`` and ``import --transfer`` in process (typer's runner), on the
embedded backend and on production (PostgreSQL + S3)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import Settings
from tests.conftest import backend_env
from tests.factories import ct_series

pytestmark = [pytest.mark.fast, pytest.mark.production]

runner = CliRunner()


def test_import_into_a_transfer_then_finalize(tmp_path: Path, settings: Settings) -> None:
    data = ["--data-dir", str(settings.data_dir)]
    env = backend_env(settings)  # the index and blob store of this backend

    def _run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        return result.exit_code, result.output

    disc = tmp_path / "disc"
    paths = ct_series(disc / "s1", 2, patient_id="P1") + ct_series(disc / "s2", 1)
    studies = sorted({str(pydicom.dcmread(p).StudyInstanceUID) for p in paths})
    manifest = tmp_path / "m.csv"
    manifest.write_text("StudyInstanceUID\n" + "".join(f"{s}\n" for s in studies))

    code, out = _run("transfer", "create", "--institution", "Lac", "--issuer", "LAC", *data)
    assert code == 0 and "transfer 1 created" in out
    code, out = _run(
        "transfer", "create", "--institution", "X", "--issuer", "I", "--ae", "NOPE", *data
    )
    assert code == 2 and "no peer NOPE" in out
    code, out = _run("transfer", "finalize", "1", *data)
    assert code == 2 and "no manifest or census" in out
    code, out = _run("transfer", "manifest", "1", str(manifest), *data)
    assert code == 0 and "2 studies" in out

    code, out = _run("import", str(disc), "--transfer", "1", "--json", *data)
    assert code == 0, out
    code, out = _run("transfer", "report", "1", "--json", *data)
    report = json.loads(out)
    assert report["complete"] and report["counts"]["instances"] == 3

    receipt = tmp_path / "r.json"
    code, out = _run("transfer", "finalize", "1", "--out", str(receipt), *data)
    assert code == 0 and "Status: COMPLETE" in out
    code, out = _run("transfer", "verify-receipt", str(receipt), "--against-archive", *data)
    assert code == 0 and "valid receipt" in out
    code, out = _run("transfer", "receipt", "1", "--text", *data)
    assert "COMPLETE" in out
    code, out = _run("transfer", "list", *data)
    assert "complete" in out
    # The notice list: one line per patient with their number of studies.
    code, out = _run("transfer", "patients", "1", "--json", *data)
    found = {p["patient_id"]: p for p in json.loads(out)}
    assert set(found) == {"P1", "PAT001"} and found["P1"]["studies"] == 1
    assert found["P1"]["issuer"] == "LAC" and found["P1"]["name"] == "DOE^JANE"
    code, out = _run("transfer", "patients", "1", "--csv", *data)
    assert out.splitlines()[0].startswith("patient_id,issuer,name")
    # A closure is not handed back.
    code, out = _run("transfer", "hand-back", "1", "--to", "X", *data)
    assert code == 2 and "only suspensions" in out
    # A complete transfer takes no more instances.
    code, out = _run("import", str(disc), "--transfer", "1", *data)
    assert code == 2 and "takes no more instances" in out
