"""Mark access tokens issued by an OpenID Connect sign-in (RP-initiated logout)

``access_tokens.via_oidc`` is true for the browser session an OpenID Connect callback
opened: signing out of it also offers the provider's end_session_endpoint
(``dicomweb.sessions.browser_sign_out``). Existing tokens are marked false: their
sign-out stays local, as before.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("access_tokens", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("via_oidc", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("access_tokens", schema=None) as batch_op:
        batch_op.drop_column("via_oidc")
