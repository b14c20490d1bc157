"""Which institutions sent each study (``study_sources``), for the access scope

One row per (study, institution that sent instances of it), the distinct
``instances.source_institution`` of each study's instances, backfilled here and
written by ingest from now on. The rule "an institution sees what it sent" then
probes one primary key per study instead of the study's series and instances.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_sources",
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_fk"], ["studies.id"], name=op.f("fk_study_sources_study_fk_studies")
        ),
        sa.PrimaryKeyConstraint("study_fk", "institution", name=op.f("pk_study_sources")),
    )
    op.execute(
        "INSERT INTO study_sources (study_fk, institution) "
        "SELECT DISTINCT series.study_fk, instances.source_institution "
        "FROM instances JOIN series ON instances.series_fk = series.id"
    )
    with op.batch_alter_table("study_sources", schema=None) as batch_op:
        batch_op.create_index(
            "ix_study_sources_institution_study_fk", ["institution", "study_fk"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("study_sources", schema=None) as batch_op:
        batch_op.drop_index("ix_study_sources_institution_study_fk")
    op.drop_table("study_sources")
