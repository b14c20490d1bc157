"""The command line and the settings it reads (run in-process with typer's runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import Settings, load_settings
from tests.factories import ct_series

pytestmark = pytest.mark.fast

runner = CliRunner()


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env or {}, catch_exceptions=False)
    return result.exit_code, result.output


def test_defaults_are_the_embedded_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("STUDYBRIDGE_CONFIG", "STUDYBRIDGE_DIMSE_PORT", "STUDYBRIDGE_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert settings.dimse_port == 11112
    assert settings.http_port == 8080
    assert settings.ae_title == "STUDYBRIDGE"
    assert settings.data_dir == Path("./var")
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.effective_dimse_workers >= 2
    assert not settings.effective_accept_unknown_peers


def test_environment_and_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "studybridge.toml"
    toml.write_text('ae_title = "FROMFILE"\ndimse_port = 4242\nhttp_port = 9000\n')
    monkeypatch.setenv("STUDYBRIDGE_HTTP_PORT", "9100")
    settings = load_settings(toml)
    assert settings.ae_title == "FROMFILE"
    assert settings.dimse_port == 4242
    assert settings.http_port == 9100  # the environment beats the file
    assert load_settings(toml, dimse_port=5000).dimse_port == 5000  # the CLI beats both
    monkeypatch.delenv("STUDYBRIDGE_CONFIG")


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUDYBRIDGE_CONFIG", raising=False)
    with pytest.raises(ValueError):
        Settings(ae_title="THIS-TITLE-IS-TOO-LONG")
    with pytest.raises(ValueError):
        Settings(unknown_setting=1)  # type: ignore[call-arg]


def test_production_profile_never_accepts_unknown_peers() -> None:
    assert not Settings(
        profile="production", accept_unknown_peers=True
    ).effective_accept_unknown_peers
    assert Settings(profile="demo").effective_accept_unknown_peers


def test_peers_add_list_remove(tmp_path: Path) -> None:
    data = str(tmp_path / "var")
    code, out = _run(
        "peers",
        "add",
        "PACS_A",
        "--host",
        "10.1.2.3",
        "--port",
        "104",
        "--institution",
        "Hospital A",
        "--issuer",
        "HOSP-A",
        "--data-dir",
        data,
    )
    assert code == 0, out
    code, out = _run(
        "peers", "add", "PACS_A", "--host", "10.1.2.4", "--port", "104", "--data-dir", data
    )
    assert code == 1 and "already registered" in out
    code, out = _run("peers", "add", "X" * 17, "--host", "h", "--port", "104", "--data-dir", data)
    assert code == 1
    code, out = _run("peers", "list", "--data-dir", data)
    assert "PACS_A" in out and "10.1.2.3" in out and "HOSP-A" in out
    code, out = _run("peers", "remove", "PACS_A", "--data-dir", data)
    assert code == 0
    code, out = _run("peers", "remove", "PACS_A", "--data-dir", data)
    assert code == 1


def test_import_then_stats(tmp_path: Path) -> None:
    data = str(tmp_path / "var")
    ct_series(tmp_path / "disc" / "series1", 4, patient_id="CLI-1")
    (tmp_path / "disc" / "README.TXT").write_text("not dicom")
    code, out = _run(
        "import", str(tmp_path / "disc"), "--issuer", "CLINIC", "--json", "--data-dir", data
    )
    assert code == 0, out
    report = json.loads(out[out.index("{") :])
    assert report["counts"]["stored"] == 4
    code, out = _run("stats", "--json", "--data-dir", data)
    figures = json.loads(out[out.index("{") :])
    assert figures["instances"] == 4
    assert figures["studies"] == 1
    assert figures["by_door"] == {"import": 4}
    # Importing again stores nothing new.
    code, out = _run("import", str(tmp_path / "disc"), "--json", "--data-dir", data)
    assert json.loads(out[out.index("{") :])["counts"]["duplicate"] == 4


def test_import_of_a_missing_path_fails(tmp_path: Path) -> None:
    code, _out = _run("import", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "var"))
    assert code == 2


def test_db_upgrade(tmp_path: Path) -> None:
    code, _out = _run("db", "upgrade", "--data-dir", str(tmp_path / "var"))
    assert code == 0
    assert (tmp_path / "var" / "index.sqlite3").exists()
