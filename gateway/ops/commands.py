"""The operations commands of ``studybridge``: doctor, scrub, db backup/restore.

``gateway.cli`` registers them; each prints plain words and exits non-zero when
something is wrong, so scripts and monitoring can act on the exit code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gateway.archive import Archive
from gateway.cli_common import ConfigFile, DataDir, console, err, settings_from
from gateway.ops.backup import BackupError, backup, restore
from gateway.ops.doctor import Status, diagnose
from gateway.ops.scrub import scrub as run_scrub

_STYLE = {Status.OK: "green", Status.WARNING: "yellow", Status.FAILURE: "red"}


def doctor(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Check every configured backend and say in plain words what is wrong."""
    settings = settings_from(data_dir, config)
    findings = diagnose(settings)
    failed = any(f.status is Status.FAILURE for f in findings)
    if json_output:
        console.print_json(
            json.dumps(
                {
                    "healthy": not failed,
                    "checks": [
                        {"check": f.check, "status": f.status.value, "detail": f.detail}
                        for f in findings
                    ],
                }
            )
        )
    else:
        for f in findings:
            style = _STYLE[f.status]
            console.print(f"[{style}]{f.status.value:>7}[/{style}]  {f.check}: {f.detail}")
        console.print(
            "[red]studybridge cannot work as configured.[/red]"
            if failed
            else "[green]studybridge can work as configured.[/green]"
        )
    raise typer.Exit(1 if failed else 0)


def scrub(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    delete_orphans: Annotated[
        bool,
        typer.Option("--delete-orphans", help="Delete orphan blobs older than the grace period."),
    ] = False,
    grace_hours: Annotated[
        float | None,
        typer.Option(help="Orphans must be this old to count (default: sweep_grace)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Check that every indexed instance has its blob with the recorded SHA-256."""
    settings = settings_from(data_dir, config)
    grace = settings.sweep_grace if grace_hours is None else grace_hours * 3600
    archive = Archive.open(settings)
    try:
        report = run_scrub(
            archive.db, archive.store, orphan_grace=grace, delete_orphans=delete_orphans
        )
    finally:
        archive.close()
    if json_output:
        console.print_json(json.dumps(report.as_dict()))
    else:
        console.print(f"{report.checked} instances checked ({report.bytes_checked} bytes verified)")
        for p in report.problems:
            console.print(f"[red]{p.kind}[/red] {p.sop_uid} ({p.blob_key}): {p.detail}")
        if report.orphans:
            verb = "removed" if delete_orphans else "found (not indexed; --delete-orphans)"
            console.print(f"{len(report.orphans)} orphan blobs {verb}:")
            for key in report.orphans:
                console.print(f"  {key}")
        console.print(
            "[green]every indexed instance is intact[/green]"
            if report.healthy
            else f"[red]{len(report.problems)} instances are missing or damaged[/red]"
        )
    raise typer.Exit(0 if report.healthy else 1)


def db_backup(
    path: Annotated[Path, typer.Argument(help="New file to write the backup to.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Back up the index while the gateway runs (SQLite backup API or pg_dump)."""
    settings = settings_from(data_dir, config)
    try:
        backup(settings.resolved_database_url, path)
    except BackupError as exc:
        err.print(f"[red]backup failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"index backed up to {path}")


def db_restore(
    path: Annotated[Path, typer.Argument(help="A backup made by `studybridge db backup`.")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Replace the current index without asking.")
    ] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Replace the index with a backup (stop every gateway first)."""
    settings = settings_from(data_dir, config)
    if not yes:
        typer.confirm("Replace the current index with this backup?", abort=True)
    try:
        restore(settings.resolved_database_url, path)
    except BackupError as exc:
        err.print(f"[red]restore failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(
        f"index restored from {path}; run `studybridge db upgrade`, then `studybridge scrub`"
    )
