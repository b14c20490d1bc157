"""consent: principals, patient links, consents, share links, tokens, break-glass, audit

Also indexes instances.source_institution (the rule "an institution sees what it
sent" selects by it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("chain", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("principal_kind", sa.String(length=16), nullable=False),
        sa.Column("principal_id", sa.String(length=64), nullable=False),
        sa.Column("principal_name", sa.String(length=200), nullable=False),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.Column("door", sa.String(length=16), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("break_glass", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_records")),
        sa.UniqueConstraint("chain", "seq", name=op.f("uq_audit_records_chain_seq")),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_records_at"), ["at"], unique=False)
        batch_op.create_index("ix_audit_records_study_uid_at", ["study_uid", "at"], unique=False)

    op.create_table(
        "institutions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_institutions")),
        sa.UniqueConstraint("name", name=op.f("uq_institutions_name")),
    )
    op.create_table(
        "institution_systems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("institution_fk", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["institution_fk"],
            ["institutions.id"],
            name=op.f("fk_institution_systems_institution_fk_institutions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_institution_systems")),
        sa.UniqueConstraint("client_id", name=op.f("uq_institution_systems_client_id")),
    )
    with op.batch_alter_table("institution_systems", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_institution_systems_institution_fk"), ["institution_fk"], unique=False
        )

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("institution_fk", sa.Integer(), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("totp_secret", sa.String(length=64), nullable=False),
        sa.Column("oidc_subject", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["institution_fk"],
            ["institutions.id"],
            name=op.f("fk_users_institution_fk_institutions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_users_institution_fk"), ["institution_fk"], unique=False
        )

    op.create_table(
        "access_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("institution_fk", sa.Integer(), nullable=False),
        sa.Column("requested_by_fk", sa.Integer(), nullable=True),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("study_uids", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_by_fk", sa.Integer(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["decided_by_fk"], ["users.id"], name=op.f("fk_access_requests_decided_by_fk_users")
        ),
        sa.ForeignKeyConstraint(
            ["institution_fk"],
            ["institutions.id"],
            name=op.f("fk_access_requests_institution_fk_institutions"),
        ),
        sa.ForeignKeyConstraint(
            ["requested_by_fk"], ["users.id"], name=op.f("fk_access_requests_requested_by_fk_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_requests")),
    )
    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_access_requests_institution_fk"), ["institution_fk"], unique=False
        )

    op.create_table(
        "break_glass",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_fk", sa.Integer(), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reviewed_by_fk", sa.Integer(), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("review_note", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["reviewed_by_fk"], ["users.id"], name=op.f("fk_break_glass_reviewed_by_fk_users")
        ),
        sa.ForeignKeyConstraint(
            ["user_fk"], ["users.id"], name=op.f("fk_break_glass_user_fk_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_break_glass")),
    )
    with op.batch_alter_table("break_glass", schema=None) as batch_op:
        batch_op.create_index(
            "ix_break_glass_issuer_patient_id", ["issuer", "patient_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_break_glass_user_fk"), ["user_fk"], unique=False)

    op.create_table(
        "patient_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_fk", sa.Integer(), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("attested_by_fk", sa.Integer(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["attested_by_fk"], ["users.id"], name=op.f("fk_patient_links_attested_by_fk_users")
        ),
        sa.ForeignKeyConstraint(
            ["user_fk"], ["users.id"], name=op.f("fk_patient_links_user_fk_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_links")),
        sa.UniqueConstraint(
            "user_fk",
            "issuer",
            "patient_id",
            name=op.f("uq_patient_links_user_fk_issuer_patient_id"),
        ),
    )
    with op.batch_alter_table("patient_links", schema=None) as batch_op:
        batch_op.create_index(
            "ix_patient_links_issuer_patient_id", ["issuer", "patient_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_patient_links_user_fk"), ["user_fk"], unique=False)

    op.create_table(
        "share_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_fk", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("can_download", sa.Boolean(), nullable=False),
        sa.Column("single_use", sa.Boolean(), nullable=False),
        sa.Column("access_code_hash", sa.String(length=255), nullable=False),
        sa.Column("recipient_institution_fk", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["recipient_institution_fk"],
            ["institutions.id"],
            name=op.f("fk_share_links_recipient_institution_fk_institutions"),
        ),
        sa.ForeignKeyConstraint(
            ["user_fk"], ["users.id"], name=op.f("fk_share_links_user_fk_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_share_links")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_share_links_token_hash")),
    )
    with op.batch_alter_table("share_links", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_share_links_user_fk"), ["user_fk"], unique=False)

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

    op.create_table(
        "access_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("link_fk", sa.Integer(), nullable=True),
        sa.Column("user_fk", sa.Integer(), nullable=True),
        sa.Column("system_fk", sa.Integer(), nullable=True),
        sa.Column("acting_user_fk", sa.Integer(), nullable=True),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["acting_user_fk"], ["users.id"], name=op.f("fk_access_tokens_acting_user_fk_users")
        ),
        sa.ForeignKeyConstraint(
            ["link_fk"], ["share_links.id"], name=op.f("fk_access_tokens_link_fk_share_links")
        ),
        sa.ForeignKeyConstraint(
            ["system_fk"],
            ["institution_systems.id"],
            name=op.f("fk_access_tokens_system_fk_institution_systems"),
        ),
        sa.ForeignKeyConstraint(
            ["user_fk"], ["users.id"], name=op.f("fk_access_tokens_user_fk_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_access_tokens_token_hash")),
    )
    with op.batch_alter_table("access_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_access_tokens_link_fk"), ["link_fk"], unique=False)

    op.create_table(
        "consents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_fk", sa.Integer(), nullable=False),
        sa.Column("institution_fk", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("all_studies", sa.Boolean(), nullable=False),
        sa.Column("request_fk", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["institution_fk"],
            ["institutions.id"],
            name=op.f("fk_consents_institution_fk_institutions"),
        ),
        sa.ForeignKeyConstraint(
            ["request_fk"],
            ["access_requests.id"],
            name=op.f("fk_consents_request_fk_access_requests"),
        ),
        sa.ForeignKeyConstraint(["user_fk"], ["users.id"], name=op.f("fk_consents_user_fk_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consents")),
    )
    with op.batch_alter_table("consents", schema=None) as batch_op:
        batch_op.create_index(
            "ix_consents_institution_fk_user_fk", ["institution_fk", "user_fk"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_consents_user_fk"), ["user_fk"], unique=False)

    op.create_table(
        "share_link_studies",
        sa.Column("link_fk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["link_fk"], ["share_links.id"], name=op.f("fk_share_link_studies_link_fk_share_links")
        ),
        sa.PrimaryKeyConstraint("link_fk", "study_uid", name=op.f("pk_share_link_studies")),
    )
    op.create_table(
        "consent_studies",
        sa.Column("consent_fk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["consent_fk"], ["consents.id"], name=op.f("fk_consent_studies_consent_fk_consents")
        ),
        sa.PrimaryKeyConstraint("consent_fk", "study_uid", name=op.f("pk_consent_studies")),
    )
    with op.batch_alter_table("consent_studies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_consent_studies_study_uid"), ["study_uid"], unique=False
        )

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instances_source_institution"), ["source_institution"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_source_institution"))

    with op.batch_alter_table("consent_studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consent_studies_study_uid"))

    op.drop_table("consent_studies")
    op.drop_table("share_link_studies")
    with op.batch_alter_table("consents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consents_user_fk"))
        batch_op.drop_index("ix_consents_institution_fk_user_fk")

    op.drop_table("consents")
    with op.batch_alter_table("access_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_access_tokens_link_fk"))

    op.drop_table("access_tokens")
    with op.batch_alter_table("access_code_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_access_code_failures_link_fk_at")
        batch_op.drop_index("ix_access_code_failures_client_at")

    op.drop_table("access_code_failures")
    with op.batch_alter_table("share_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_share_links_user_fk"))

    op.drop_table("share_links")
    with op.batch_alter_table("patient_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_links_user_fk"))
        batch_op.drop_index("ix_patient_links_issuer_patient_id")

    op.drop_table("patient_links")
    with op.batch_alter_table("break_glass", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_break_glass_user_fk"))
        batch_op.drop_index("ix_break_glass_issuer_patient_id")

    op.drop_table("break_glass")
    with op.batch_alter_table("access_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_access_requests_institution_fk"))

    op.drop_table("access_requests")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_institution_fk"))

    op.drop_table("users")
    with op.batch_alter_table("institution_systems", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_institution_systems_institution_fk"))

    op.drop_table("institution_systems")
    op.drop_table("institutions")
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_records_study_uid_at")
        batch_op.drop_index(batch_op.f("ix_audit_records_at"))

    op.drop_table("audit_records")
