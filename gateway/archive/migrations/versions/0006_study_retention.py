"""study retention: retain-until dates and legal holds

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_retention",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("retain_until", sa.Date(), nullable=False),
        sa.Column("record_type", sa.String(length=16), nullable=False),
        sa.Column("years", sa.Integer(), nullable=False),
        sa.Column("legal_hold", sa.Boolean(), nullable=False),
        sa.Column("hold_reason", sa.Text(), nullable=False),
        sa.Column("hold_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_retention")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_study_retention_study_uid")),
    )
    with op.batch_alter_table("study_retention", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_retention_retain_until"), ["retain_until"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("study_retention", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_retention_retain_until"))

    op.drop_table("study_retention")
