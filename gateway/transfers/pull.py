"""Pull mode: ask the source PACS by C-MOVE for what a transfer still misses.

``plan_pull`` turns the reconciliation into pull items (a series when the expected
content lists series, else the whole study) kept in ``transfer_pulls``; items
whose content has arrived meanwhile are marked done. ``run_pull`` works through
the due items, one C-MOVE at a time to our own AE title, so the instances come in
through our DICOM node (``studybridge serve`` must be running) and are tagged to
the transfer like any push from the clinic's AE title:

- rate limit: at most ``rate_per_minute`` C-MOVEs a minute;
- time windows: only inside the allowed windows (e.g. nights), in ``timezone``;
- retries: a failed or partial C-MOVE (or no answer) is retried after a delay
  doubling from ``backoff_seconds`` (at most an hour), ``max_attempts`` times;
- resumable: the attempt is counted and a lease stored before the C-MOVE is sent
  (two hours; the attempt's end sets the real retry time), so a crash anywhere
  leaves the item to be retried later, never lost, and two runs (the CLI and the
  periodic task) never send the same C-MOVE at once.

The source must know our AE title as a move destination, and store its
sub-operations calling with the transfer's source AE title (as PACS usually do).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as _MOVE
from sqlalchemy import select

from gateway.archive.db import Database
from gateway.archive.models import utcnow
from gateway.config import Settings
from gateway.dimse.client import AssociationFailed, PeerClient
from gateway.peers import Peer
from gateway.transfers.models import TransferPull
from gateway.transfers.report import reconcile

log = logging.getLogger(__name__)

_MAX_BACKOFF = 3600.0
# How long a C-MOVE under way keeps its item from other runs (a run that died
# leaves it to be retried after this at the latest).
MOVE_LEASE = dt.timedelta(hours=2)


class PullError(ValueError):
    """A pull cannot be run as asked (bad window, unknown time zone)."""


@dataclass(frozen=True)
class Window:
    start: dt.time
    end: dt.time

    def contains(self, moment: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end  # across midnight

    @classmethod
    def parse(cls, text: str) -> Window:
        try:
            start, end = (dt.time.fromisoformat(p.strip()) for p in text.split("-", 1))
        except ValueError as exc:
            raise PullError(f"time window {text!r} is not HH:MM-HH:MM") from exc
        if start == end:
            raise PullError(f"time window {text!r} is empty")
        return cls(start, end)


@dataclass(frozen=True)
class PullPolicy:
    rate_per_minute: float = 30.0
    windows: tuple[Window, ...] = ()
    timezone: str = "UTC"
    max_attempts: int = 8
    backoff_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> PullPolicy:
        values: dict[str, object] = {
            "rate_per_minute": settings.pull_rate_per_minute,
            "windows": tuple(Window.parse(w) for w in settings.pull_windows),
            "timezone": settings.pull_timezone,
            "max_attempts": settings.pull_max_attempts,
            "backoff_seconds": settings.pull_backoff_seconds,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        policy = cls(**values)  # type: ignore[arg-type]
        try:
            ZoneInfo(policy.timezone)
        except Exception as exc:
            raise PullError(f"unknown time zone {policy.timezone!r}") from exc
        if policy.rate_per_minute <= 0 or policy.max_attempts < 1:
            raise PullError("rate and attempts must be positive")
        return policy

    def open_at(self, moment: dt.datetime) -> bool:
        if not self.windows:
            return True
        local = moment.astimezone(ZoneInfo(self.timezone)).time()
        return any(w.contains(local) for w in self.windows)

    def next_opening(self, moment: dt.datetime) -> dt.datetime:
        """The first minute at or after ``moment`` inside a window (within a day)."""
        probe = moment
        for _ in range(24 * 60 + 1):
            if self.open_at(probe):
                return probe
            probe = (probe + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
        return probe

    def backoff(self, attempts: int) -> dt.timedelta:
        return dt.timedelta(
            seconds=min(self.backoff_seconds * 2 ** max(attempts - 1, 0), _MAX_BACKOFF)
        )


@dataclass
class PullSummary:
    moved: int = 0
    failed_attempts: int = 0
    pending: int = 0
    done: int = 0
    failed: int = 0
    stopped: str = ""
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "moved": self.moved,
            "failed_attempts": self.failed_attempts,
            "pending": self.pending,
            "done": self.done,
            "failed": self.failed,
            "stopped": self.stopped,
            "errors": self.errors,
        }


def plan_pull(db: Database, transfer_id: int) -> int:
    """Bring pull items in line with what is still missing; the number pending."""
    wanted: set[tuple[str, str]] = set()
    for study in reconcile(db, transfer_id).missing:
        series = [s for s in study.series if s.status in ("missing", "partial")]
        if series:
            wanted.update((study.study_uid, s.series_uid) for s in series)
        else:
            wanted.add((study.study_uid, ""))
    now = utcnow()
    with db.writing() as session:
        items = {
            (i.study_uid, i.series_uid): i
            for i in session.scalars(
                select(TransferPull).where(TransferPull.transfer_fk == transfer_id)
            )
        }
        for key, item in items.items():
            if key not in wanted and item.status != "done":
                item.status, item.updated_at = "done", now
            elif key in wanted and item.status == "done":
                # The source said it sent it, yet it is still missing: ask again
                # (the attempts already used count against the limit).
                item.status, item.updated_at = "pending", now
        for study_uid, series_uid in wanted - set(items):
            session.add(
                TransferPull(
                    transfer_fk=transfer_id,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
    return len(wanted)


def _identifier(item: TransferPull) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if item.series_uid else "STUDY"
    ds.StudyInstanceUID = item.study_uid
    if item.series_uid:
        ds.SeriesInstanceUID = item.series_uid
    return ds


class _Mover:
    """C-MOVE requests over one association to the source, re-associating as needed."""

    def __init__(self, settings: Settings, peer: Peer) -> None:
        self.destination = settings.ae_title
        self.client = PeerClient(settings, peer, [build_context(_MOVE)])

    def move(self, identifier: Dataset) -> tuple[int | None, str]:
        """Final status of the C-MOVE (None: no answer) and a description."""
        try:
            assoc = self.client.association()
        except AssociationFailed as exc:
            return None, str(exc)
        final: int | None = None
        detail = ""
        for status, _ident in assoc.send_c_move(identifier, self.destination, _MOVE):
            if not status:
                self.client.drop()
                return None, "the source stopped answering"
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                continue
            final = code
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            done = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
            detail = f"status 0x{code:04X}, {done} sent, {failed} failed"
        return final, detail

    def close(self) -> None:
        self.client.close()


def run_pull(
    db: Database,
    settings: Settings,
    peer: Peer,
    transfer_id: int,
    policy: PullPolicy,
    *,
    wait: bool = False,
    deadline: float | None = None,
    say: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PullSummary:
    """Send the due C-MOVEs. With ``wait``, also wait for retries and windows (until
    ``deadline``, a ``time.monotonic()`` value, if given)."""
    say = say or (lambda _m: None)
    summary = PullSummary()
    mover = _Mover(settings, peer)
    interval = 60.0 / policy.rate_per_minute
    last_move = -interval
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                summary.stopped = "deadline reached"
                break
            now = utcnow()
            item, next_due = _next_item(db, transfer_id, now)
            if item is None:
                if next_due is None:
                    break  # nothing pending
                if not wait:
                    summary.stopped = f"retries due from {next_due.isoformat()}"
                    break
                sleep(min(max((next_due - now).total_seconds(), 0.05), 60.0))
                continue
            if not policy.open_at(now):
                opening = policy.next_opening(now)
                if not wait:
                    summary.stopped = f"outside the allowed windows until {opening.isoformat()}"
                    break
                sleep(min(max((opening - now).total_seconds(), 1.0), 300.0))
                continue
            pause = last_move + interval - time.monotonic()
            if pause > 0:
                sleep(pause)
            attempt = _begin_attempt(db, item.id, policy)
            last_move = time.monotonic()
            what = f"{item.study_uid}" + (f" series {item.series_uid}" if item.series_uid else "")
            status, detail = mover.move(_identifier(item))
            ok = status == 0x0000
            _end_attempt(db, item.id, policy, attempt, status, detail, ok)
            if ok:
                summary.moved += 1
                say(f"moved {what}: {detail}")
            else:
                summary.failed_attempts += 1
                summary.errors.append(f"{what}: {detail}")
                say(f"C-MOVE of {what} failed (attempt {attempt}): {detail}")
    finally:
        mover.close()
    with db.reading() as session:
        for status in session.scalars(
            select(TransferPull.status).where(TransferPull.transfer_fk == transfer_id)
        ):
            setattr(summary, status, getattr(summary, status) + 1)
    return summary


def _next_item(
    db: Database, transfer_id: int, now: dt.datetime
) -> tuple[TransferPull | None, dt.datetime | None]:
    with db.reading() as session:
        pending = session.scalars(
            select(TransferPull)
            .where(TransferPull.transfer_fk == transfer_id, TransferPull.status == "pending")
            .order_by(TransferPull.next_attempt_at, TransferPull.id)
            .limit(1)
        ).first()
    if pending is None:
        return None, None
    if pending.next_attempt_at <= now:
        return pending, pending.next_attempt_at
    return None, pending.next_attempt_at


def _begin_attempt(db: Database, item_id: int, policy: PullPolicy) -> int:
    """Count the attempt and set its retry time before the C-MOVE goes out."""
    now = utcnow()
    with db.writing() as session:
        item = session.get(TransferPull, item_id)
        assert item is not None
        item.attempts += 1
        # A lease while the C-MOVE runs (no other run takes the item before it ends
        # or expires); the end of the attempt sets the real retry time.
        item.next_attempt_at = now + max(policy.backoff(item.attempts), MOVE_LEASE)
        item.updated_at = now
        return item.attempts


def _end_attempt(
    db: Database,
    item_id: int,
    policy: PullPolicy,
    attempt: int,
    status: int | None,
    detail: str,
    ok: bool,
) -> None:
    with db.writing() as session:
        item = session.get(TransferPull, item_id)
        assert item is not None
        item.last_status = status
        item.last_error = "" if ok else detail
        item.updated_at = utcnow()
        item.next_attempt_at = item.updated_at + policy.backoff(attempt)
        if ok:
            item.status = "done"
        elif attempt >= policy.max_attempts:
            item.status = "failed"
