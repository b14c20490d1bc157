"""OpenID Connect sign-in: started sign-ins, one account per subject

``oidc_logins`` holds sign-ins between the redirect to the provider and the
callback (state hash, nonce, PKCE verifier, browser-cookie hash); the callback
deletes the row it uses. ``users.oidc_subject`` becomes unique where it is set.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oidc_logins",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("redirect_uri", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name=op.f("pk_oidc_logins")),
    )
    op.create_index(op.f("ix_oidc_logins_expires_at"), "oidc_logins", ["expires_at"])
    op.create_index(
        "ix_users_oidc_subject",
        "users",
        ["oidc_subject"],
        unique=True,
        sqlite_where=sa.text("oidc_subject <> ''"),
        postgresql_where=sa.text("oidc_subject <> ''"),
    )


def downgrade() -> None:
    op.drop_index("ix_users_oidc_subject", table_name="users")
    op.drop_index(op.f("ix_oidc_logins_expires_at"), table_name="oidc_logins")
    op.drop_table("oidc_logins")
