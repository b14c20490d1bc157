"""Migration 0015 moves the share links' access-code failures into auth_failures
(and back on downgrade): a lockout in progress survives the upgrade."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from gateway.archive.db import alembic_config, migrate

pytestmark = pytest.mark.fast


def test_access_code_failures_move_into_auth_failures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url, "0014")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO access_code_failures (link_fk, client, at) "
                "VALUES (7, '192.0.2.1', '2026-12-06 20:00:00')"
            )
        )
    migrate(url, "0015")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT kind, subject, client FROM auth_failures")).all()
    assert [tuple(r) for r in rows] == [("access-code", "7", "192.0.2.1")]
    command.downgrade(alembic_config(url), "0014")
    with engine.connect() as conn:
        back = conn.execute(sa.text("SELECT link_fk, client FROM access_code_failures")).all()
    assert [tuple(r) for r in back] == [(7, "192.0.2.1")]
    engine.dispose()
