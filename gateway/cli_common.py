"""What every ``studybridge`` command group shares: common options, settings, archive."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from consent.audit import Attempt, Auditor
from consent.principals import Kind, Principal, principal_by_username
from gateway.archive import Archive
from gateway.config import Settings, load_settings

console = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data folder (default ./var).", show_default=False),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", help="TOML configuration file.", exists=True, dir_okay=False),
]


def settings_from(data_dir: Path | None, config: Path | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, data_dir=data_dir, **overrides)
    except Exception as exc:  # pydantic's ValidationError, a bad TOML file
        err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc


def open_archive(settings: Settings) -> Archive:
    return Archive.open(settings, migrate_schema=True)


JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error; the Exit to raise with ``code``."""
    err.print(f"[red]{escape(message)}[/red]")
    return typer.Exit(code)


# -- who runs a command (audited CLI actions) -----------------------------------------------
ActAs = Annotated[
    str | None,
    typer.Option(
        "--as",
        help="User account acting (audited); default: the local operator (your login), "
        "refused in the production profile.",
        show_default=False,
    ),
]


def acting_principal(settings: Settings, archive: Archive, username: str | None) -> Principal:
    """Who runs an audited command: the enabled account ``--as`` names, or the local
    operator (shell access to the data folder is the operator's power anyway),
    named after the login so the audit trail says who. The production profile
    requires an account."""
    if username:
        principal = principal_by_username(archive.db, username)
        if principal is None:
            raise fail(f"no enabled user account {username!r}")
        return principal
    if settings.profile == "production":
        raise fail("the production profile needs --as USER (an operator or staff account)")
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "unknown"
    return Principal(kind=Kind.OPERATOR, id=0, name=f"local:{login}")


def need_operator(principal: Principal) -> None:
    """Refuse a command that only the installation's operators may run."""
    if principal.kind is not Kind.OPERATOR:
        raise fail(f"{principal.name} is a {principal.kind.value} account; operators only", 1)


def cli_auditor(settings: Settings, archive: Archive) -> Auditor:
    """The audit writer of one CLI command (``close()`` it to write repeat counts)."""
    return Auditor(archive.db, window_seconds=settings.audit_window_seconds)


def operator_action(
    settings: Settings,
    archive: Archive,
    act_as: str | None,
    operation: str,
    *,
    detail: str = "",
    study_uid: str = "",
) -> Principal:
    """An operator-only command: who runs it (``acting_principal``), refused unless an
    operator, and audited (allowed or denied) before anything is done."""
    principal = acting_principal(settings, archive, act_as)
    allowed = principal.kind is Kind.OPERATOR
    auditor = cli_auditor(settings, archive)
    try:
        auditor.record(
            Attempt(
                principal=principal,
                door="cli",
                operation=operation,
                outcome="allowed" if allowed else "denied",
                study_uid=study_uid,
                detail=detail,
            )
        )
    finally:
        auditor.close()
    need_operator(principal)
    return principal
