"""A forward interrupted by an absent PACS is finished by ``studybridge serve`` itself:
the supervisor resumes due jobs every ``resume_interval`` (no broker), once the
receiving PACS (dcmtk storescp) is back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.factories import ct_series
from tests.servers import dcmtk_env, free_port, require_tool, running_gateway, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_serve_resumes_a_queued_forward(tmp_path: Path) -> None:
    exe = require_tool("storescp")
    paths = ct_series(tmp_path / "study", 2)
    study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    with running_gateway(tmp_path, {"STUDYBRIDGE_RESUME_INTERVAL": "1"}) as gw:
        gw.cli("import", str(tmp_path / "study"), "--institution", "Test Hospital")
        gw.cli(
            "peers",
            "add",
            "LATER",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--institution",
            "Test Hospital",
        )
        # Nobody listens yet: the first attempt fails and the job stays queued.
        first = gw.cli(
            "forward", study_uid, "--to", "LATER", "--backoff", "1", "--timeout", "0.5",
            "--json", *gw.staff(), check=False,
        )  # fmt: skip
        assert first.returncode == 1, first.stderr
        job = json.loads(first.stdout)
        assert (job["status"], job["attempts"], job["instances"]["pending"]) == ("queued", 1, 2)

        pacs = subprocess.Popen(
            [exe, "-aet", "LATER", "+uf", "-od", str(out), "--fork", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dcmtk_env(),
            start_new_session=True,
        )
        try:
            wait_port(port, 20, pacs)
            gw.start("--dimse-workers", "1")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                [state] = json.loads(gw.cli("jobs", "--json").stdout)
                if state["status"] == "done":
                    break
                time.sleep(0.5)
            assert state["status"] == "done", state
            assert state["instances"] == {"pending": 0, "sent": 2, "failed": 0}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pacs.pid, signal.SIGTERM)
            pacs.wait(10)
        received = sorted(pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir())
        assert received == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
        assert gw.stop() == 0
