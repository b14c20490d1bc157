"""Forwarding as a background task (``gateway.tasks``).

``studybridge.forward`` (``job_id``) works on one job for at most ``budget``
seconds; without ``job_id``, on every queued job whose next attempt is due. The
job's state is in the index, so a task killed anywhere is just run again, and an
instance the peer confirmed is never sent twice.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from gateway.archive.models import utcnow
from gateway.forward.jobs import requeue, run_job
from gateway.forward.models import ForwardJob
from gateway.tasks.registry import TaskContext, task

FORWARD = "studybridge.forward"


@task(FORWARD, max_retries=3)
def forward(
    ctx: TaskContext, job_id: int | None = None, budget: float = 900.0, backoff: float = 30.0
) -> dict[str, Any]:
    archive = ctx.archive
    if job_id is not None:
        ids = [int(job_id)]
    else:
        with archive.db.reading() as session:
            ids = list(
                session.scalars(
                    select(ForwardJob.id).where(
                        # "running" here means a run that died: its retry time is set.
                        ForwardJob.status.in_(("queued", "running")),
                        ForwardJob.next_attempt_at <= utcnow(),
                    )
                )
            )
    deadline = time.monotonic() + float(budget)
    results: dict[str, Any] = {}
    for jid in ids:
        requeue(archive, jid)  # an interrupted run left it "running"
        info = run_job(
            archive, ctx.settings, jid, backoff_seconds=float(backoff), wait=True, deadline=deadline
        )
        results[str(jid)] = {"status": info.status, **info.counts}
    return results
