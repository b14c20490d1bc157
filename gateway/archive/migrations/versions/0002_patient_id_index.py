"""index patients by Patient ID alone

Searches by Patient ID (QIDO, C-FIND) usually name no issuer; the unique key
(issuer, patient_id, ...) cannot serve them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_patients_patient_id", "patients", ["patient_id"])


def downgrade() -> None:
    op.drop_index("ix_patients_patient_id", table_name="patients")
