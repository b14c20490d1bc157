"""Operator commands for consent and audit: ``studybridge audit|institutions|users|links``.

``audit verify`` walks every hash chain and, when the signed checkpoint file exists,
checks that no signed record has gone; ``audit checkpoint`` appends one (run it
from cron or a timer; copy the file off the host). Secrets printed here (client
secrets) are shown once and stored only as hashes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import select

from consent import audit
from consent.accounts import enable_totp, set_password
from consent.links import LinkView, find_links, revoke_any_link
from consent.models import User
from consent.oidc import bind_subject
from consent.patients import Relation, link_patient, unlink_patient
from consent.principals import (
    ConsentError,
    Kind,
    Principal,
    Role,
    add_dicomweb_client,
    add_institution,
    add_user,
    disable_client,
    disable_institution,
    disable_username,
    list_institutions,
    list_users,
    user_principal,
)
from gateway.archive import Archive
from gateway.cli_common import ConfigFile, DataDir, console, err, open_archive, settings_from
from gateway.config import Settings
from gateway.peers import PeerRegistry

audit_app = typer.Typer(help="Verify, checkpoint and export the audit trail.")
institutions_app = typer.Typer(help="Institutions and their DICOMweb clients.")
users_app = typer.Typer(help="User accounts: patients, staff, operators, auditors.")
links_app = typer.Typer(
    help="Patients' share links: list, show, revoke (tokens are never shown: only hashes "
    "are stored)."
)


def _open(data_dir: Path | None, config: Path | None) -> tuple[Settings, Archive]:
    settings = settings_from(data_dir, config)
    return settings, open_archive(settings)


# -- audit ------------------------------------------------------------------------------------
@audit_app.command("verify")
def audit_verify(
    checkpoints: Annotated[
        Path | None, typer.Option(help="Signed checkpoint file (default: the configured one).")
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(help="Public key PEM (default: derived from the configured signing key)."),
    ] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Detect altered, deleted or reordered audit records, and a truncated tail."""
    settings, archive = _open(data_dir, config)
    try:
        checkpoints = checkpoints or settings.resolved_audit_checkpoint_file
        key = None
        if public_key is not None:
            key = audit.load_public_key(public_key.read_bytes())
        elif settings.resolved_audit_key_file.exists():
            key = audit.load_or_create_signing_key(settings.resolved_audit_key_file).public_key()
        if checkpoints.exists() and key is None:
            err.print("[red]checkpoints exist but no public key was given[/red]")
            raise typer.Exit(2)
        report = audit.verify(archive.db, checkpoints if checkpoints.exists() else None, key)
    finally:
        archive.close()
    for problem in report.problems:
        console.print(f"[red]PROBLEM[/red] {audit.escape_text(problem)}")
    console.print(
        f"{report.records} records in {report.chains} chains, "
        f"{report.checkpoints} signed checkpoints checked"
    )
    if not checkpoints.exists():
        console.print("no signed checkpoints yet: a truncated tail cannot be detected")
    if not report.ok:
        raise typer.Exit(1)
    console.print("audit trail intact")


