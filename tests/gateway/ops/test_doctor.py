"""studybridge doctor: plain words, non-zero exit when a backend is broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.archive.db import migrate
from gateway.config import Settings
from gateway.ops.doctor import Status, diagnose, redact_url
from tests.s3server import SeaweedFS
from tests.servers import free_port


def run_doctor(data_dir: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **env_extra}
    env.pop("STUDYBRIDGE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def statuses(settings: Settings) -> dict[str, str]:
    return {f.check: f.status.name for f in diagnose(settings) if f.status is not Status.OK}


@pytest.mark.fast
def test_healthy_embedded_default(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", dimse_port=free_port(), http_port=free_port())
    settings.data_dir.mkdir()
    migrate(settings.resolved_database_url)
    assert statuses(settings) == {}


@pytest.mark.fast
def test_unmigrated_schema_and_unwritable_store_fail(tmp_path: Path):
    blobs = tmp_path / "blobs-is-a-file"
    blobs.write_text("not a folder")
    settings = Settings(data_dir=tmp_path / "var", blob_dir=blobs, http_port=free_port())
    found = {f.check: f for f in diagnose(settings)}
    assert found["schema"].status is Status.FAILURE
    assert "studybridge db upgrade" in found["schema"].detail
    assert found["blob store"].status is Status.FAILURE


@pytest.mark.fast
def test_unreachable_database_and_broker_without_secrets(tmp_path: Path):
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=f"postgresql+psycopg://sb:hunter2secret@127.0.0.1:{port}/sb",
        task_broker_url=f"redis://:brokersecret@127.0.0.1:{free_port()}/0",
        http_port=free_port(),
    )
    findings = diagnose(settings)
    text = json.dumps([f.detail for f in findings])
    assert "hunter2secret" not in text and "brokersecret" not in text
    failed = {f.check for f in findings if f.status is Status.FAILURE}
    assert {"index", "tasks"} <= failed


@pytest.mark.fast
def test_redact_url():
    assert "pw" not in redact_url("postgresql+psycopg://u:pw@h:5432/d")
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.integration
def test_doctor_command_on_s3_up_and_down(tmp_path: Path, s3_server: SeaweedFS):
    data = tmp_path / "var"
    env = {
        **s3_server.env(prefix="doctor"),
        "STUDYBRIDGE_HTTP_PORT": str(free_port()),
        "STUDYBRIDGE_DIMSE_PORT": str(free_port()),
    }
    subprocess.run(
        [sys.executable, "-m", "gateway.cli", "db", "upgrade", "--data-dir", str(data)],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        check=True,
        capture_output=True,
    )
    good = run_doctor(data, env)
    assert good.returncode == 0, good.stdout + good.stderr
    report = json.loads(good.stdout)
    assert report["healthy"]
    store = next(c for c in report["checks"] if c["check"] == "blob store")
    assert store["status"] == "ok" and "S3 bucket" in store["detail"]

    down = {**env, "STUDYBRIDGE_S3_ENDPOINT": f"127.0.0.1:{free_port()}"}
    bad = run_doctor(data, down)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    store = next(c for c in report["checks"] if c["check"] == "blob store")
    assert store["status"] == "FAIL" and "unreachable" in store["detail"]
    assert s3_server.settings()["s3_secret_key"] not in bad.stdout + bad.stderr


@pytest.mark.postgres
def test_missing_planner_statistics_are_reported_and_fixed(tmp_path: Path, pg_url: str):
    """PostgreSQL without statistics plans the index's queries blind: doctor says so,
    and `studybridge db analyze` mends it."""
    from sqlalchemy import create_engine, insert, text

    from gateway.archive.models import Patient, utcnow
    from tests.conftest import truncate_pg

    truncate_pg(pg_url)
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(
                insert(Patient),
                [
                    {"issuer": "X", "patient_id": f"P{i}", "created_at": utcnow()}
                    for i in range(200)
                ],
            )
            conn.execute(text("DELETE FROM pg_statistic WHERE starelid = 'patients'::regclass"))
        settings = Settings(data_dir=tmp_path / "var", database_url=pg_url)
        found = {f.check: f for f in diagnose(settings)}
        assert found["statistics"].status is Status.WARNING
        assert "patients" in found["statistics"].detail
        assert "studybridge db analyze" in found["statistics"].detail
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "db", "analyze", "--data-dir", str(tmp_path)],
            env={**os.environ, "PYTHONPATH": os.getcwd(), "STUDYBRIDGE_DATABASE_URL": pg_url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "statistics refreshed" in done.stdout
        found = {f.check: f for f in diagnose(settings)}
        assert "no planner statistics" not in found["statistics"].detail
    finally:
        truncate_pg(pg_url)
        engine.dispose()
