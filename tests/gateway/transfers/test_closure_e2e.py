"""A closure transfer end to end with real peers.

dcmtk's dcmqrscp plays the closing clinic's PACS (census by C-FIND, split by date
ranges); the clinic pushes by dcmtk storescu calling as its registered AE title into
a running ``studybridge serve``; the operator drives everything with the CLI.

It runs on both ``serve_stack``s: the embedded default (SQLite + files, tasks in
process) and the production combination: PostgreSQL, SeaweedFS S3 and a
``studybridge worker`` taking the post-ingest tasks from Redis, while the due pull
is still run by the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.tasks.derived import PREPARE_SERIES
from tests.conftest import ServeStack
from tests.factories import ct_series
from tests.servers import dcmqrscp, require_tool, run_tool, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _clinic_studies(tmp: Path) -> dict[str, list[Path]]:
    """Three studies on three dates: A (two series, 3 + 2), B (2), C (1)."""
    import pydicom

    a1 = ct_series(tmp / "A1", 3, patient_id="LAC-1", study_date="20230110")
    study_a = str(pydicom.dcmread(a1[0]).StudyInstanceUID)
    a2 = ct_series(
        tmp / "A2", 2, patient_id="LAC-1", study_date="20230110", study_uid=study_a, modality="CT"
    )
    b = ct_series(tmp / "B", 2, patient_id="LAC-2", study_date="20230615")
    c = ct_series(tmp / "C", 1, patient_id="LAC-3", study_date="20231120")
    return {"A": a1 + a2, "B": b, "C": c}


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_closure_incomplete_then_pulled_complete(tmp_path: Path, serve_stack: ServeStack) -> None:
    storescu = require_tool("storescu")
    # Resumption is driven by the test here (`tasks run`), not the supervisor.
    env = {**serve_stack.env, "STUDYBRIDGE_RESUME_INTERVAL": "0"}
    studies = _clinic_studies(tmp_path / "src")
    every = [p for paths in studies.values() for p in paths]
    with (
        running_gateway(tmp_path, env) as gw,
        dcmqrscp(tmp_path, move_destinations={"STUDYBRIDGE": gw.dimse_port}) as (qr_port, _),
    ):
        done = run_tool([storescu, "-aec", "CLINIC", "127.0.0.1", str(qr_port), *map(str, every)])
        assert done.returncode == 0, done.stderr
        gw.cli(
            "peers",
            "add",
            "CLINIC",
            "--host",
            "127.0.0.1",
            "--port",
            str(qr_port),
            "--institution",
            "Test Hospital",
        )
        created = gw.cli(
            "transfer", "create", "--institution", "Clinique du Lac", "--issuer", "LAC",
            "--ae", "CLINIC", "--effective-on", "2026-12-31", "--custodian", "Bridge Ltd",
            "--json",
        )  # fmt: skip
        tid = str(json.loads(created.stdout)["id"])

        # Census: a cap of 2 forces the date range to be split (three studies, three dates).
        census = gw.cli(
            "transfer", "census", tid, "--from", "2023-01-01", "--to", "2023-12-31",
            "--cap", "2", "--json",
        )  # fmt: skip
        figures = json.loads(census.stdout)
        assert (figures["studies"], figures["series"], figures["instances"]) == (3, 4, 8)
        assert figures["queries"] > 3 + 4 + 4  # the study range was split

        gw.start("--dimse-workers", "1")
        # The clinic pushes A and B (and A's first image twice), never C.
        sent = studies["A"] + studies["B"] + studies["A"][:1]
        push = run_tool(
            [storescu, "-aet", "CLINIC", "-aec", "STUDYBRIDGE", "127.0.0.1",
             str(gw.dimse_port), *map(str, sent)]
        )  # fmt: skip
        assert push.returncode == 0, push.stderr

        shown = json.loads(gw.cli("transfer", "show", tid, "--json").stdout)
        assert shown["status"] == "receiving"
        report = json.loads(gw.cli("transfer", "report", tid, "--json").stdout)
        status = {s["study_uid"]: s["status"] for s in report["studies"]}
        assert status == {
            _uid(studies["A"][0]): "complete",
            _uid(studies["B"][0]): "complete",
            _uid(studies["C"][0]): "missing",
        }
        assert report["counts"]["duplicates"] == 1
        assert report["counts"]["instances"] == 7

        out = tmp_path / "receipt.json"
        final = gw.cli("transfer", "finalize", tid, "--out", str(out), check=False)
        assert final.returncode == 1, final.stderr
        receipt = json.loads(out.read_text())
        assert receipt["receipt"]["status"] == "incomplete"
        assert [m["study_uid"] for m in receipt["receipt"]["missing"]] == [_uid(studies["C"][0])]
        readable = out.with_suffix(".txt").read_text()
        assert "INCOMPLETE" in readable and _uid(studies["C"][0]) in readable

        ok = gw.cli("transfer", "verify-receipt", str(out), "--against-archive")
        assert "valid receipt" in ok.stdout

        # Anyone holding the public key can verify it too.
        pem = tmp_path / "gateway.pub"
        pem.write_text(gw.cli("transfer", "public-key").stdout)
        gw.cli("transfer", "verify-receipt", str(out), "--public-key", str(pem))

        tampered = tmp_path / "tampered.json"
        doc = json.loads(out.read_text())
        doc["receipt"]["missing"] = []
        doc["receipt"]["status"] = "complete"
        tampered.write_text(json.dumps(doc))
        bad = gw.cli("transfer", "verify-receipt", str(tampered), check=False)
        assert bad.returncode == 1 and "INVALID" in bad.stdout

        # Pull mode, first while our DICOM node is down: the clinic's PACS cannot
        # deliver, the C-MOVE fails and the item stays pending for a retry.
        assert gw.stop() == 0
        down = gw.cli("transfer", "pull", tid, "--backoff", "0.2", "--json", check=False)
        assert down.returncode == 1, down.stderr
        state = json.loads(down.stdout)
        assert (state["planned"], state["failed_attempts"], state["pending"]) == (1, 1, 1)
        # The node is back: the pull task (as a worker or cron runs it) finds the
        # transfer with a retry due, resumes from the stored state and completes.
        gw.start("--dimse-workers", "1")
        up = gw.cli("tasks", "run", "studybridge.transfer_pull")
        state = json.loads(up.stdout.split(": ", 1)[1])[tid]
        assert (state["moved"], state["done"], state["pending"]) == (1, 1, 0)

        out2 = tmp_path / "receipt2.json"
        final = gw.cli("transfer", "finalize", tid, "--out", str(out2))
        receipt = json.loads(out2.read_text())["receipt"]
        assert receipt["status"] == "complete" and receipt["missing"] == []
        assert receipt["counts"]["instances"] == 8
        ok = gw.cli("transfer", "verify-receipt", str(out2), "--against-archive")
        assert "valid receipt" in ok.stdout
        # Nothing more to pull from a complete transfer.
        assert gw.cli("transfer", "pull", tid, check=False).returncode == 2
        assert gw.stop() == 0
    # Production: the worker prepared what the pushes asked for (series metadata).
    serve_stack.wait_for_task(PREPARE_SERIES)
