"""One failure table for every guessed secret (consent.throttle)

``auth_failures`` counts wrong access codes, passwords and client secrets per
subject and per client address; the share-link rows of ``access_code_failures``
move into it (kind ``access-code``, subject the link id) and that table goes.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_failures")),
    )
    with op.batch_alter_table("auth_failures", schema=None) as batch_op:
        batch_op.create_index(
            "ix_auth_failures_kind_subject_at", ["kind", "subject", "at"], unique=False
        )
        batch_op.create_index(
            "ix_auth_failures_kind_client_at", ["kind", "client", "at"], unique=False
        )
    op.execute(
        "INSERT INTO auth_failures (kind, subject, client, at) "
        "SELECT 'access-code', CAST(link_fk AS VARCHAR(128)), client, at FROM access_code_failures"
    )
    with op.batch_alter_table("access_code_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_access_code_failures_link_fk_at")
        batch_op.drop_index("ix_access_code_failures_client_at")
    op.drop_table("access_code_failures")


def downgrade() -> None:
    op.create_table(
        "access_code_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("link_fk", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["link_fk"],
            ["share_links.id"],
            name=op.f("fk_access_code_failures_link_fk_share_links"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_code_failures")),
    )
    with op.batch_alter_table("access_code_failures", schema=None) as batch_op:
        batch_op.create_index("ix_access_code_failures_client_at", ["client", "at"], unique=False)
        batch_op.create_index("ix_access_code_failures_link_fk_at", ["link_fk", "at"], unique=False)
    op.execute(
        "INSERT INTO access_code_failures (link_fk, client, at) "
        "SELECT CAST(subject AS INTEGER), client, at FROM auth_failures "
        "WHERE kind = 'access-code'"
    )
    with op.batch_alter_table("auth_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_auth_failures_kind_client_at")
        batch_op.drop_index("ix_auth_failures_kind_subject_at")
    op.drop_table("auth_failures")
