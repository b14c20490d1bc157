"""Who may forward what (both index backends): the asker and the destination's
institution must both be permitted to download the study; every decision audited.

The exchange of tests/consent/conftest.py: North sent a1, a2, b1; South sent a3, c1;
Alice (NORTH/P1, SOUTH/S77) may give consents.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from consent.audit import Auditor
from consent.consents import grant
from consent.models import AuditRecord
from consent.principals import DEMO, Kind, Principal
from gateway.archive import Archive
from gateway.forward.access import FORWARD_OPERATION, ForwardDenied, authorize_forward
from gateway.forward.jobs import ForwardError
from gateway.peers import PeerRegistry
from tests.consent.conftest import Site, populate

pytestmark = pytest.mark.fast

LOCAL_OPERATOR = Principal(kind=Kind.OPERATOR, id=0, name="local:tester")


@pytest.fixture
def site(archive: Archive, tmp_path: Path) -> Iterator[Site]:
    auditor = Auditor(archive.db, window_seconds=0)
    yield populate(archive, tmp_path, auditor)
    auditor.close()


def _peers(site: Site) -> None:
    peers = PeerRegistry(site.db)
    peers.add("NORTHPACS", "127.0.0.1", 104, institution="North")
    peers.add("EASTPACS", "127.0.0.1", 105, institution="East")
    peers.add("NOBODY", "127.0.0.1", 106)


def _forward(site: Site, who: Principal, nick: str, peer: str) -> str:
    try:
        authorize_forward(site.db, site.auditor, who, site.studies[nick], peer, door="test")
    except ForwardDenied as exc:
        return f"denied: {exc}"
    return "allowed"


def test_forwarding_needs_download_for_the_asker_and_the_destination(site: Site) -> None:
    _peers(site)
    north = site.p("north_rad")
    # Its own study into its own PACS.
    assert _forward(site, north, "a1", "NORTHPACS") == "allowed"
    # Not into a PACS whose institution may not have it, nor one of no institution.
    assert "may not receive this study" in _forward(site, north, "a1", "EASTPACS")
    assert "may not receive this study" in _forward(site, north, "a1", "NOBODY")
    # South's study is hidden from North: answered like a study that does not exist.
    assert _forward(site, north, "a3", "NORTHPACS").startswith("denied: no such study")
    # Operators do not read images: no forwarding without break-glass.
    assert _forward(site, LOCAL_OPERATOR, "a1", "NORTHPACS").startswith("denied: no such")
    assert _forward(site, site.p("op"), "a1", "NORTHPACS").startswith("denied: no such")
    # Once Alice lets East see her studies, East's staff may pull a1 into East's PACS,
    # and North may send it there.
    grant(site.db, site.p("alice"), institution="East")
    assert _forward(site, site.p("east_clerk"), "a1", "EASTPACS") == "allowed"
    assert _forward(site, north, "a1", "EASTPACS") == "allowed"
    assert "may not receive" in _forward(site, north, "b1", "EASTPACS")  # Bob's: no consent
    assert _forward(site, DEMO, "c1", "EASTPACS").startswith("denied: EASTPACS")
    with pytest.raises(ForwardError, match="no peer"):
        authorize_forward(site.db, site.auditor, north, site.studies["a1"], "GHOST", door="t")

    site.auditor.flush()
    with site.db.reading() as session:
        rows = session.scalars(
            select(AuditRecord)
            .where(AuditRecord.operation == FORWARD_OPERATION)
            .order_by(AuditRecord.id)
        ).all()
    assert [(r.principal_name, r.outcome) for r in rows[:3]] == [
        ("north_rad", "allowed"),
        ("north_rad", "denied"),
        ("north_rad", "denied"),
    ]
    assert rows[0].detail == "to NORTHPACS (North)"
    assert rows[0].study_uid == site.studies["a1"]
    assert len(rows) == 10
