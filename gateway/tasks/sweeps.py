"""Periodic sweeps as tasks: orphan blobs and staging leftovers (``gateway.archive.sweep``).

``studybridge.sweep`` runs every ``sweep_interval`` seconds: from the beat of
``studybridge worker`` with a broker, from the ``serve`` supervisor on the
embedded default. Staging folders are per gateway process, so each ``serve`` also
sweeps its own (``sweep_staging``) whatever the broker.
"""

from __future__ import annotations

from gateway.archive.sweep import sweep_orphans
from gateway.tasks.registry import TaskContext, task

SWEEP = "studybridge.sweep"


@task(SWEEP)
def sweep(ctx: TaskContext, grace: float | None = None) -> dict[str, int]:
    """Delete orphan instance blobs older than the grace period."""
    older_than = ctx.settings.sweep_grace if grace is None else float(grace)
    report = sweep_orphans(ctx.archive.db, ctx.archive.store, older_than)
    return {"orphans_removed": report.orphans_removed, "orphan_bytes": report.orphan_bytes}
