"""peer tls: DICOM TLS for the associations we open to a peer

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("peers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tls", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("tls_ca_file", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("tls_server_name", sa.String(length=255), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("peers", schema=None) as batch_op:
        batch_op.drop_column("tls_server_name")
        batch_op.drop_column("tls_ca_file")
        batch_op.drop_column("tls")
