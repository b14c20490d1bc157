"""Forwarding jobs: create, run (resumably), list.

A job names a study (or series), the peer, and optionally the identifiers the
receiving institution wants (``reconcile``). Creating it lists the instances to
send, one ``forward_items`` line each, through the one retrieve path. Running it:

1. counts the attempt and stores a lease (five minutes, renewed with each
   confirmed instance) before anything is sent, so a crash anywhere leaves a job
   the periodic resumer takes over once the lease ends, and two runs never push
   the same job at once; a failed attempt sets the retry time (doubling backoff,
   at most an hour);
2. opens one association with presentation contexts for the stored transfer
   syntaxes plus uncompressed fallbacks (``dimse.sending.contexts_for``);
3. sends each pending instance: as stored, streamed from the blob, when nothing is
   coerced and the peer took the stored syntax; otherwise read, coerced, and
   converted (decompressed) when the peer takes none of the stored syntax;
4. commits each instance's outcome as soon as the peer answers: confirmed
   instances are never sent again, so a resumed job sends no duplicates (except
   the one instance whose confirmation may have been in flight during a crash).

A refusal that will not change (an unsupported SOP class, a data set error) fails
that instance; "out of resources" (0xA7xx), a dropped association or an
unreachable peer leave the rest pending for the next attempt. After
``max_attempts`` attempts with instances still pending the job is ``failed``.

Who may: ``gateway.forward.access`` (the asker and the receiving institution must
both be permitted to download the study; audited). A job keeps who asked for it
and their institution.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.uid import UID
from sqlalchemy import func, select

from gateway.archive import Archive, Level, RetrieveRequest
from gateway.archive.models import Patient, Study, utcnow
from gateway.archive.retrieve import StoredInstance
from gateway.config import Settings
from gateway.dimse.client import AssociationFailed, associate
from gateway.dimse.sending import StoredRef, contexts_for
from gateway.forward.models import ForwardItem, ForwardJob
from gateway.forward.reconcile import Reconciliation, coerce
from gateway.peers import PeerRegistry

log = logging.getLogger(__name__)

_MAX_BACKOFF = 3600.0
# A run holds its job this long past its last confirmed instance: the periodic
# resumer leaves it alone meanwhile, and takes it over once a crashed run's lease ends.
RUN_LEASE = dt.timedelta(minutes=5)
# C-STORE statuses that mean "stored" (success and the warnings of PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class ForwardError(ValueError):
    """A job cannot be created or found as asked."""


@dataclass(frozen=True)
class JobInfo:
    id: int
    study_uid: str
    series_uid: str
    peer_ae: str
    status: str
    attempts: int
    max_attempts: int
    next_attempt_at: dt.datetime
    last_error: str
    created_at: dt.datetime
    updated_at: dt.datetime
    reconcile: Reconciliation
    counts: dict[str, int]
    requested_by: str = ""
    requester_institution: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "peer": self.peer_ae,
            "status": self.status,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "last_error": self.last_error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "reconcile": {
                "patient_id": self.reconcile.patient_id,
                "issuer": self.reconcile.issuer,
                "accession_number": self.reconcile.accession_number,
            },
            "instances": self.counts,
            "requested_by": self.requested_by,
            "requester_institution": self.requester_institution,
        }


def _info(session: Any, job: ForwardJob) -> JobInfo:
    counts = dict(
        session.execute(
            select(ForwardItem.status, func.count(ForwardItem.id))
            .where(ForwardItem.job_fk == job.id)
            .group_by(ForwardItem.status)
        ).all()
    )
    return JobInfo(
        id=job.id,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        peer_ae=job.peer_ae,
        status=job.status,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        next_attempt_at=job.next_attempt_at,
        last_error=job.last_error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        reconcile=Reconciliation(job.patient_id, job.issuer, job.accession_number),
        counts={k: counts.get(k, 0) for k in ("pending", "sent", "failed")},
        requested_by=job.requested_by,
        requester_institution=job.requester_institution,
    )


def _request(study_uid: str, series_uid: str) -> RetrieveRequest:
    if series_uid:
        return RetrieveRequest(Level.SERIES, study_uids=[study_uid], series_uids=[series_uid])
    return RetrieveRequest(Level.STUDY, study_uids=[study_uid])


def create_job(
    archive: Archive,
    study_uid: str,
    peer_ae: str,
    *,
    series_uid: str = "",
    reconcile: Reconciliation = Reconciliation(),
    max_attempts: int = 8,
    requested_by: str = "",
    requester_institution: str = "",
) -> JobInfo:
    if PeerRegistry(archive.db).get(peer_ae) is None:
        raise ForwardError(f"no peer {peer_ae}: register it with `studybridge peers add`")
    if len(reconcile.accession_number) > 16 or len(reconcile.patient_id) > 64:
        raise ForwardError("Patient ID is at most 64 characters, Accession Number 16")
    instances = archive.find_instances(_request(study_uid, series_uid))
    if not instances:
        what = f"series {series_uid}" if series_uid else f"study {study_uid}"
        raise ForwardError(f"the archive holds no {what}")
    now = utcnow()
    with archive.db.writing() as session:
        job = ForwardJob(
            study_uid=study_uid,
            series_uid=series_uid,
            peer_ae=peer_ae,
            patient_id=reconcile.patient_id,
            issuer=reconcile.issuer,
            accession_number=reconcile.accession_number,
            status="queued",
            attempts=0,
            max_attempts=max_attempts,
            requested_by=requested_by[:128],
            requester_institution=requester_institution,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        session.add_all(
            ForwardItem(job_fk=job.id, sop_uid=i.sop_uid, status="pending", updated_at=now)
            for i in instances
        )
        session.flush()
        return _info(session, job)


def get_job(archive: Archive, job_id: int) -> JobInfo:
    with archive.db.reading() as session:
        job = session.get(ForwardJob, job_id)
        if job is None:
            raise ForwardError(f"no forwarding job {job_id}")
        return _info(session, job)


def list_jobs(
    archive: Archive, *, status: str | None = None, requester_institution: str | None = None
) -> list[JobInfo]:
    with archive.db.reading() as session:
        stmt = select(ForwardJob).order_by(ForwardJob.id)
        if status:
            stmt = stmt.where(ForwardJob.status == status)
        if requester_institution is not None:
            stmt = stmt.where(ForwardJob.requester_institution == requester_institution)
        return [_info(session, job) for job in session.scalars(stmt)]


def items(archive: Archive, job_id: int) -> list[ForwardItem]:
    with archive.db.reading() as session:
        return list(
            session.scalars(
                select(ForwardItem).where(ForwardItem.job_fk == job_id).order_by(ForwardItem.id)
            )
        )


def backoff(base: float, attempts: int) -> dt.timedelta:
    return dt.timedelta(seconds=min(base * 2 ** max(attempts - 1, 0), _MAX_BACKOFF))


def run_job(
    archive: Archive,
    settings: Settings,
    job_id: int,
    *,
    backoff_seconds: float = 30.0,
    wait: bool = False,
    deadline: float | None = None,
    say: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> JobInfo:
    """Work on a job until it is done or failed; without ``wait``, stop when the next
    attempt is not due yet. ``deadline`` is a ``time.monotonic()`` value."""
    say = say or (lambda _m: None)
    while True:
        info = get_job(archive, job_id)
        if info.status in ("done", "failed"):
            return info
        if info.counts["pending"] == 0:
            return _finish(archive, job_id, "done", "")
        now = utcnow()
        if info.next_attempt_at > now:
            wait_for = (info.next_attempt_at - now).total_seconds()
            if not wait or (deadline is not None and time.monotonic() + wait_for > deadline):
                return info
            sleep(min(wait_for, 60.0))
            continue
        attempt = _begin_attempt(archive, job_id, backoff_seconds)
        error = _push(archive, settings, job_id, say)
        info = get_job(archive, job_id)
        if info.counts["pending"] == 0:
            return _finish(archive, job_id, "done", "")
        if attempt >= info.max_attempts:
            return _finish(archive, job_id, "failed", error)
        _finish(archive, job_id, "queued", error, backoff(backoff_seconds, attempt))
        say(f"attempt {attempt} left {info.counts['pending']} pending: {error}")


def _begin_attempt(archive: Archive, job_id: int, base: float) -> int:
    now = utcnow()
    with archive.db.writing() as session:
        job = session.get(ForwardJob, job_id)
        assert job is not None
        job.attempts += 1
        job.status = "running"
        job.next_attempt_at = now + max(backoff(base, job.attempts), RUN_LEASE)
        job.updated_at = now
        return job.attempts


def _finish(
    archive: Archive, job_id: int, status: str, error: str, retry_in: dt.timedelta | None = None
) -> JobInfo:
    with archive.db.writing() as session:
        job = session.get(ForwardJob, job_id)
        assert job is not None
        job.status = status
        if retry_in is not None:
            job.next_attempt_at = utcnow() + retry_in
        job.last_error = error[:2000]
        job.updated_at = utcnow()
        return _info(session, job)


def _record(
    archive: Archive, job_id: int, sop_uid: str, status: str, code: int | None, detail: str
) -> None:
    with archive.db.writing() as session:
        # Heartbeat: while instances keep going out, no other run takes this job.
        job = session.get(ForwardJob, job_id)
        assert job is not None
        job.next_attempt_at = max(job.next_attempt_at, utcnow() + RUN_LEASE)
        item = session.scalar(
            select(ForwardItem).where(ForwardItem.job_fk == job_id, ForwardItem.sop_uid == sop_uid)
        )
        assert item is not None
        item.status = status
        item.last_status = code
        item.detail = detail[:1000]
        item.updated_at = utcnow()


def _stored_issuer(archive: Archive, study_uid: str) -> str:
    with archive.db.reading() as session:
        return (
            session.scalar(
                select(Patient.issuer)
                .join(Study, Study.patient_fk == Patient.id)
                .where(Study.study_uid == study_uid)
            )
            or ""
        )


def _push(archive: Archive, settings: Settings, job_id: int, say: Callable[[str], None]) -> str:
    """One attempt: send the pending instances; the error that stopped it, or ''."""
    with archive.db.reading() as session:
        job = session.get(ForwardJob, job_id)
        assert job is not None
        pending = set(
            session.scalars(
                select(ForwardItem.sop_uid).where(
                    ForwardItem.job_fk == job_id, ForwardItem.status == "pending"
                )
            )
        )
        target = Reconciliation(job.patient_id, job.issuer, job.accession_number)
        study_uid, series_uid, peer_ae = job.study_uid, job.series_uid, job.peer_ae
    peer = PeerRegistry(archive.db).get(peer_ae)
    if peer is None:
        return f"peer {peer_ae} is no longer registered"
    todo = [
        i for i in archive.find_instances(_request(study_uid, series_uid)) if i.sop_uid in pending
    ]
    for gone in pending - {i.sop_uid for i in todo}:
        _record(archive, job_id, gone, "failed", None, "no longer in the archive")
    if not todo:
        return ""
    issuer = _stored_issuer(archive, study_uid) if target.active else ""
    try:
        assoc = associate(settings, peer, contexts_for(todo))
    except AssociationFailed as exc:
        return str(exc)
    error = ""
    try:
        for inst in todo:
            if not assoc.is_established:
                error = "the peer dropped the association"
                break
            code, detail = _send_one(archive, settings, assoc, inst, target, issuer)
            if code is None:
                error = f"no answer to the C-STORE of {inst.sop_uid}: {detail}"
                break
            if code in _STORED:
                _record(archive, job_id, inst.sop_uid, "sent", code, detail)
            elif (code & 0xFF00) == 0xA700:
                # Out of resources: the peer may take it later; stop this attempt.
                _record(archive, job_id, inst.sop_uid, "pending", code, detail)
                error = f"{peer.ae_title} is out of resources (0x{code:04X})"
                break
            else:
                _record(archive, job_id, inst.sop_uid, "failed", code, detail)
                say(f"{inst.sop_uid} refused: {detail}")
    finally:
        if assoc.is_established:
            assoc.release()
    return error


def _send_one(
    archive: Archive,
    settings: Settings,
    assoc: Any,
    inst: StoredInstance,
    target: Reconciliation,
    issuer: str,
) -> tuple[int | None, str]:
    """C-STORE one instance; its status (None: no answer) and a description."""
    try:
        with archive.store.local_path(inst.blob_key) as path:
            if not target.active:
                rsp = assoc.send_c_store(StoredRef(path, inst))
            else:
                ds = pydicom.dcmread(path)
                coerce(ds, target, stored_issuer=issuer, modifying_system=settings.ae_title)
                rsp = _send_dataset(assoc, ds, inst)
    except ValueError as exc:  # no presentation context fits this instance
        return 0x0122, f"cannot be sent to this peer: {exc}"
    if not rsp or "Status" not in rsp:
        return None, "association dropped or timed out"
    code = int(rsp.Status)
    comment = str(rsp.get("ErrorComment", "") or "")
    return code, f"status 0x{code:04X}" + (f": {comment}" if comment else "")


def _send_dataset(assoc: Any, ds: Any, inst: StoredInstance) -> Any:
    """Send a (coerced) data set, decompressed when the peer takes none of its syntax."""
    try:
        return assoc.send_c_store(ds)
    except ValueError:
        if not UID(inst.transfer_syntax_uid).is_compressed:
            raise
    ds.decompress()
    return assoc.send_c_store(ds)


def requeue(archive: Archive, job_id: int) -> JobInfo:
    """Make a job runnable now: an interrupted one (left ``running``) or a failed one
    (its attempts start again; confirmed instances stay sent)."""
    with archive.db.writing() as session:
        job = session.get(ForwardJob, job_id)
        if job is None:
            raise ForwardError(f"no forwarding job {job_id}")
        if job.status == "failed":
            job.attempts = 0
        if job.status != "done":
            job.status = "queued"
            job.next_attempt_at = utcnow()
            job.updated_at = utcnow()
        return _info(session, job)
