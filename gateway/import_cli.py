"""Console front of ``studybridge import PATH``: a progress bar, then a summary or JSON.

The typer command calls ``run_import`` and exits with its return value:

- 0: every file was imported (or skipped as not DICOM);
- 1: some files failed (listed in the summary or the JSON);
- 2: nothing could be imported: the path does not exist or cannot be read as a
  folder, DICOMDIR or zip file;
- 130: interrupted (Ctrl-C); running the import again continues where it stopped
  (files already imported are reported as duplicates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gateway.importer import (
    ImportItem,
    ImportOutcome,
    ImportReport,
    ImportSourceError,
    import_path,
    plan_import,
    render_summary,
)

if TYPE_CHECKING:
    from gateway.archive import Archive

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_NO_SOURCE = 2
EXIT_INTERRUPTED = 130

_NAME_WIDTH = 40


# A bulk import (a migration from another archive, not one CD): PostgreSQL's planner
# statistics are refreshed at its end rather than when autovacuum next comes by.
BULK_IMPORT = 1000


def run_import(
    archive: Archive,
    path: Path,
    *,
    issuer: str | None,
    institution: str,
    json_output: bool,
    console: Console,
    transfer_id: int | None = None,
) -> int:
    """Import ``path`` with a progress bar on ``console``; return the exit code."""
    path = Path(path).expanduser()
    if not path.exists():
        _error(console, f"{path}: no such file or folder", json_output)
        return EXIT_NO_SOURCE
    done = 0
    try:
        if json_output:
            # Nothing but the JSON document goes to the console.
            report = import_path(
                archive, path, issuer=issuer, institution=institution, transfer_id=transfer_id
            )
        else:
            with console.status(f"Scanning {escape(str(path))} ..."):
                plan = plan_import(archive, path)
            with Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("Importing", total=plan.total, failed=0)
                failed = 0

                def advance(item: ImportItem) -> None:
                    nonlocal done, failed
                    done += 1
                    failed += item.outcome is ImportOutcome.FAILED
                    bar.update(
                        task, advance=1, description=escape(_short(item.name)), failed=failed
                    )

                report = import_path(
                    archive,
                    path,
                    issuer=issuer,
                    institution=institution,
                    transfer_id=transfer_id,
                    progress=advance,
                    plan=plan,
                )
    except ImportSourceError as exc:
        _error(console, str(exc), json_output)
        return EXIT_NO_SOURCE
    except KeyboardInterrupt:
        if not json_output:
            console.print(
                f"[yellow]Interrupted after {done} files.[/] Run the import again to "
                "continue: files already imported are reported as duplicates."
            )
        return EXIT_INTERRUPTED
    if report.imported >= BULK_IMPORT and archive.db.analyze() and not json_output:
        console.print("Index statistics refreshed (ANALYZE) after a bulk import.")
    _print_report(console, report, json_output)
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def _print_report(console: Console, report: ImportReport, json_output: bool) -> None:
    if json_output:
        console.out(json.dumps(report.as_dict(), indent=2), highlight=False)
        return
    console.out(render_summary(report), highlight=False)
    if report.failed:
        noun = "file" if report.failed == 1 else "files"
        console.print(f"[red]{report.failed} {noun} failed.[/]")


def _error(console: Console, message: str, json_output: bool) -> None:
    if json_output:
        console.out(json.dumps({"error": message}), highlight=False)
    else:
        console.print(f"[red]Cannot import:[/] {escape(message)}")


def _short(name: str) -> str:
    return name if len(name) <= _NAME_WIDTH else "..." + name[-(_NAME_WIDTH - 3) :]
