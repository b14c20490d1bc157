"""The table that marks what the demo seeded (one row per seeded object)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.archive.models import Base, UTCDateTime, utcnow


class DemoMark(Base):
    """``kind`` is institution, user, study, peer, transfer, consent or link; ``ref``
    the object's name, UID or id. A production configuration refuses a database
    holding any of these (``gateway.demo.seed.refuse_in_production``)."""

    __tablename__ = "demo_marks"
    __table_args__ = (UniqueConstraint("kind", "ref", name="uq_demo_marks_kind_ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    ref: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
