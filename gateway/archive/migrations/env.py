"""Alembic environment: runs migrations on the connection ``db.migrate`` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import consent.models  # noqa: F401  (consent's tables live on the same Base)
from gateway.archive.models import Base
from gateway.demo import models as _demo_models  # noqa: F401 - registers tables
from gateway.forward import models as _forward_models  # noqa: F401 - registers tables
from gateway.transfers import models as _transfer_models  # noqa: F401 - registers tables

target_metadata = Base.metadata
config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as conn:
            _run_on(conn)
        engine.dispose()
    else:
        _run_on(connection)


def _run_on(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
