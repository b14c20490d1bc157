"""forward job requester: who asked for a forwarding job, and their institution

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("forward_jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("requested_by", sa.String(length=128), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column(
                "requester_institution", sa.String(length=64), nullable=False, server_default=""
            )
        )
        batch_op.create_index(
            batch_op.f("ix_forward_jobs_requester_institution"),
            ["requester_institution"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("forward_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forward_jobs_requester_institution"))
        batch_op.drop_column("requester_institution")
        batch_op.drop_column("requested_by")
