"""Who may run the transfer and forwarding commands, and the audit trail they leave.

In-process with typer's runner. North sent the study; its clerk may forward it to
North's PACS, not to East's (no consent), and may not run transfer commands;
the operator may run those, and may not forward without break-glass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from consent.models import AuditRecord
from gateway.archive import Archive
from gateway.cli import app
from gateway.config import Settings
from tests.factories import ct_series
from tests.servers import free_port

pytestmark = pytest.mark.fast

runner = CliRunner()


def _run(data: list[str], *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, *data], env={}, catch_exceptions=False)
    return result.exit_code, result.output


def test_forward_and_transfer_commands_check_who_and_audit(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "var")]
    study = str(pydicom.dcmread(ct_series(tmp_path / "in", 2)[0]).StudyInstanceUID)
    assert _run(data, "import", str(tmp_path / "in"), "--institution", "North")[0] == 0
    for name in ("North", "East"):
        assert _run(data, "institutions", "add", name)[0] == 0
    assert _run(data, "users", "add", "clerk", "--kind", "staff", "--institution", "North",
                "--role", "clerk")[0] == 0  # fmt: skip
    assert _run(data, "users", "add", "op", "--kind", "operator")[0] == 0
    closed = str(free_port())  # nothing listens: the job's attempt fails, nothing is sent
    for ae, institution in (("NORTHPACS", "North"), ("EASTPACS", "East")):
        code, out = _run(data, "peers", "add", ae, "--host", "127.0.0.1", "--port", closed,
                         "--institution", institution)  # fmt: skip
        assert code == 0, out

    code, out = _run(data, "forward", study, "--to", "NORTHPACS")
    assert code == 1 and "refused: no such study" in out  # the local operator
    code, out = _run(data, "forward", study, "--to", "EASTPACS", "--as", "clerk")
    assert code == 1 and "may not receive this study" in out
    code, out = _run(data, "forward", study, "--to", "NORTHPACS", "--as", "clerk",
                     "--max-attempts", "1", "--json")  # fmt: skip
    job = json.loads(out[out.index("{") :])
    assert code == 1 and job["status"] == "failed" and "unreachable" in job["last_error"]
    assert (job["requested_by"], job["requester_institution"]) == ("clerk", "North")
    code, out = _run(data, "jobs", "resume", str(job["id"]), "--as", "clerk")
    assert code == 1 and "operators only" in out

    create = ["transfer", "create", "--institution", "Lac", "--issuer", "LAC"]
    code, out = _run(data, *create, "--as", "clerk")
    assert code == 1 and "operators only" in out
    code, out = _run(data, *create, "--as", "op")
    assert code == 0, out
    code, out = _run(data, *create, "--as", "nobody")
    assert code == 2 and "no enabled user account" in out

    archive = Archive.open(Settings(data_dir=tmp_path / "var"))
    try:
        with archive.db.reading() as session:
            rows = session.scalars(
                select(AuditRecord)
                .where(AuditRecord.door == "cli")
                .order_by(AuditRecord.at, AuditRecord.id)
            ).all()
            trail = [(r.principal_name, r.operation, r.outcome) for r in rows]
    finally:
        archive.close()
    assert trail == [
        (trail[0][0], "forward", "denied"),
        ("clerk", "forward", "denied"),
        ("clerk", "forward", "allowed"),
        ("clerk", "job-resume", "denied"),
        ("clerk", "transfer-create", "denied"),
        ("op", "transfer-create", "allowed"),
    ]
    assert trail[0][0].startswith("local:")
    assert _run(data, "audit", "verify")[0] == 0
