"""`studybridge tasks` and `studybridge worker` on the embedded default (no broker)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app

pytestmark = pytest.mark.fast

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUDYBRIDGE_TASK_BROKER_URL", raising=False)
    monkeypatch.delenv("STUDYBRIDGE_CONFIG", raising=False)


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={}, catch_exceptions=False)
    return result.exit_code, result.output


def test_tasks_status_without_a_broker_lists_the_tasks(tmp_path: Path):
    code, out = _run("tasks", "--json", "--data-dir", str(tmp_path / "var"))
    assert code == 0
    figures = json.loads(out)
    assert figures["broker"] is None
    assert {"studybridge.prepare_series", "studybridge.sweep"} <= set(figures["tasks"])


def test_tasks_run_sweeps_here_and_reports(tmp_path: Path):
    data = tmp_path / "var"
    assert _run("db", "upgrade", "--data-dir", str(data))[0] == 0
    orphan = data / "blobs" / "studies" / "1.2" / "1.3" / "1.4.0123456789abcdef.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left behind")
    then = time.time() - 7200
    os.utime(orphan, (then, then))
    code, out = _run("tasks", "run", "studybridge.sweep", "grace=3600", "--data-dir", str(data))
    assert code == 0, out
    assert '"orphans_removed": 1' in out
    assert not orphan.exists()


def test_tasks_run_refuses_unknown_names_and_bad_arguments(tmp_path: Path):
    data = str(tmp_path / "var")
    assert _run("tasks", "run", "studybridge.nope", "--data-dir", data)[0] == 2
    assert _run("tasks", "run", "studybridge.sweep", "grace", "--data-dir", data)[0] == 2


def test_worker_and_submit_need_a_broker(tmp_path: Path):
    data = str(tmp_path / "var")
    code, out = _run("tasks", "submit", "studybridge.sweep", "--data-dir", data)
    assert code == 2 and "no task broker" in out
    result = runner.invoke(app, ["worker", "--data-dir", data], env={})
    assert result.exit_code != 0
    assert "no task broker configured" in str(result.exception or result.output)
