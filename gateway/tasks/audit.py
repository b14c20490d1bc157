"""Periodic audit work as a task: a signed checkpoint, and shipping to syslog.

``studybridge.audit_checkpoint`` runs every ``audit_checkpoint_interval`` seconds:
from the beat of ``studybridge worker`` with a broker, from the ``serve``
supervisor on the embedded default. It appends a signed checkpoint of every audit
chain's head (``consent.audit.write_checkpoint``: what lets ``audit verify`` detect a
truncated tail) and, when a collector is configured (``audit_syslog_host``), sends
the records not sent yet as DICOM audit messages over syslog/TLS (``consent.syslog``).
"""

from __future__ import annotations

from consent import audit
from consent.syslog import SyslogTLS, ship
from gateway.config import Settings
from gateway.tasks.registry import TaskContext, task

AUDIT_CHECKPOINT = "studybridge.audit_checkpoint"


def syslog_target(settings: Settings) -> SyslogTLS | None:
    if not settings.audit_syslog_host:
        return None
    return SyslogTLS(
        settings.audit_syslog_host,
        settings.audit_syslog_port,
        ca_file=settings.audit_syslog_ca_file,
        cert_file=settings.audit_syslog_cert_file,
        key_file=settings.audit_syslog_key_file,
    )


@task(AUDIT_CHECKPOINT)
def audit_checkpoint(ctx: TaskContext) -> dict[str, int]:
    """Append a signed checkpoint; send new records to the syslog collector if any."""
    settings = ctx.settings
    key = audit.load_or_create_signing_key(settings.resolved_audit_key_file)
    entry = audit.write_checkpoint(ctx.archive.db, key, settings.resolved_audit_checkpoint_file)
    shipped = 0
    target = syslog_target(settings)
    if target is not None:
        cursor = settings.resolved_audit_checkpoint_file.parent / "syslog-cursor.json"
        shipped = ship(ctx.archive.db, target, cursor)
    return {"chains": len(entry["heads"]), "shipped": shipped}
