"""Closure-transfer work as background tasks (``gateway.tasks``).

- ``studybridge.transfer_pull`` (``transfer_id``): plan and send the due C-MOVEs of
  one transfer, within ``budget`` seconds; what is left stays pending in the index
  for the next run. Without ``transfer_id``: every transfer with pull items due.
- ``studybridge.transfer_finalize`` (``transfer_id``): reconcile and issue a receipt.

Both keep their state in the index, so a run killed anywhere is simply run again
(idempotent): ``studybridge tasks run|submit studybridge.transfer_pull transfer_id=3``
or from a worker.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from gateway.archive.models import utcnow
from gateway.peers import PeerRegistry
from gateway.tasks.registry import TaskContext, task
from gateway.transfers.finalize import finalize
from gateway.transfers.models import Transfer, TransferPull
from gateway.transfers.pull import PullPolicy, plan_pull, run_pull
from gateway.transfers.records import ACCEPTING, TransferError, get_transfer

TRANSFER_PULL = "studybridge.transfer_pull"
TRANSFER_FINALIZE = "studybridge.transfer_finalize"


def _due_transfers(ctx: TaskContext) -> list[int]:
    with ctx.archive.db.reading() as session:
        return sorted(
            set(
                session.scalars(
                    select(TransferPull.transfer_fk)
                    .join(Transfer, Transfer.id == TransferPull.transfer_fk)
                    .where(
                        TransferPull.status == "pending",
                        TransferPull.next_attempt_at <= utcnow(),
                        Transfer.status.in_(ACCEPTING),
                    )
                )
            )
        )


@task(TRANSFER_PULL, max_retries=3)
def transfer_pull(
    ctx: TaskContext, transfer_id: int | None = None, budget: float = 900.0
) -> dict[str, Any]:
    ids = [int(transfer_id)] if transfer_id is not None else _due_transfers(ctx)
    deadline = time.monotonic() + float(budget)
    results: dict[str, Any] = {}
    for tid in ids:
        info = get_transfer(ctx.archive.db, tid)
        peer = PeerRegistry(ctx.archive.db).get(info.source_ae) if info.source_ae else None
        if info.status not in ACCEPTING or peer is None:
            results[str(tid)] = {"skipped": f"status {info.status}, source {info.source_ae!r}"}
            continue
        plan_pull(ctx.archive.db, tid)
        summary = run_pull(
            ctx.archive.db,
            ctx.settings,
            peer,
            tid,
            PullPolicy.from_settings(ctx.settings),
            deadline=deadline,
        )
        results[str(tid)] = summary.as_dict()
    return results


@task(TRANSFER_FINALIZE, max_retries=3)
def transfer_finalize(ctx: TaskContext, transfer_id: int) -> dict[str, Any]:
    try:
        done = finalize(ctx.archive.db, ctx.settings, int(transfer_id))
    except TransferError as exc:
        return {"refused": str(exc)}
    return {"status": done.transfer.status, "missing": len(done.reconciliation.missing)}
