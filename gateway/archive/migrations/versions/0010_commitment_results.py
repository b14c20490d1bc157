"""commitment results: Storage Commitment requests, their instances and reports

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commitment_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("transfer_fk", sa.Integer(), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_type", sa.Integer(), nullable=False),
        sa.Column("committed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("report_status", sa.String(length=16), nullable=False),
        sa.Column("reported_how", sa.String(length=32), nullable=False),
        sa.Column("reported_to", sa.Text(), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("report_error", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["transfer_fk"],
            ["transfers.id"],
            name=op.f("fk_commitment_requests_transfer_fk_transfers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commitment_requests")),
    )
    with op.batch_alter_table("commitment_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_commitment_requests_transaction_uid"), ["transaction_uid"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_commitment_requests_transfer_fk"), ["transfer_fk"], unique=False
        )
    op.create_table(
        "commitment_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_fk", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("committed", sa.Boolean(), nullable=False),
        sa.Column("failure_reason", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_fk"],
            ["commitment_requests.id"],
            name=op.f("fk_commitment_items_request_fk_commitment_requests"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commitment_items")),
    )
    with op.batch_alter_table("commitment_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_commitment_items_request_fk"), ["request_fk"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("commitment_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commitment_items_request_fk"))
    op.drop_table("commitment_items")
    with op.batch_alter_table("commitment_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commitment_requests_transfer_fk"))
        batch_op.drop_index(batch_op.f("ix_commitment_requests_transaction_uid"))
    op.drop_table("commitment_requests")
