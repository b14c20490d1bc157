"""forward jobs: forwarding jobs and their per-instance lines

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "forward_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("peer_ae", sa.String(length=16), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_jobs")),
    )
    with op.batch_alter_table("forward_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_forward_jobs_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "forward_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_fk", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_fk"], ["forward_jobs.id"], name=op.f("fk_forward_items_job_fk_forward_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forward_items")),
        sa.UniqueConstraint("job_fk", "sop_uid", name=op.f("uq_forward_items_job_fk_sop_uid")),
    )


def downgrade() -> None:
    op.drop_table("forward_items")
    with op.batch_alter_table("forward_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forward_jobs_study_uid"))

    op.drop_table("forward_jobs")
