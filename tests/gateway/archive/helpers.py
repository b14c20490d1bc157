"""Helpers for archive tests: inspect what the index and the blob store hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from gateway.archive import Archive, Source
from gateway.archive.models import IngestEvent, Instance, Patient, Series, Study

SOURCE = Source(door="test", ae_title="TESTSCU", host="127.0.0.1", institution="Test Hospital")


def count(archive: Archive, model: Any) -> int:
    with archive.db.reading() as session:
        return session.scalar(select(func.count()).select_from(model))


def instances(archive: Archive) -> list[Instance]:
    with archive.db.reading() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def instance(archive: Archive, sop_uid: str) -> Instance | None:
    with archive.db.reading() as session:
        return session.scalar(select(Instance).where(Instance.sop_uid == sop_uid))


def events(archive: Archive, kind: str | None = None) -> list[IngestEvent]:
    stmt = select(IngestEvent).order_by(IngestEvent.id)
    if kind:
        stmt = stmt.where(IngestEvent.kind == kind)
    with archive.db.reading() as session:
        return list(session.scalars(stmt))


def blob_keys(archive: Archive, prefix: str = "") -> list[str]:
    return sorted(archive.store.iter_keys(prefix))


def blob_bytes(archive: Archive, key: str) -> bytes:
    with archive.store.open(key) as fh:
        return fh.read()


def read_blob(archive: Archive, key: str) -> Dataset:
    """The stored blob read back whole by pydicom."""
    with archive.store.open(key) as fh:
        return pydicom.dcmread(fh)


def all_files(root: Path) -> list[Path]:
    """Every file below root, including hidden ones (temporary copies)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_nothing_stored(archive: Archive) -> None:
    """No index row of any level, no blob outside quarantine, no leftover staging file."""
    assert count(archive, Instance) == 0
    assert count(archive, Series) == 0
    assert count(archive, Study) == 0
    assert count(archive, Patient) == 0
    stray = [key for key in blob_keys(archive) if not key.startswith("quarantine/")]
    assert stray == []
    if archive.settings.blob_store == "file":  # no hidden partial copy either
        root = archive.settings.resolved_blob_dir
        assert [p for p in all_files(root) if p.relative_to(root).parts[0] != "quarantine"] == []
    assert all_files(archive.settings.staging_dir) == []
