"""``studybridge transfer ...``: closure transfers from the operator's console.

create, list, show, manifest, census, pull, report, finalize, receipt,
verify-receipt, public-key, patients and hand-back. Exit codes: 0 done (``finalize``: complete;
``verify-receipt``: valid; ``pull``: nothing left), 1 finalized incomplete, receipt
invalid or pull items left, 2 bad input (unknown transfer, bad manifest,
unreachable PACS).

Who may: every command here is an operator action; access checks and audit records
come with the consent layer (see docs/transfers.md).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from gateway.cli_common import (
    ActAs,
    ConfigFile,
    DataDir,
    JsonOut,
    cli_auditor,
    console,
    err,
    fail,
    open_archive,
    operator_action,
    settings_from,
)
from gateway.forward.jobs import ForwardError, run_job
from gateway.peers import PeerRegistry
from gateway.transfers.census import CensusError, take_census
from gateway.transfers.expected import ManifestError, parse_manifest, store_expected
from gateway.transfers.finalize import finalize, latest_receipt
from gateway.transfers.handback import hand_back
from gateway.transfers.patients import AffectedPatient, affected_patients
from gateway.transfers.pull import PullError, PullPolicy, Window, plan_pull, run_pull
from gateway.transfers.receipt import (
    ReceiptError,
    check_against_held,
    load_or_create_key,
    load_public_key,
    public_pem,
    render_text,
    verify,
)
from gateway.transfers.records import (
    REASONS,
    TransferError,
    create_transfer,
    get_transfer,
    list_transfers,
)
from gateway.transfers.report import held_instances, reconcile, transfer_report
from gateway.transfers.retention import (
    RetentionError,
    apply_retention,
    delete_due,
    retention_lines,
    set_hold,
)

transfer_app = typer.Typer(
    help="Closure transfers: a closing clinic's archive handed over, checked and receipted.",
    no_args_is_help=True,
)


def _date(value: str | None, what: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise fail(f"{what}: {value!r} is not a date (YYYY-MM-DD)") from exc


@transfer_app.command("create")
def create(
    institution: Annotated[str, typer.Option(help="The closing clinic's name.")],
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID for the whole transfer.")],
    reason: Annotated[str, typer.Option(help=f"One of: {', '.join(REASONS)}.")] = "closure",
    source_ae: Annotated[
        str, typer.Option("--ae", help="AE title of the clinic's PACS (a registered peer).")
    ] = "",
    effective_on: Annotated[str | None, typer.Option(help="Closure date (YYYY-MM-DD).")] = None,
    ends_on: Annotated[str | None, typer.Option(help="End of a suspension (YYYY-MM-DD).")] = None,
    custodian: Annotated[str, typer.Option(help="Custodian taking the records over.")] = "",
    custodian_contact: Annotated[str, typer.Option(help="How to reach the custodian.")] = "",
    notes: Annotated[str, typer.Option(help="Free text.")] = "",
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Register a transfer; C-STOREs from --ae are tagged to it until it is complete."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "transfer-create", detail=f"{institution} ({reason})"
        )
        if source_ae and PeerRegistry(archive.db).get(source_ae.strip()) is None:
            raise fail(f"no peer {source_ae}: register it first with `studybridge peers add`")
        info = create_transfer(
            archive.db,
            institution=institution,
            reason=reason,
            issuer=issuer,
            source_ae=source_ae,
            effective_on=_date(effective_on, "--effective-on"),
            ends_on=_date(ends_on, "--ends-on"),
            custodian_name=custodian,
            custodian_contact=custodian_contact,
            notes=notes,
        )
    except TransferError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    if json_output:
        console.out(json.dumps(info.as_dict(), indent=2), highlight=False)
    else:
        console.print(f"transfer {info.id} created ({info.reason} of {escape(info.institution)})")


@transfer_app.command("list")
def list_(
    data_dir: DataDir = None, config: ConfigFile = None, json_output: JsonOut = False
) -> None:
    """List transfers."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        infos = list_transfers(archive.db)
    finally:
        archive.close()
    if json_output:
        console.out(json.dumps([i.as_dict() for i in infos], indent=2), highlight=False)
        return
    table = Table("id", "institution", "reason", "AE", "issuer", "status", "created")
    for i in infos:
        table.add_row(
            str(i.id),
            escape(i.institution),
            i.reason,
            i.source_ae,
            escape(i.issuer),
            i.status,
            f"{i.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


@transfer_app.command("show")
def show(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """A transfer's record and its progress counts."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        info = get_transfer(archive.db, transfer_id)
        counts = reconcile(archive.db, transfer_id).counts()
    except TransferError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    data = {**info.as_dict(), "progress": counts}
    if json_output:
        console.out(json.dumps(data, indent=2), highlight=False)
        return
    table = Table(show_header=False, title=f"transfer {info.id}")
    for key, value in info.as_dict().items():
        table.add_row(key.replace("_", " "), escape(str(value if value is not None else "-")))
    for key, value in counts.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


@transfer_app.command("manifest")
def manifest(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    path: Annotated[Path, typer.Argument(help="CSV or JSON list of studies (and series).")],
    replace: Annotated[
        bool, typer.Option("--replace", help="Drop every earlier expectation first.")
    ] = False,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Load the expected content from a manifest the clinic handed over."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings,
            archive,
            act_as,
            "transfer-manifest",
            detail=f"transfer {transfer_id}: {path.name}",
        )
        get_transfer(archive.db, transfer_id)
        lines = parse_manifest(path)
        count = store_expected(archive.db, transfer_id, lines, origin="manifest", replace=replace)
    except (TransferError, ManifestError) as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    studies = len({line.study_uid for line in lines})
    console.print(f"transfer {transfer_id}: {count} lines expected ({studies} studies)")


@transfer_app.command("census")
def census(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    date_from: Annotated[str, typer.Option("--from", help="First study date (YYYY-MM-DD).")],
    date_to: Annotated[
        str | None, typer.Option("--to", help="Last study date (default today).")
    ] = None,
    cap: Annotated[
        int | None, typer.Option(help="Results per C-FIND the PACS returns at most.")
    ] = None,
    image_level: Annotated[
        bool, typer.Option("--image-level", help="Count instances by IMAGE-level C-FIND.")
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Drop every earlier expectation first.")
    ] = False,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Take the expected content from the source PACS by C-FIND (split by dates)."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "transfer-census", detail=f"transfer {transfer_id}"
        )
        info = get_transfer(archive.db, transfer_id)
        if not info.source_ae:
            raise fail(f"transfer {transfer_id} names no source AE to ask")
        peer = PeerRegistry(archive.db).get(info.source_ae)
        if peer is None:
            raise fail(f"peer {info.source_ae} is no longer registered")
        start = _date(date_from, "--from")
        assert start is not None
        end = _date(date_to, "--to") or dt.date.today()
        result = take_census(
            settings,
            peer,
            start,
            end,
            cap=cap,
            image_level=image_level,
            progress=None if json_output else (lambda m: err.print(escape(m))),
        )
        if result.lines:
            store_expected(archive.db, transfer_id, result.lines, origin="census", replace=replace)
    except (TransferError, CensusError) as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    summary = {
        "studies": result.studies,
        "series": result.series,
        "instances": result.instances,
        "queries": result.queries,
        "warnings": result.warnings,
    }
    if json_output:
        console.out(json.dumps(summary, indent=2), highlight=False)
        return
    console.print(
        f"census of {peer.ae_title}: {result.studies} studies, {result.series} series, "
        f"{result.instances} instances ({result.queries} C-FIND queries)"
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


@transfer_app.command("pull")
def pull(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    rate: Annotated[float | None, typer.Option(help="C-MOVEs per minute at most.")] = None,
    window: Annotated[
        list[str] | None,
        typer.Option(help="Allowed time window HH:MM-HH:MM (repeatable; default any time)."),
    ] = None,
    timezone: Annotated[str | None, typer.Option(help="Time zone of the windows.")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts per study/series.")] = None,
    backoff: Annotated[float | None, typer.Option(help="First retry delay (seconds).")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for retries and windows instead of stopping.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """C-MOVE what is still missing from the source PACS to us (resumable).

    `studybridge serve` must be running to receive. Exit 0 when nothing is left to
    pull, 1 when items are still pending or have failed.
    """
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "transfer-pull", detail=f"transfer {transfer_id}"
        )
        info = get_transfer(archive.db, transfer_id)
        if info.status == "complete":
            raise fail(f"transfer {transfer_id} is complete: nothing to pull")
        peer = PeerRegistry(archive.db).get(info.source_ae) if info.source_ae else None
        if peer is None:
            raise fail(f"transfer {transfer_id} has no registered source AE to pull from")
        policy = PullPolicy.from_settings(
            settings,
            rate_per_minute=rate,
            windows=tuple(Window.parse(w) for w in window) if window else None,
            timezone=timezone,
            max_attempts=max_attempts,
            backoff_seconds=backoff,
        )
        planned = plan_pull(archive.db, transfer_id)
        summary = run_pull(
            archive.db,
            settings,
            peer,
            transfer_id,
            policy,
            wait=wait,
            deadline=time.monotonic() + timeout if timeout else None,
            say=None if json_output else (lambda m: err.print(escape(m))),
        )
    except (TransferError, PullError) as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    if json_output:
        console.out(
            json.dumps({"planned": planned, **summary.as_dict()}, indent=2), highlight=False
        )
    else:
        console.print(
            f"transfer {transfer_id}: {planned} to pull; {summary.moved} C-MOVEs done, "
            f"{summary.failed_attempts} failed attempts; items {summary.done} done, "
            f"{summary.pending} pending, {summary.failed} failed"
            + (f" ({escape(summary.stopped)})" if summary.stopped else "")
        )
    if summary.pending or summary.failed:
        raise typer.Exit(1)


@transfer_app.command("patients")
def patients(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    csv_output: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """The patients whose studies the transfer brought: for the clinic's notice."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        get_transfer(archive.db, transfer_id)
        found = affected_patients(archive.db, transfer_id)
    except TransferError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    fields = list(AffectedPatient.__dataclass_fields__)
    if json_output:
        console.out(json.dumps([p.as_dict() for p in found], indent=2), highlight=False)
    elif csv_output:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(p.as_dict() for p in found)
        console.out(buffer.getvalue(), highlight=False, end="")
    else:
        table = Table(*(f.replace("_", " ") for f in fields))
        for p in found:
            table.add_row(*(escape(str(v)) for v in p.as_dict().values()))
        console.print(table)


@transfer_app.command("hand-back")
def hand_back_(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id (a suspension).")],
    to: Annotated[str, typer.Option("--to", help="AE title of the reopening clinic's PACS.")],
    backoff: Annotated[float, typer.Option(help="First retry delay in seconds.")] = 30.0,
    timeout: Annotated[
        float | None, typer.Option(help="Stop waiting for retries after this many seconds.")
    ] = None,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Return a suspension's studies to the reopening clinic's PACS (forwarding jobs)."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings,
            archive,
            act_as,
            "transfer-hand-back",
            detail=f"transfer {transfer_id} to {to}",
        )
        jobs = hand_back(archive, transfer_id, to.strip())
        console.print(f"{len(jobs)} forwarding jobs created: {', '.join(str(j.id) for j in jobs)}")
        deadline = time.monotonic() + timeout if timeout else None
        results = [
            run_job(archive, settings, j.id, backoff_seconds=backoff, wait=True, deadline=deadline)
            for j in jobs
        ]
    except (TransferError, ForwardError) as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    for r in results:
        console.print(
            f"job {r.id} ({r.study_uid}): {r.status}, {r.counts['sent']} sent, "
            f"{r.counts['pending']} pending, {r.counts['failed']} failed"
        )
    if any(r.status != "done" or r.counts["failed"] for r in results):
        raise typer.Exit(1)


@transfer_app.command("report")
def report(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    all_studies: Annotated[bool, typer.Option("--all", help="List complete studies too.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Reconciliation: expected vs received per study and series, refused, duplicates."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        get_transfer(archive.db, transfer_id)
        full = transfer_report(archive.db, transfer_id)
    except TransferError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    if json_output:
        console.out(json.dumps(full.as_dict(), indent=2), highlight=False)
        return
    rec = full.reconciliation
    counts = rec.counts()
    console.print(
        f"transfer {transfer_id}: {counts['complete_studies']} of {counts['expected_studies']} "
        f"expected studies complete, {counts['partial_studies']} partial, "
        f"{counts['missing_studies']} missing, {counts['extra_studies']} not expected; "
        f"{counts['instances']} instances held ({counts['bytes']} bytes), "
        f"{counts['rejected']} refused, {counts['duplicates']} duplicate deliveries"
    )
    table = Table("study", "patient", "date", "expected", "received", "status")
    for study in rec.studies:
        if study.status == "complete" and not all_studies:
            continue
        table.add_row(
            study.study_uid,
            escape(study.patient_id),
            study.study_date,
            "?" if study.expected is None else str(study.expected),
            str(study.received),
            study.status,
        )
        for s in study.series:
            if s.status != "complete" or all_studies:
                table.add_row(
                    f"  {s.series_uid}",
                    "",
                    "",
                    "?" if s.expected is None else str(s.expected),
                    str(s.received),
                    s.status,
                )
    if table.row_count:
        console.print(table)
    for r in rec.rejected:
        console.print(
            f"[red]refused[/] {r.sop_uid or '(unreadable)'} x{r.times}: {escape(r.reason)}"
        )
    for c in full.commitments:
        sent = (
            f"report sent {c.reported_at:%Y-%m-%d %H:%M:%S} UTC to {escape(c.reported_to)} "
            f"({c.reported_how})"
            if c.reported_at
            else f"report not sent ({escape(c.report_error)})"
        )
        console.print(
            f"storage commitment {c.transaction_uid} from {escape(c.calling_ae)} at "
            f"{c.requested_at:%Y-%m-%d %H:%M:%S} UTC: {c.committed} committed, "
            f"{c.failed} failed; {sent}"
        )
        for f in c.failures:
            console.print(f"  [red]not committed[/] {f.sop_uid} (0x{f.failure_reason or 0:04X})")


@transfer_app.command("finalize")
def finalize_(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Write the receipt here (JSON; a .txt rendering beside it)."),
    ] = None,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Reconcile, mark complete or incomplete, and issue a signed receipt."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "transfer-finalize", detail=f"transfer {transfer_id}"
        )
        done = finalize(archive.db, settings, transfer_id)
    except (TransferError, ReceiptError) as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    text = render_text(done.document)
    if out is not None:
        out.write_text(done.text)
        out.with_suffix(".txt").write_text(text)
        console.print(f"receipt written to {out} and {out.with_suffix('.txt')}")
    console.out(text, highlight=False)
    if done.transfer.status != "complete":
        raise typer.Exit(1)


@transfer_app.command("receipt")
def receipt(
    transfer_id: Annotated[int, typer.Argument(help="Transfer id.")],
    text: Annotated[bool, typer.Option("--text", help="The readable rendering.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Print the newest receipt of a transfer (JSON, or --text)."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        document = latest_receipt(archive.db, transfer_id)
    finally:
        archive.close()
    if document is None:
        raise fail(f"transfer {transfer_id} has no receipt yet")
    console.out(render_text(json.loads(document)) if text else document, highlight=False)


@transfer_app.command("verify-receipt")
def verify_receipt(
    path: Annotated[Path, typer.Argument(help="The receipt (JSON).", exists=True, dir_okay=False)],
    public_key: Annotated[
        Path | None,
        typer.Option(help="Trusted public key (PEM); default: this gateway's signing key."),
    ] = None,
    against_archive: Annotated[
        bool,
        typer.Option("--against-archive", help="Also check the archive still holds what it lists."),
    ] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Check a receipt's Ed25519 signature (and optionally the archive against it)."""
    settings = settings_from(data_dir, config)
    try:
        if public_key is not None:
            trusted = load_public_key(public_key)
        else:
            key_file = settings.resolved_receipt_key_file
            if not key_file.exists():
                raise fail(f"no signing key at {key_file}; pass --public-key")
            trusted = load_public_key(key_file)
    except (ReceiptError, OSError) as exc:
        raise fail(str(exc)) from exc
    result = verify(path.read_text(errors="replace"), trusted)
    problems = list(result.problems)
    if result.ok and against_archive and result.receipt is not None:
        archive = open_archive(settings)
        try:
            held, _dups, _total = held_instances(archive.db, int(result.receipt["transfer"]["id"]))
        finally:
            archive.close()
        problems += check_against_held(result.receipt, held)
    if problems:
        for problem in problems:
            console.print(f"[red]INVALID:[/] {escape(problem)}")
        raise typer.Exit(1)
    r = result.receipt or {}
    console.print(
        f"valid receipt: transfer {r['transfer']['id']} ({escape(r['transfer']['institution'])}), "
        f"{r['status']}, {r['counts']['instances']} instances, issued {r['issued_at']}"
    )


@transfer_app.command("public-key")
def public_key_(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Print the receipt signing public key (PEM), to hand to the clinic."""
    settings = settings_from(data_dir, config)
    try:
        key = load_or_create_key(settings.resolved_receipt_key_file)
    except ReceiptError as exc:
        raise fail(str(exc)) from exc
    console.out(public_pem(key), highlight=False, end="")


retention_app = typer.Typer(
    help="Retention: keep-until dates per record type, legal holds, what is due.",
    no_args_is_help=True,
)


@retention_app.command("apply")
def retention_apply(
    recompute: Annotated[
        bool, typer.Option("--recompute", help="Recompute dates already set (new policy).")
    ] = False,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Give every study without one a retain-until date from the policy."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "retention-apply", detail="recompute" if recompute else ""
        )
        count = apply_retention(archive.db, settings, recompute=recompute)
    finally:
        archive.close()
    console.print(f"retention dates set for {count} studies")


@retention_app.command("report")
def retention_report(
    due_on: Annotated[
        str | None, typer.Option(help="List what is due on this date (default today).")
    ] = None,
    holds: Annotated[bool, typer.Option("--holds", help="List the legal holds instead.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Studies past their retention date and not on hold (nothing is deleted)."""
    archive = open_archive(settings_from(data_dir, config))
    try:
        lines = retention_lines(archive.db, due_on=_date(due_on, "--due-on"), holds=holds)
    finally:
        archive.close()
    if json_output:
        console.out(json.dumps([line.as_dict() for line in lines], indent=2), highlight=False)
        return
    table = Table("study", "patient", "study date", "keep until", "type", "years", "hold")
    for line in lines:
        table.add_row(
            line.study_uid,
            escape(line.patient_id),
            line.study_date,
            line.retain_until.isoformat(),
            line.record_type,
            str(line.years),
            escape(line.hold_reason) if line.legal_hold else "",
        )
    console.print(table)
    what = "on legal hold" if holds else "due"
    console.print(f"{len(lines)} studies {what}")


@retention_app.command("delete")
def retention_delete(
    study: Annotated[
        list[str] | None, typer.Option("--study", help="Only this study (repeatable).")
    ] = None,
    due_on: Annotated[
        str | None, typer.Option(help="Delete what is due on this date (default today).")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete (without it: list what would go).")
    ] = False,
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    json_output: JsonOut = False,
) -> None:
    """Delete studies past their retention date and not on legal hold (operators;
    each deletion audited). Without --yes, only lists what would be deleted."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    auditor = None
    try:
        day = _date(due_on, "--due-on")
        principal = operator_action(
            settings,
            archive,
            act_as,
            "retention-delete-run",
            detail=f"due on {day or 'today'}" + ("" if yes else "; listing only"),
        )
        if not yes:
            lines = retention_lines(archive.db, due_on=day)
            if study:
                lines = [line for line in lines if line.study_uid in set(study)]
            for line in lines:
                console.print(f"would delete {line.study_uid} (kept until {line.retain_until})")
            console.print(f"{len(lines)} studies due; run again with --yes to delete them")
            return
        auditor = cli_auditor(settings, archive)
        done = delete_due(archive, principal, auditor, due_on=day, study_uids=study or None)
    finally:
        if auditor is not None:
            auditor.close()
        archive.close()
    if json_output:
        console.out(json.dumps([d.as_dict() for d in done], indent=2), highlight=False)
    else:
        for d in done:
            if d.outcome == "deleted":
                left = f", {d.blobs_left} blobs left to the sweep" if d.blobs_left else ""
                console.print(f"deleted {d.study_uid}: {d.instances} instances{left}")
            else:
                console.print(f"[red]refused[/] {d.study_uid}: {escape(d.reason)}")
        deleted = sum(1 for d in done if d.outcome == "deleted")
        console.print(f"{deleted} studies deleted (audited as {escape(principal.name)})")
    if any(d.outcome != "deleted" for d in done):
        raise typer.Exit(1)


@retention_app.command("hold")
def retention_hold(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    reason: Annotated[str, typer.Option(help="Why (case, authority, reference).")],
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Put a study on legal hold: never listed as due while held."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "retention-hold", detail=reason, study_uid=study_uid.strip()
        )
        set_hold(archive.db, study_uid.strip(), hold=True, reason=reason)
    except RetentionError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    console.print(f"study {study_uid} is on legal hold")


@retention_app.command("release")
def retention_release(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    act_as: ActAs = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Lift a legal hold."""
    settings = settings_from(data_dir, config)
    archive = open_archive(settings)
    try:
        operator_action(
            settings, archive, act_as, "retention-release", detail="", study_uid=study_uid.strip()
        )
        set_hold(archive.db, study_uid.strip(), hold=False)
    except RetentionError as exc:
        raise fail(str(exc)) from exc
    finally:
        archive.close()
    console.print(f"legal hold on study {study_uid} lifted")