@audit_app.command("checkpoint")
def audit_checkpoint(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Append a signed checkpoint of every chain's head (creates the key if missing)."""
    settings, archive = _open(data_dir, config)
    try:
        key = audit.load_or_create_signing_key(settings.resolved_audit_key_file)
        entry = audit.write_checkpoint(archive.db, key, settings.resolved_audit_checkpoint_file)
    finally:
        archive.close()
    console.print(
        f"checkpoint of {len(entry['heads'])} chains appended to "
        f"{settings.resolved_audit_checkpoint_file}"
    )


@audit_app.command("public-key")
def audit_public_key(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Print the checkpoint signing key's public half (PEM)."""
    settings = settings_from(data_dir, config)
    key = audit.load_or_create_signing_key(settings.resolved_audit_key_file)
    typer.echo(audit.public_key_pem(key), nl=False)


class ExportFormat(StrEnum):
    FHIR = "fhir"
    DICOM = "dicom"
    TEXT = "text"


@audit_app.command("export")
def audit_export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="fhir, dicom or text")] = (
        ExportFormat.FHIR
    ),
    since: Annotated[str | None, typer.Option(help="ISO date/time (UTC) to start at.")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Export records: FHIR AuditEvent (JSON lines), DICOM audit messages (PS3.15 A.5,
    one per line) or escaped text lines; national identification numbers masked."""
    start = None
    if since:
        start = dt.datetime.fromisoformat(since)
        start = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
    _settings, archive = _open(data_dir, config)
    try:
        for stored in audit.iter_records(archive.db, since=start):
            # Exports leave the host: national identification numbers never do.
            row = audit.masked(stored)
            if fmt is ExportFormat.FHIR:
                line = json.dumps(audit.to_fhir(row), ensure_ascii=False)
            elif fmt is ExportFormat.DICOM:
                line = audit.to_dicom_xml(row)
            else:
                line = audit.render_line(audit.row_values(row))
            typer.echo(line)
    finally:
        archive.close()


# -- institutions -----------------------------------------------------------------------------
@contextlib.contextmanager
def _admin(data_dir: Path | None, config: Path | None) -> Iterator[tuple[Archive, audit.Auditor]]:
    """The archive and an auditor for one administrative command; a refusal
    (``ConsentError``) becomes a red message and exit status 1."""
    settings, archive = _open(data_dir, config)
    auditor = audit.Auditor(archive.db, window_seconds=settings.audit_window_seconds)
    try:
        yield archive, auditor
    except ConsentError as exc:
        raise _fail(exc) from exc
    finally:
        auditor.close()
        archive.close()


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]{exc}[/red]")
    return typer.Exit(1)


@institutions_app.command("add")
def institutions_add(
    name: Annotated[str, typer.Argument(help="As the peer registry and ingest name it.")],
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID it assigns.")] = "",
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register an institution."""
    with _admin(data_dir, config) as (archive, _auditor):
        add_institution(archive.db, name, issuer=issuer, description=description)
    console.print(f"institution {name} registered")


@institutions_app.command("add-client")
def institutions_add_client(
    name: Annotated[str, typer.Argument(help="Institution.")],
    client_id: Annotated[str, typer.Argument(help="DICOMweb client id.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Create DICOMweb client credentials for an institution (secret shown once)."""
    with _admin(data_dir, config) as (archive, _auditor):
        _id, secret = add_dicomweb_client(archive.db, name, client_id)
    console.print(f"client {client_id} of {name}; secret (shown once): {secret}")


@institutions_app.command("disable-client")
def institutions_disable_client(
    name: Annotated[str, typer.Argument(help="Institution.")],
    client_id: Annotated[str, typer.Argument(help="DICOMweb client id.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Disable a DICOMweb client: it gets no new token, its tokens are refused from now on."""
    with _admin(data_dir, config) as (archive, _auditor):
        disable_client(archive.db, name, client_id)
    console.print(f"client {client_id} of {name} disabled")


@institutions_app.command("list")
def institutions_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Institutions with their DIMSE peers (from the peer registry) and DICOMweb clients."""
    _s, archive = _open(data_dir, config)
    try:
        insts = list_institutions(archive.db)
        peers = PeerRegistry(archive.db).list()
    finally:
        archive.close()
    table = Table("institution", "issuer", "DIMSE peers", "DICOMweb clients", "disabled")
    for inst in insts:
        table.add_row(
            inst.name,
            inst.issuer,
            ", ".join(p.ae_title for p in peers if p.institution == inst.name),
            ", ".join(inst.clients),
            "yes" if inst.disabled else "",
        )
    console.print(table)


@institutions_app.command("disable")
def institutions_disable(
    name: Annotated[str, typer.Argument(help="Institution.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Disable an institution: its staff, clients and peers are refused from now on."""
    with _admin(data_dir, config) as (archive, _auditor):
        disable_institution(archive.db, name)
    console.print(f"institution {name} disabled")


# -- users --------------------------------------------------------------------------------------
@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument()],
    kind: Annotated[Kind, typer.Option(help="patient, staff, operator or auditor")],
    institution: Annotated[str | None, typer.Option(help="Staff: institution.")] = None,
    role: Annotated[Role | None, typer.Option(help="Staff: role.")] = None,
    display_name: Annotated[str, typer.Option(help="Name shown in pages.")] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Create an account (sign-in methods come with the portal)."""
    with _admin(data_dir, config) as (archive, _auditor):
        add_user(
            archive.db,
            username,
            kind,
            display_name=display_name,
            institution=institution,
            role=role,
        )
    console.print(f"{kind.value} account {username} created")


@users_app.command("list")
def users_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Accounts with their kind, institution and role."""
    _s, archive = _open(data_dir, config)
    try:
        users = list_users(archive.db)
    finally:
        archive.close()
    table = Table("user", "kind", "institution", "role", "disabled")
    for user in users:
        table.add_row(
            user.username, user.kind, user.institution, user.role, "yes" if user.disabled else ""
        )
    console.print(table)


@users_app.command("disable")
def users_disable(
    username: Annotated[str, typer.Argument()],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Disable an account: its sessions and tokens are refused from the next request."""
    with _admin(data_dir, config) as (archive, _auditor):
        disable_username(archive.db, username)
    console.print(f"account {username} disabled")


@users_app.command("set-password")
def users_set_password(
    username: Annotated[str, typer.Argument()],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Set a local account's password (argon2 hash; at least 12 characters)."""
    with _admin(data_dir, config) as (archive, _auditor):
        set_password(archive.db, username, password)
    console.print(f"password of {username} set")


@users_app.command("enable-totp")
def users_enable_totp(
    username: Annotated[str, typer.Argument()],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Give an account a new TOTP secret; prints the otpauth:// URI for its app (once)."""
    with _admin(data_dir, config) as (archive, _auditor):
        uri = enable_totp(archive.db, username)
    typer.echo(f"scan or enter in an authenticator app (shown once): {uri}")


def _account(archive: Archive, username: str) -> int:
    with archive.db.reading() as session:
        user_id = session.scalar(select(User.id).where(User.username == username))
    if user_id is None:
        raise _fail(ConsentError(f"no account {username!r}"))
    return int(user_id)


def _acting(archive: Archive, username: str) -> Principal:
    """The operator or institution admin who takes responsibility for a link."""
    principal = user_principal(archive.db, _account(archive, username))
    if principal is None:
        raise _fail(ConsentError(f"account {username!r} is disabled"))
    return principal


@users_app.command("link-patient")
def users_link_patient(
    username: Annotated[str, typer.Argument(help="The patient's (or proxy's) account.")],
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID.")],
    patient_id: Annotated[str, typer.Option(help="Patient ID at that issuer.")],
    evidence: Annotated[str, typer.Option(help="What identity and relation were checked.")],
    by: Annotated[str, typer.Option(help="Operator or institution admin account.")],
    relation: Annotated[Relation, typer.Option(help="self, guardian or legal-representative.")] = (
        Relation.SELF
    ),
    until: Annotated[
        str | None, typer.Option(help="Proxy links: ISO date it ends (a minor comes of age).")
    ] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Link an account to an archive patient (issuer + Patient ID): the patient themself,
    or a guardian / legal representative acting for them. Audited, never by name matching."""
    ends_at = None
    if until:
        ends_at = dt.datetime.fromisoformat(until)
        ends_at = ends_at if ends_at.tzinfo else ends_at.replace(tzinfo=dt.UTC)
    with _admin(data_dir, config) as (archive, auditor):
        link_id = link_patient(
            archive.db,
            auditor,
            account_id=_account(archive, username),
            issuer=issuer,
            patient_id=patient_id,
            by=_acting(archive, by),
            evidence=evidence,
            relation=relation.value,
            ends_at=ends_at,
        )
    console.print(f"patient link {link_id}: {username} ({relation.value}) -> {issuer}/{patient_id}")


@users_app.command("unlink-patient")
def users_unlink_patient(
    link_id: Annotated[int, typer.Argument(help="Patient link id.")],
    by: Annotated[str, typer.Option(help="Operator or institution admin account.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """End a patient link (a proxy's authority ended, a link made in error). Audited."""
    with _admin(data_dir, config) as (archive, auditor):
        unlink_patient(archive.db, auditor, link_id, by=_acting(archive, by))
    console.print(f"patient link {link_id} ended")


# -- share links --------------------------------------------------------------------------------
def _operator() -> Principal:
    """Who runs this command, as the audit trail names them."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Principal(kind=Kind.OPERATOR, id=0, name=f"cli:{user}"[:64])


def _when(value: dt.datetime | None) -> str:
    return value.isoformat(timespec="minutes") if value else ""


def _link_json(view: LinkView) -> dict[str, object]:
    return {
        "id": view.id,
        "owner": view.owner,
        "label": view.label,
        "status": view.status,
        "study_uids": view.study_uids,
        "created_at": _when(view.created_at),
        "expires_at": _when(view.expires_at),
        "can_download": view.can_download,
        "single_use": view.single_use,
        "has_access_code": view.has_access_code,
        "recipient_institution": view.recipient_institution,
        "opened": view.opened,
        "last_opened_at": _when(view.last_opened_at),
        "used_at": _when(view.used_at),
        "revoked_at": _when(view.revoked_at),
    }


@links_app.command("list")
def links_list(
    user: Annotated[str | None, typer.Option(help="Only this patient's links.")] = None,
    live: Annotated[bool, typer.Option(help="Only links that still work.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Share links, newest first: owner, status, studies, rules, how often opened."""
    _s, archive = _open(data_dir, config)
    try:
        views = find_links(archive.db, username=user, live_only=live)
    finally:
        archive.close()
    if json_output:
        for view in views:
            typer.echo(json.dumps(_link_json(view)))
        return
    table = Table("id", "owner", "status", "studies", "expires", "rules", "opened", "label")
    for v in views:
        rules = [
            "download" if v.can_download else "view",
            *(["single use"] if v.single_use else []),
            *(["code"] if v.has_access_code else []),
            *([f"for {v.recipient_institution}"] if v.recipient_institution else []),
        ]
        table.add_row(
            str(v.id),
            audit.escape_text(v.owner),
            v.status,
            str(len(v.study_uids)),
            _when(v.expires_at),
            ", ".join(rules),
            str(v.opened),
            audit.escape_text(v.label),
        )
    console.print(table)


@links_app.command("show")
def links_show(
    link_id: Annotated[int, typer.Argument(help="Link id (from links list).")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """One link as JSON: its studies, rules, status and openings (never its token)."""
    _s, archive = _open(data_dir, config)
    try:
        views = find_links(archive.db, link_id=link_id)
    finally:
        archive.close()
    if not views:
        raise _fail(ConsentError(f"no share link {link_id}"))
    typer.echo(json.dumps(_link_json(views[0]), indent=2))


@links_app.command("revoke")
def links_revoke(
    link_id: Annotated[int, typer.Argument(help="Link id (from links list).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Revoke a link and its access tokens at once (audited, with the reason)."""
    if len(reason.strip()) < 3:
        raise _fail(ConsentError("say why the link is revoked (--reason)"))
    with _admin(data_dir, config) as (archive, auditor):
        notice = revoke_any_link(archive.db, link_id)
        auditor.record(
            audit.Attempt(
                principal=_operator(),
                door="cli",
                operation="link-revoke",
                outcome="allowed",
                detail=f"link {link_id}: {reason.strip()}"[:500],
            )
        )
    console.print(f"link {link_id} revoked. {notice}")


@users_app.command("bind-oidc")
def users_bind_oidc(
    username: Annotated[str, typer.Argument()],
    subject: Annotated[
        str, typer.Option(help="The provider's `sub` for this person; empty: unbind.")
    ],
    evidence: Annotated[str, typer.Option(help="How the person's identity was checked.")],
    by: Annotated[str, typer.Option(help="Operator account taking responsibility.")],
    issuer: Annotated[
        str, typer.Option(help="The provider's issuer URL (default: the oidc_issuer setting).")
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Bind an account to an OpenID Connect subject, after checking who the person is:
    they then sign in through the identity provider (docs/security.md). Audited."""
    issuer = issuer or settings_from(data_dir, config).oidc_issuer
    with _admin(data_dir, config) as (archive, auditor):
        bind_subject(
            archive.db,
            auditor,
            username,
            issuer,
            subject,
            by=_acting(archive, by),
            evidence=evidence,
        )
    console.print(f"{username} bound to {subject}" if subject else f"{username} unbound")
