"""What every ``studybridge`` command group shares: common options, settings, archive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

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
