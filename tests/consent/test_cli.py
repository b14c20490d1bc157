"""``studybridge audit|institutions|users`` through the real command line (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import delete, update
from typer.testing import CliRunner

from consent.audit import Attempt, Auditor
from consent.models import AuditRecord
from consent.principals import Kind, Principal
from gateway.archive import Archive
from gateway.cli import app

pytestmark = pytest.mark.fast

runner = CliRunner()


def run(data_dir: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)
    return result.exit_code, result.output


def fill(data_dir: Path, n: int = 5) -> None:
    from gateway.config import Settings

    archive = Archive.open(Settings(data_dir=data_dir), migrate_schema=True)
    aud = Auditor(archive.db)
    who = Principal(kind=Kind.STAFF, id=1, name="dr\r\nforged", institution="East")
    for i in range(n):
        aud.record(Attempt(who, "dicomweb", "view", "allowed", study_uid=f"1.2.{i}"))
    archive.close()


def tamper(data_dir: Path, stmt) -> None:
    from gateway.config import Settings

    archive = Archive.open(Settings(data_dir=data_dir))
    with archive.db.write_conn() as conn:
        conn.execute(stmt)
    archive.close()


def test_audit_verify_checkpoint_and_tampering(tmp_path: Path):
    data = tmp_path / "var"
    fill(data)
    code, out = run(data, "audit", "verify")
    assert code == 0 and "audit trail intact" in out and "cannot be detected" in out
    code, out = run(data, "audit", "checkpoint")
    assert code == 0 and "checkpoint of 1 chains" in out
    code, out = run(data, "audit", "verify")
    assert code == 0 and "1 signed checkpoints checked" in out
    tamper(data, delete(AuditRecord).where(AuditRecord.seq == 5))  # the tail
    code, out = run(data, "audit", "verify")
    assert code == 1 and "truncated" in out
    tamper(data, update(AuditRecord).where(AuditRecord.seq == 2).values(outcome="denied"))
    code, out = run(data, "audit", "verify")
    assert code == 1 and "record 2: altered" in out


def test_audit_export_formats(tmp_path: Path):
    data = tmp_path / "var"
    fill(data, 2)
    code, out = run(data, "audit", "export", "--format", "fhir")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert json.loads(lines[0])["resourceType"] == "AuditEvent"
    code, out = run(data, "audit", "export", "--format", "dicom")
    assert code == 0 and len(out.splitlines()) == 2 and out.startswith("<AuditMessage>")
    code, out = run(data, "audit", "export", "--format", "text")
    assert code == 0 and len(out.splitlines()) == 2 and "dr\\x0d\\x0aforged" in out
    code, out = run(data, "audit", "public-key")
    assert code == 0 and "BEGIN PUBLIC KEY" in out


def test_institutions_and_users(tmp_path: Path):
    data = tmp_path / "var"
    assert run(data, "institutions", "add", "North", "--issuer", "NORTH")[0] == 0
    assert run(data, "institutions", "add", "North")[0] == 1
    assert (
        run(
            data,
            "peers",
            "add",
            "NORTHPACS",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
            "--institution",
            "North",
        )[0]
        == 0
    )
    code, out = run(data, "institutions", "add-client", "North", "viewer")
    assert code == 0 and "secret (shown once)" in out
    code, out = run(data, "institutions", "list")
    assert "NORTHPACS" in out and "viewer" in out
    code, out = run(data, "institutions", "disable-client", "North", "viewer")
    assert code == 0 and "disabled" in out
    code, out = run(data, "institutions", "list")
    assert "viewer" not in out  # the list names enabled clients only
    assert run(data, "institutions", "disable-client", "North", "nobody")[0] == 1
    code, _ = run(
        data,
        "users",
        "add",
        "rad",
        "--kind",
        "staff",
        "--institution",
        "North",
        "--role",
        "radiologist",
    )
    assert code == 0
    assert run(data, "users", "add", "pat", "--kind", "patient")[0] == 0
    assert run(data, "users", "add", "bad", "--kind", "staff")[0] == 1
    code, out = run(data, "users", "list")
    assert "rad" in out and "radiologist" in out and "pat" in out
    result = runner.invoke(
        app,
        ["users", "set-password", "rad", "--data-dir", str(data)],
        input="correct horse battery\ncorrect horse battery\n",
    )
    assert result.exit_code == 0, result.output
    code, out = run(data, "users", "enable-totp", "rad")
    assert code == 0 and "otpauth://totp/" in out
    from consent.accounts import sign_in
    from gateway.config import Settings

    archive = Archive.open(Settings(data_dir=data))
    try:
        import pyotp

        secret = out.split("secret=")[1].split("&")[0]
        assert sign_in(archive.db, "rad", "correct horse battery", pyotp.TOTP(secret).now())
    finally:
        archive.close()
    assert run(data, "users", "disable", "rad")[0] == 0
    assert run(data, "users", "disable", "nobody")[0] == 1
    code, out = run(data, "users", "list")
    assert any(line.split()[1:2] == ["rad"] and "yes" in line for line in out.splitlines())
    assert run(data, "institutions", "disable", "North")[0] == 0
    assert run(data, "institutions", "disable", "Nowhere")[0] == 1
    code, out = run(data, "institutions", "list")
    assert any("North" in line and "yes" in line for line in out.splitlines())


def test_links_list_show_revoke_never_print_a_token(site, caplog: pytest.LogCaptureFixture):
    from consent.audit import iter_records
    from consent.links import LinkRefused, LinkRules, create_link, exchange
    from tests.consent.conftest import POLICY

    settings = site.archive.settings
    env = {"STUDYBRIDGE_DATABASE_URL": settings.database_url} if settings.database_url else {}

    def cli(*args: str) -> tuple[int, str]:
        result = runner.invoke(
            app, [*args, "--data-dir", str(settings.data_dir)], env=env, catch_exceptions=False
        )
        return result.exit_code, result.output

    rules = LinkRules(single_use=False, access_code="4711", label="for Dr Kim")
    link_id, token = create_link(site.db, site.p("alice"), [site.studies["a1"]], rules, POLICY)
    issued = exchange(site.db, token, POLICY, client="10.0.0.9", access_code="4711")
    _other, other_token = create_link(
        site.db, site.p("alice"), [site.studies["a3"]], LinkRules(), POLICY
    )
    code, table = cli("links", "list", "--user", "alice")
    assert code == 0 and "alice" in table and "usable" in table
    code, listed = cli("links", "list", "--user", "alice", "--json")
    rows = {row["id"]: row for row in map(json.loads, listed.splitlines())}
    assert rows[link_id]["label"] == "for Dr Kim" and rows[link_id]["has_access_code"]
    assert cli("links", "list", "--user", "bob", "--json")[1] == ""
    code, shown = cli("links", "show", str(link_id))
    assert code == 0, shown
    view = json.loads(shown)
    assert view["owner"] == "alice" and view["status"] == "usable" and view["opened"] == 1
    assert view["study_uids"] == [site.studies["a1"]]
    assert cli("links", "show", "999999")[0] == 1
    assert cli("links", "revoke", str(link_id), "--reason", "x")[0] == 1  # a reason is needed
    code, revoked = cli("links", "revoke", str(link_id), "--reason", "sent to the wrong person")
    assert code == 0 and "cannot be recalled" in revoked
    # Effective at once: the link and the access token it gave are dead.
    from consent.tokens import resolve

    assert resolve(site.db, issued.token) is None
    with pytest.raises(LinkRefused):
        exchange(site.db, token, POLICY, client="10.0.0.9", access_code="4711")
    code, live = cli("links", "list", "--live", "--json")
    assert code == 0
    assert [json.loads(line)["id"] for line in live.splitlines()] == [_other]
    records = [r for r in iter_records(site.db) if r.operation == "link-revoke"]
    assert len(records) == 1 and "wrong person" in records[0].detail
    assert records[0].door == "cli" and records[0].principal_name.startswith("cli:")
    everything = table + listed + shown + revoked + live + caplog.text
    for secret in (token, other_token, issued.token, token[4:], issued.token[5:]):
        assert secret not in everything


def test_audit_exports_mask_national_ids(tmp_path: Path):
    from gateway.config import Settings

    data = tmp_path / "var"
    archive = Archive.open(Settings(data_dir=data), migrate_schema=True)
    aud = Auditor(archive.db)
    who = Principal(kind=Kind.SYSTEM, id=0, name="FINDSCU", institution="East")
    aud.record(Attempt(who, "dimse", "search", "allowed", detail="PatientID=900101-1234567"))
    aud.close()
    archive.close()
    import base64
    import re

    for fmt in ("text", "fhir", "dicom"):
        code, out = run(data, "audit", "export", "--format", fmt)
        assert code == 0
        # FHIR and DICOM carry the query detail base64-encoded: decode to look.
        encoded = re.findall(r'<ParticipantObjectQuery>([^<]+)<|"query": ?"([^"]+)"', out)
        decoded = [base64.b64decode(a or b).decode() for a, b in encoded]
        assert decoded or fmt == "text", out
        shown = "\n".join([out, *decoded])
        assert "900101-1******" in shown, fmt
        assert "1234567" not in shown, fmt


def test_users_bind_oidc(tmp_path: Path):
    data = tmp_path / "var"
    assert run(data, "users", "add", "pat", "--kind", "patient")[0] == 0
    assert run(data, "users", "add", "other", "--kind", "patient")[0] == 0
    assert run(data, "users", "add", "op", "--kind", "operator")[0] == 0
    idp = "https://idp.example.org"
    how = ["--by", "op", "--evidence", "passport checked at the desk"]

    def bind(*args: str) -> tuple[int, str]:
        return run(data, "users", "bind-oidc", *args, *how)

    code, out = bind("pat", "--subject", "s-1", "--issuer", idp)
    assert code == 0 and "bound" in out
    # No issuer named and none configured; a subject bound already; an unknown user;
    # a non-operator taking responsibility.
    assert bind("other", "--subject", "s-2")[0] == 1
    assert bind("other", "--subject", "s-1", "--issuer", idp)[0] == 1
    assert bind("nobody", "--subject", "s-3", "--issuer", idp)[0] == 1
    refused = run(data, "users", "bind-oidc", "other", "--subject", "s-4", "--issuer", idp,
                  "--by", "pat", "--evidence", "passport checked at the desk")  # fmt: skip
    assert refused[0] == 1
    from consent.models import User
    from gateway.archive import Archive
    from gateway.config import Settings

    archive = Archive.open(Settings(data_dir=data))
    try:
        with archive.db.reading() as session:
            bound = {u.username: u.oidc_subject for u in session.query(User)}
    finally:
        archive.close()
    assert bound == {"pat": f"{idp}#s-1", "other": "", "op": ""}
    assert bind("pat", "--subject", "")[0] == 0  # unbind
    code, out = run(data, "audit", "export", "--format", "text")
    assert code == 0 and out.count("bind-oidc") == 2, out
