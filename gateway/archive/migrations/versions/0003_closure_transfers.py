"""closure transfers: transfers, expected content, receipts, arrivals log

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfer_arrivals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transfer_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("door", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfer_arrivals")),
    )
    with op.batch_alter_table("transfer_arrivals", schema=None) as batch_op:
        batch_op.create_index(
            "ix_transfer_arrivals_transfer_id_sop_uid", ["transfer_id", "sop_uid"], unique=False
        )

    op.create_table(
        "transfers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("effective_on", sa.Date(), nullable=True),
        sa.Column("ends_on", sa.Date(), nullable=True),
        sa.Column("source_ae", sa.String(length=16), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("custodian_name", sa.String(length=64), nullable=False),
        sa.Column("custodian_contact", sa.Text(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfers")),
    )
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_transfers_source_ae"), ["source_ae"], unique=False)

    op.create_table(
        "transfer_expected",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transfer_fk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["transfer_fk"],
            ["transfers.id"],
            name=op.f("fk_transfer_expected_transfer_fk_transfers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfer_expected")),
        sa.UniqueConstraint(
            "transfer_fk",
            "study_uid",
            "series_uid",
            name=op.f("uq_transfer_expected_transfer_fk_study_uid_series_uid"),
        ),
    )
    op.create_table(
        "transfer_receipts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transfer_fk", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["transfer_fk"],
            ["transfers.id"],
            name=op.f("fk_transfer_receipts_transfer_fk_transfers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfer_receipts")),
    )
    with op.batch_alter_table("transfer_receipts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_transfer_receipts_transfer_fk"), ["transfer_fk"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("transfer_receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transfer_receipts_transfer_fk"))

    op.drop_table("transfer_receipts")
    op.drop_table("transfer_expected")
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transfers_source_ae"))

    op.drop_table("transfers")
    with op.batch_alter_table("transfer_arrivals", schema=None) as batch_op:
        batch_op.drop_index("ix_transfer_arrivals_transfer_id_sop_uid")

    op.drop_table("transfer_arrivals")
