"""``studybridge forward STUDY --to PEER`` and ``studybridge jobs``: forwarding jobs.

``forward`` creates the job and runs it here until it is done or failed (retrying
with backoff; Ctrl-C leaves it queued for ``jobs resume``). Exit codes: 0 every
instance sent, 1 the job failed or instances were refused, 2 bad input.

Who may: ``forward`` is the forwarding access decision (``gateway.forward.access``:
the one running it, ``--as``, and the peer's institution must both be permitted to
download the study); ``jobs resume`` is for operators. Both are audited.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from gateway.cli_common import (
    ActAs,
    ConfigFile,
    DataDir,
    JsonOut,
    acting_principal,
    cli_auditor,
    console,
    err,
    fail,
    open_archive,
    operator_action,
    settings_from,
)
from gateway.config import Settings
from gateway.forward.access import ForwardDenied, authorize_forward
from gateway.forward.jobs import (
    ForwardError,
    JobInfo,
    create_job,
    get_job,
    items,
    list_jobs,
    requeue,
    run_job,
)
from gateway.forward.reconcile import Reconciliation

jobs_app = typer.Typer(help="Forwarding jobs: list, show, resume.")

Backoff = Annotated[float, typer.Option(help="First retry delay in seconds (doubling).")]
Timeout = Annotated[
    float | None, typer.Option(help="Stop waiting for retries after this many seconds.")
]


def _print(info: JobInfo, json_output: bool) -> None:
    if json_output:
        console.out(json.dumps(info.as_dict(), indent=2), highlight=False)
        return
    c = info.counts
    console.print(
        f"job {info.id}: {info.status} after {info.attempts} attempt(s); "
        f"{c['sent']} sent, {c['pending']} pending, {c['failed']} failed"
        + (f" ({escape(info.last_error)})" if info.last_error else "")
    )


def _exit_code(info: JobInfo) -> int:
    return 0 if info.status == "done" and info.counts["failed"] == 0 else 1


def _run(
    job_id: int, backoff: float, timeout: float | None, json_output: bool, settings: Settings
) -> None:
    archive = open_archive(settings)
    try:
        info = run_job(
            archive,
            settings,
            job_id,
            backoff_seconds=backoff,
            wait=True,
            deadline=time.monotonic() + timeout if timeout else None,
            say=None if json_output else (lambda m: err.print(escape(m))),
        )
    except KeyboardInterrupt:
        err.print(f"interrupted: job {job_id} resumes with `studybridge jobs resume {job_id}`")
        raise typer.Exit(130) from None
    finally:
        archive.close()
    _print(info, json_output)
    raise typer.Exit(_exit_code(info))


def forward(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID to send.")],
    to: Annotated[str, typer.Option("--to", help="AE title of the receiving peer.")],
    series: Annotated[str, typer.Option(help="Send only this series.")] = "",
    patient_id: Annotated[
        str, typer.Option(help="Receiving institution's Patient ID (reconciliation).")
    ] = "",
    issuer: Annotated[str, typer.Option(help="Receiving institution's Issuer of Patient ID.")] = "",
    accession: Annotated[str, typer.Option(help="Receiving institution's Accession Number.")] = "",
    max_attempts: Annotated[int, typer.Option(help="Attempts before the job fails.")] = 8,
    backoff: Backoff = 30.0,
    timeout: Timeout = None,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Push a stored study (or series) to a peer's PACS by C-STORE, as a resumable job.

    Who may: the one running it (--as) and the peer's institution must both be
    permitted to download the study (checked and audited)."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    auditor = cli_auditor(settings, archive)
    try:
        principal = acting_principal(settings, archive, act_as)
        authorize_forward(archive.db, auditor, principal, study_uid.strip(), to.strip(), door="cli")
        info = create_job(
            archive,
            study_uid.strip(),
            to.strip(),
            series_uid=series.strip(),
            reconcile=Reconciliation(patient_id.strip(), issuer.strip(), accession.strip()),
            max_attempts=max_attempts,
            requested_by=principal.name,
            requester_institution=principal.institution,
        )
    except ForwardDenied as exc:
        raise fail(f"refused: {exc}", 1) from exc
    except ForwardError as exc:
        raise fail(str(exc)) from exc
    finally:
        auditor.close()
        archive.close()
    if not json_output:
        console.print(f"job {info.id}: {info.counts['pending']} instances to {info.peer_ae}")
    _run(info.id, backoff, timeout, json_output, settings)


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """List forwarding jobs (with a subcommand: show or resume one)."""
    if ctx.invoked_subcommand is not None:
        return
    archive = open_archive(settings_from(data_dir, config))
    try:
        found = list_jobs(archive, status=status)
    finally:
        archive.close()
    if json_output:
        console.out(json.dumps([j.as_dict() for j in found], indent=2), highlight=False)
        return
    table = Table("id", "study", "series", "peer", "status", "sent", "pending", "failed", "tries")
    for j in found:
        table.add_row(
            str(j.id),
            j.study_uid,
            j.series_uid or "-",
            j.peer_ae,
            j.status,
            str(j.counts["sent"]),
            str(j.counts["pending"]),
            str(j.counts["failed"]),
            str(j.attempts),
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """A job and the outcome of each of its instances."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        info = get_job(archive, job_id)
        lines = items(archive, job_id)
    except ForwardError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    if json_output:
        data = info.as_dict()
        data["items"] = [
            {
                "sop_uid": i.sop_uid,
                "status": i.status,
                "last_status": i.last_status,
                "detail": i.detail,
            }
            for i in lines
        ]
        console.out(json.dumps(data, indent=2), highlight=False)
        return
    _print(info, False)
    table = Table("SOP Instance UID", "status", "detail")
    for i in lines:
        table.add_row(i.sop_uid, i.status, escape(i.detail))
    console.print(table)


@jobs_app.command("resume")
def jobs_resume(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    backoff: Backoff = 30.0,
    timeout: Timeout = None,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Run a queued (or interrupted) job again; a failed job gets a fresh set of attempts
    (operators; audited)."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(settings, archive, act_as, "job-resume", detail=f"job {job_id}")
        requeue(archive, job_id)
    except ForwardError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    _run(job_id, backoff, timeout, json_output, settings)
