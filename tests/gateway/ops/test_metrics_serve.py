"""A running gateway: /metrics adds up every process, JSON logs, request IDs, probes."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.factories import ct_series
from tests.servers import require_tool, run_tool, running_gateway

pytestmark = pytest.mark.integration


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_across_processes_and_json_logs(tmp_path):
    files = ct_series(tmp_path / "study", 12)
    env = {"STUDYBRIDGE_LOG_FORMAT": "json", "STUDYBRIDGE_LOG_LEVEL": "INFO"}
    with running_gateway(tmp_path, env) as gw:
        gw.cli(
            "peers",
            "add",
            "STORESCU",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
            "--institution",
            "Test Hospital",
        )
        gw.start("--dimse-workers", "2")
        storescu = require_tool("storescu")
        # Three associations, so both receiving processes are likely to take some.
        for part in (files[:4], files[4:8], files[8:]):
            result = run_tool(
                [storescu, "-aet", "STORESCU", "127.0.0.1", str(gw.dimse_port), *map(str, part)]
            )
            assert result.returncode == 0, result.stderr
        # An unregistered AE is refused (and counted, and logged with its association ID).
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(Verification)
        assert not ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title).is_established
        base = f"http://127.0.0.1:{gw.http_port}"
        token = gw.access_token("Test Hospital")  # the institution that sent the study
        with httpx.Client(base_url=base, timeout=30) as client:
            answer = client.get(
                "/dicom-web/studies",
                headers={"X-Request-ID": "trace-me-1", "Authorization": f"Bearer {token}"},
            )
            assert answer.status_code == 200
            assert len(answer.json()) == 1
            assert answer.headers["x-request-id"] == "trace-me-1"
            made_up = client.get("/healthz").headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", made_up)
            assert client.get("/readyz").json() == {"status": "ready"}
            metrics = client.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
        assert (
            sample(text, "studybridge_instances_received_total", door="dimse", outcome="stored")
            == 12
        )
        size = sum(len(f.read_bytes()) for f in files)
        assert 0.9 * size < sample(text, "studybridge_bytes_received_total", door="dimse") <= size
        assert sample(text, "studybridge_ingest_seconds_count", door="dimse") == 12
        assert sample(text, "studybridge_dimse_associations_total", result="accepted") == 3
        assert sample(text, "studybridge_dimse_associations_total", result="rejected") == 1
        assert sample(text, "studybridge_query_seconds_count", level="STUDY") >= 1
        assert gw.stop() == 0
    lines = [line for line in gw.log_text().splitlines() if line.startswith("{")]
    assert lines, gw.log_text()
    entries = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    refused = [e for e in entries if "refused association" in e["message"]]
    assert refused and re.fullmatch(r"assoc-[0-9a-f]{16}", refused[0]["request_id"])
