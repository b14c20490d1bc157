"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import consent.models  # noqa: F401  (consent's tables are part of the schema)
from gateway.archive import Archive
from gateway.archive.models import Base
from gateway.demo import models as _demo_models  # noqa: F401 - registers tables
from gateway.forward import models as _forward_models  # noqa: F401 - registers tables
from gateway.transfers import models as _transfer_models  # noqa: F401 - registers tables

pytestmark = [pytest.mark.fast, pytest.mark.production]


def test_migrated_schema_matches_the_models(archive: Archive) -> None:
    with archive.db.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == []
