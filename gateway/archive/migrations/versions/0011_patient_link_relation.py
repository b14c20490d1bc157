"""patient links: the relation (the patient themself, a guardian, a legal
representative) and when a proxy link ends (a minor comes of age, a court order ends)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patient_links") as batch:
        batch.add_column(
            sa.Column("relation", sa.String(length=32), nullable=False, server_default="self")
        )
        batch.add_column(sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("patient_links") as batch:
        batch.drop_column("ends_at")
        batch.drop_column("relation")
