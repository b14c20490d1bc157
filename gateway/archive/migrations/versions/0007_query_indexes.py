"""indexes for QIDO/C-FIND: prefix wildcards on PostgreSQL, modalities per study

On PostgreSQL, a plain B-tree index serves ``LIKE 'KIM%'`` only under the C
collation, so ``PatientName=KIM*`` scanned every study; the indexes on Patient ID,
the folded person-name groups and Accession Number are rebuilt with the
``varchar_pattern_ops`` operator class (which still serves ``=``). SQLite keeps
them as they are. On both, series get one (study, modality) index in place of the
study index, so ModalitiesInStudy is matched and returned from the index alone.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PREFIX_INDEXES = (
    ("patients", "patient_id"),
    ("patients", "pn_alphabetic_fold"),
    ("patients", "pn_ideographic_fold"),
    ("patients", "pn_phonetic_fold"),
    ("studies", "accession_number"),
)


def _rebuild_prefix_indexes(ops: str | None) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in PREFIX_INDEXES:
        name = f"ix_{table}_{column}"
        op.drop_index(name, table_name=table)
        extra = {"postgresql_ops": {column: ops}} if ops else {}
        op.create_index(name, table, [column], **extra)


def upgrade() -> None:
    _rebuild_prefix_indexes("varchar_pattern_ops")
    op.create_index("ix_series_study_fk_modality", "series", ["study_fk", "modality"])
    op.drop_index("ix_series_study_fk", table_name="series")


def downgrade() -> None:
    op.create_index("ix_series_study_fk", "series", ["study_fk"])
    op.drop_index("ix_series_study_fk_modality", table_name="series")
    _rebuild_prefix_indexes(None)
