"""transfer pulls: pull-mode state (C-MOVE items of a closure transfer)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfer_pulls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transfer_fk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["transfer_fk"], ["transfers.id"], name=op.f("fk_transfer_pulls_transfer_fk_transfers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfer_pulls")),
        sa.UniqueConstraint(
            "transfer_fk",
            "study_uid",
            "series_uid",
            name=op.f("uq_transfer_pulls_transfer_fk_study_uid_series_uid"),
        ),
    )


def downgrade() -> None:
    op.drop_table("transfer_pulls")
