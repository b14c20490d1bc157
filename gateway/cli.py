"""The ``studybridge`` command line (typer).

Every command takes ``--data-dir`` and ``--config`` and otherwise reads the one
settings object (``STUDYBRIDGE_*`` environment variables, TOML file, defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import func, select

from gateway.archive.db import Database, migrate
from gateway.archive.models import IngestEvent, Instance, Patient, Series, Study
from gateway.cli_common import (
    ConfigFile,
    DataDir,
    console,
    err,
    fail,
    open_archive,
    settings_from,
)
from gateway.config import Settings
from gateway.consent_cli import audit_app, institutions_app, links_app, users_app
from gateway.ops import commands as ops_commands
from gateway.ops.doctor import redact_url
from gateway.peers import PeerError, PeerRegistry

app = typer.Typer(
    help="studybridge: move medical images between hospitals without CDs.",
    no_args_is_help=True,
    add_completion=False,
)
peers_app = typer.Typer(help="Register the DICOM peers (PACS, modalities) we talk to.")
db_app = typer.Typer(help="Index database maintenance.")
tasks_app = typer.Typer(help="Background tasks: backlog, running one now, submitting one.")
app.add_typer(peers_app, name="peers")
app.add_typer(db_app, name="db")
app.add_typer(tasks_app, name="tasks")
app.add_typer(audit_app, name="audit")
app.add_typer(institutions_app, name="institutions")
app.add_typer(users_app, name="users")
app.add_typer(links_app, name="links")

_settings = settings_from
_archive = open_archive

app.command()(ops_commands.doctor)
app.command()(ops_commands.scrub)
db_app.command("backup")(ops_commands.db_backup)
db_app.command("restore")(ops_commands.db_restore)


@app.command()
def serve(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    dimse_port: Annotated[int | None, typer.Option(help="DIMSE port (default 11112).")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (default 8080).")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title.")] = None,
    dimse_workers: Annotated[
        int | None, typer.Option(help="Receiving processes (default: one per core, min 2).")
    ] = None,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Demo profile: seed the synthetic demo data (`studybridge demo`), accept "
            "any calling AE title and anonymous HTTP requests. Never with real data.",
        ),
    ] = False,
) -> None:
    """Run the DICOM node and the HTTP app on the configured (or embedded) backends."""
    from gateway.serve import serve as run_serve

    settings = _settings(
        data_dir,
        config,
        dimse_port=dimse_port,
        http_port=http_port,
        ae_title=ae_title,
        dimse_workers=dimse_workers,
        profile="demo" if demo else None,
    )
    if demo:
        _seed_demo(settings)
    raise typer.Exit(run_serve(settings, say=console.print))


def _seed_demo(settings: Settings, ct_slices: int = 250) -> None:
    from gateway.demo.seed import DemoRefused, seed

    archive = _archive(settings)
    try:
        with console.status("Seeding the demo (synthetic patients and studies) ..."):
            summary = seed(settings, archive, ct_slices=ct_slices, say=console.log)
    except DemoRefused as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    for line in summary.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def demo(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    code: Annotated[
        str | None,
        typer.Option(help="Print the current one-time code of this demo account and stop."),
    ] = None,
    ct_slices: Annotated[int, typer.Option(help="Slices of the demo chest CT.")] = 250,
) -> None:
    """Seed the demo's synthetic patients, institutions, studies, accounts and share
    link (marked as demo data; refused by a production configuration). Idempotent."""
    from gateway.demo.seed import DemoRefused, current_code

    settings = _settings(data_dir, config)
    if code is None:
        _seed_demo(settings, ct_slices)
        return
    archive = _archive(settings)
    try:
        console.print(current_code(archive, code), markup=False, highlight=False)
    except DemoRefused as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()


@app.command()
def worker(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    concurrency: Annotated[
        int, typer.Option(help="Task processes (default: one per core, min 2).")
    ] = 0,
    beat: Annotated[
        bool, typer.Option("--beat/--no-beat", help="Also send the periodic sweeps.")
    ] = True,
) -> None:
    """Run background tasks from the broker (task_broker_url: Redis or RabbitMQ)."""
    from gateway.tasks.worker import run_worker

    settings = _settings(data_dir, config)
    raise typer.Exit(
        run_worker(settings, concurrency=concurrency, beat=beat, loglevel=settings.log_level)
    )


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A folder, a disc (DICOMDIR) or a .zip file.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    issuer: Annotated[
        str | None,
        typer.Option(help="Issuer of Patient ID for instances that carry none."),
    ] = None,
    institution: Annotated[str, typer.Option(help="Institution the data comes from.")] = "",
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    transfer: Annotated[
        int | None,
        typer.Option(help="Closure transfer the files belong to (its issuer and institution)."),
    ] = None,
) -> None:
    """Import a CD/DVD, folder or zip through the same ingest as C-STORE."""
    from gateway.import_cli import run_import
    from gateway.transfers.records import TransferError, accepting_transfer, mark_receiving

    settings = _settings(data_dir, config)
    archive = _archive(settings)
    try:
        if transfer is not None:
            try:
                bound = accepting_transfer(archive.db, transfer)
            except TransferError as exc:
                err.print(f"[red]{exc}[/red]")
                raise typer.Exit(2) from exc
            # The transfer's one issuer and institution apply to every file.
            issuer, institution = bound.issuer, institution or bound.institution
            mark_receiving(archive.db, transfer)
        code = run_import(
            archive,
            path,
            issuer=issuer,
            institution=institution,
            json_output=json_output,
            console=console,
            transfer_id=transfer,
        )
    finally:
        archive.close()
    raise typer.Exit(code)


@app.command()
def stats(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """What the archive holds: patients, studies, series, instances, bytes, events."""
    settings = _settings(data_dir, config)
    archive = _archive(settings)
    try:
        with archive.db.reading() as session:
            figures: dict[str, object] = {
                "patients": session.scalar(select(func.count(Patient.id))),
                "studies": session.scalar(select(func.count(Study.id))),
                "series": session.scalar(select(func.count(Series.id))),
                "instances": session.scalar(select(func.count(Instance.id))),
                "bytes": int(session.scalar(select(func.coalesce(func.sum(Instance.size), 0)))),
                "last_received": (session.scalar(select(func.max(Instance.received_at))) or None),
                "by_door": dict(
                    session.execute(
                        select(Instance.door, func.count(Instance.id)).group_by(Instance.door)
                    ).all()
                ),
                "events": dict(
                    session.execute(
                        select(IngestEvent.kind, func.count(IngestEvent.id)).group_by(
                            IngestEvent.kind
                        )
                    ).all()
                ),
            }
    finally:
        archive.close()
    if figures["last_received"] is not None:
        figures["last_received"] = figures["last_received"].isoformat()  # type: ignore[union-attr]
    if json_output:
        console.print_json(json.dumps(figures))
        return
    table = Table(title=f"studybridge archive ({settings.data_dir})", show_header=False)
    for key, value in figures.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


@peers_app.command("add")
def peers_add(
    ae_title: Annotated[str, typer.Argument(help="The peer's AE title.")],
    host: Annotated[str, typer.Option(help="Host it calls from and listens on.")],
    port: Annotated[int, typer.Option(help="Port it listens on (for C-MOVE, forwarding).")],
    institution: Annotated[str, typer.Option(help="Institution name.")] = "",
    issuer: Annotated[
        str, typer.Option(help="Issuer of Patient ID for its data sets that name none.")
    ] = "",
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Open our associations to it with DICOM TLS (its certificate verified).",
        ),
    ] = False,
    tls_ca_file: Annotated[
        str, typer.Option(help="CA (PEM) verifying its certificate (default: tls_ca_file).")
    ] = "",
    tls_server_name: Annotated[
        str, typer.Option(help="Name its certificate must carry (default: --host).")
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register a peer; works before any server runs."""
    archive = _archive(_settings(data_dir, config))
    try:
        peer = PeerRegistry(archive.db).add(
            ae_title,
            host,
            port,
            institution=institution,
            issuer=issuer,
            description=description,
            tls=tls,
            tls_ca_file=tls_ca_file,
            tls_server_name=tls_server_name,
        )
    except PeerError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    how = " (DICOM TLS)" if peer.tls else ""
    console.print(f"peer {peer.ae_title} at {peer.host}:{peer.port}{how} registered")


