"""/metrics in one process: ingest and failure counters, and the broker's queue depth."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicomweb.app import create_app
from gateway.archive import Archive
from gateway.archive.errors import InvalidDataset
from gateway.config import Settings
from tests.factories import ct_slice, write
from tests.gateway.archive.helpers import SOURCE
from tests.servers import free_port, missing

pytestmark = [pytest.mark.fast, pytest.mark.filterwarnings("ignore::UserWarning")]


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape(settings: Settings, archive: Archive) -> str:
    # A scraper on this machine (/metrics is refused to remote clients without a token).
    with TestClient(create_app(settings, archive), client=("127.0.0.1", 50000)) as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return answer.text


def test_ingest_and_failures_are_counted(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var")
    archive = Archive.open(settings, migrate_schema=True)
    before = scrape(settings, archive)
    base = value(before, "studybridge_instances_received_total", door="test", outcome="stored")
    archive.ingest_file(write(ct_slice(), tmp_path / "a.dcm"), SOURCE)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(InvalidDataset):
        archive.ingest_file(bad, SOURCE)
    text = scrape(settings, archive)
    assert (
        value(text, "studybridge_instances_received_total", door="test", outcome="stored")
        == base + 1
    )
    assert value(text, "studybridge_failures_total", door="test", reason="invalid-dataset") >= 1
    assert "studybridge_task_queue_depth" not in text  # no broker configured


@pytest.mark.parametrize("broker_up", [True, False], ids=["broker-up", "broker-down"])
def test_queue_depth_from_the_broker(tmp_path: Path, broker_up: bool):
    port = 6379 if broker_up else free_port()
    settings = Settings(
        data_dir=tmp_path / "var",
        task_broker_url=f"redis://127.0.0.1:{port}/0",
        task_queue=f"sb-metrics-{tmp_path.name[-12:]}",
    )
    archive = Archive.open(settings, migrate_schema=True)
    text = scrape(settings, archive)
    if not broker_up:
        assert value(text, "studybridge_task_broker_up") == 0
        return
    if value(text, "studybridge_task_broker_up") != 1:
        missing("Redis at 127.0.0.1:6379 not reachable")
    assert f'studybridge_task_queue_depth{{queue="{settings.task_queue}"}} 0.0' in text
