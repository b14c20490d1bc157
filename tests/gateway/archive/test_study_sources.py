"""``study_sources``: each study's senders, written by ingest, removed with the study,
and backfilled by migration 0017 from the instances (on SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from pydicom.uid import generate_uid

from gateway.archive import Archive, Source
from gateway.archive.db import alembic_config, migrate
from gateway.archive.models import StudySource
from gateway.archive.query import study_sources
from gateway.archive.removal import remove_study_rows
from tests.factories import ct_slice, write

pytestmark = pytest.mark.integration


def _sources(archive: Archive) -> set[tuple[str, str]]:
    with archive.db.reading() as session:
        rows = session.execute(
            sa.text(
                "SELECT studies.study_uid, study_sources.institution FROM study_sources "
                "JOIN studies ON studies.id = study_sources.study_fk"
            )
        ).all()
    return {(uid, inst) for uid, inst in rows}


def _store(archive: Archive, tmp_path: Path, study: str, series: str, institution: str) -> None:
    sop = generate_uid()
    path = write(ct_slice(study_uid=study, series_uid=series, sop_uid=sop), tmp_path / f"{sop}.dcm")
    source = Source(door="dimse", ae_title="SENDER", institution=institution)
    archive.ingest_file(path, source, owned=True)


def _load(archive: Archive, tmp_path: Path) -> tuple[str, str]:
    shared, own = generate_uid(), generate_uid()
    shared_series = generate_uid()
    # Two senders of one study (twice from the first), one study from a sender
    # that named no institution.
    _store(archive, tmp_path, shared, shared_series, "North Hospital")
    _store(archive, tmp_path, shared, shared_series, "North Hospital")
    _store(archive, tmp_path, shared, generate_uid(), "South Clinic")
    _store(archive, tmp_path, own, generate_uid(), "")
    return shared, own


def test_ingest_records_each_sender_once_and_removal_forgets_them(
    archive: Archive, tmp_path: Path
) -> None:
    shared, own = _load(archive, tmp_path)
    assert _sources(archive) == {
        (shared, "North Hospital"),
        (shared, "South Clinic"),
        (own, ""),
    }
    assert study_sources(archive.db, [shared, own]) == {
        shared: ["North Hospital", "South Clinic"],
        own: [""],
    }
    with archive.db.writing() as session:
        assert remove_study_rows(session, shared) is not None
    assert _sources(archive) == {(own, "")}


def test_migration_0017_backfills_the_senders_from_the_instances(
    archive: Archive, tmp_path: Path
) -> None:
    shared, own = _load(archive, tmp_path)
    written = _sources(archive)
    url = archive.settings.resolved_database_url
    archive.db.engine.dispose()  # no pooled connection in the way of the DDL
    command.downgrade(alembic_config(url), "0016")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table(StudySource.__tablename__)
    engine.dispose()
    migrate(url, "0017")
    assert _sources(archive) == written
    assert (shared, "South Clinic") in written and (own, "") in written