@peers_app.command("list")
def peers_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List registered peers."""
    archive = _archive(_settings(data_dir, config))
    try:
        peers = PeerRegistry(archive.db).list()
    finally:
        archive.close()
    table = Table("AE title", "host", "port", "TLS", "institution", "issuer")
    for p in peers:
        tls = (p.tls_server_name or "yes") if p.tls else ""
        table.add_row(p.ae_title, p.host, str(p.port), tls, p.institution, p.issuer)
    console.print(table)


@peers_app.command("remove")
def peers_remove(
    ae_title: Annotated[str, typer.Argument(help="The peer's AE title.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Forget a peer: it can no longer associate or receive C-MOVE results."""
    archive = _archive(_settings(data_dir, config))
    try:
        removed = PeerRegistry(archive.db).remove(ae_title)
    finally:
        archive.close()
    if not removed:
        err.print(f"no peer {ae_title}")
        raise typer.Exit(1)
    console.print(f"peer {ae_title} removed")


def _task_kwargs(pairs: list[str]) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            err.print(f"[red]expected key=value, got {pair!r}[/red]")
            raise typer.Exit(2)
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


@tasks_app.callback(invoke_without_command=True)
def tasks_status(
    ctx: typer.Context,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Tasks waiting per queue (the broker's queue depth) and the tasks defined."""
    if ctx.invoked_subcommand is not None:
        return
    from gateway.tasks.celery_app import make_celery, queue_depth
    from gateway.tasks.registry import all_tasks

    settings = _settings(data_dir, config)
    names = sorted(all_tasks())
    if not settings.task_broker_url:
        figures: dict[str, object] = {
            "broker": None,
            "queues": {},
            "tasks": names,
            "note": "no broker: tasks run in threads of each serving process",
        }
    else:
        try:
            depth = queue_depth(make_celery(settings), settings.task_queue)
        except Exception as exc:
            err.print(f"[red]broker unreachable:[/red] {exc.__class__.__name__}: {exc}")
            raise typer.Exit(1) from exc
        figures = {
            "broker": redact_url(settings.task_broker_url),
            "queues": {settings.task_queue: depth},
            "tasks": names,
        }
    if json_output:
        console.print_json(json.dumps(figures))
        return
    console.print(f"broker: {figures['broker'] or '(none: in-process)'}")
    for queue, depth in figures["queues"].items():  # type: ignore[attr-defined]
        console.print(f"queue {queue}: {depth} waiting")
    console.print("tasks: " + ", ".join(names))


@tasks_app.command("run")
def tasks_run(
    name: Annotated[str, typer.Argument(help="Task name, e.g. studybridge.sweep.")],
    args: Annotated[list[str] | None, typer.Argument(help="key=value arguments.")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Run one task here and now (e.g. a sweep from cron), whatever the broker."""
    from gateway.tasks.registry import TaskContext, get_task

    settings = _settings(data_dir, config)
    try:
        definition = get_task(name)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from exc
    kwargs = _task_kwargs(args or [])
    archive = _archive(settings)
    try:
        result = definition.func(TaskContext(archive, settings), **kwargs)
    finally:
        archive.close()
    console.print(f"{name} done" + (f": {json.dumps(result)}" if result is not None else ""))


@tasks_app.command("submit")
def tasks_submit(
    name: Annotated[str, typer.Argument(help="Task name, e.g. studybridge.sweep.")],
    args: Annotated[list[str] | None, typer.Argument(help="key=value arguments.")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Hand one task to the broker for a worker to run."""
    from gateway.tasks.dispatch import CeleryDispatcher
    from gateway.tasks.registry import get_task

    settings = _settings(data_dir, config)
    if not settings.task_broker_url:
        err.print("[red]no task broker configured[/red]: use `studybridge tasks run` instead")
        raise typer.Exit(2)
    try:
        get_task(name)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from exc
    dispatcher = CeleryDispatcher(settings)
    try:
        dispatcher.submit(name, **_task_kwargs(args or []))
        sent = dispatcher.flush(30)
    finally:
        dispatcher.close()
    if not sent or dispatcher.failures:
        err.print("[red]broker unreachable: task not submitted[/red]")
        raise typer.Exit(1)
    console.print(f"{name} submitted to {settings.task_queue}")


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Apply the index schema migrations (Alembic) up to the newest."""
    settings = _settings(data_dir, config)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url)
    console.print("index schema is up to date")


@db_app.command("analyze")
def db_analyze(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Refresh PostgreSQL's planner statistics (after a bulk load or a restore)."""
    settings = _settings(data_dir, config)
    db = Database(settings.resolved_database_url)
    try:
        done = db.analyze()
    finally:
        db.dispose()
    console.print("statistics refreshed" if done else "SQLite index: nothing to do")


# Command groups kept in modules of their own (they use the helpers above).
from gateway.forward_cli import forward, jobs_app  # noqa: E402 - needs nothing above
from gateway.transfer_cli import retention_app, transfer_app  # noqa: E402 - needs nothing above

app.add_typer(transfer_app, name="transfer")
app.add_typer(retention_app, name="retention")
app.command("forward")(forward)
app.add_typer(jobs_app, name="jobs")

if __name__ == "__main__":
    app()
