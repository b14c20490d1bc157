"""A small exchange for consent tests, on SQLite and PostgreSQL (the archive fixture).

Institutions North (issuer NORTH) and South (SOUTH) sent studies; East sent none.
Alice is NORTH/P1 (studies a1, a2, sent by North) and SOUTH/S77 (a3, sent by South);
Bob is NORTH/P2 (b1, sent by North); Carol's study c1 (SOUTH/S99) is unlinked.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consent.audit import Auditor
from consent.links import LinkPolicy
from consent.patients import link_patient
from consent.principals import (
    Kind,
    Principal,
    Role,
    add_institution,
    add_user,
    peer_principal,
    user_principal,
)
from gateway.archive import Archive, Source
from tests.factories import ct_slice, uid, write

POLICY = LinkPolicy(
    default_lifetime=dt.timedelta(days=7),
    max_lifetime=dt.timedelta(days=30),
    token_lifetime=dt.timedelta(minutes=60),
    max_failures=3,
    max_failures_per_client=5,
    lockout=dt.timedelta(minutes=15),
)

STUDIES = [
    # nickname, issuer, patient id, name, sending institution, instances
    ("a1", "NORTH", "P1", "LIDDELL^ALICE", "North", 2),
    ("a2", "NORTH", "P1", "LIDDELL^ALICE", "North", 1),
    ("a3", "SOUTH", "S77", "LIDDELL^ALICE", "South", 1),
    ("b1", "NORTH", "P2", "BUILDER^BOB", "North", 1),
    ("c1", "SOUTH", "S99", "CAROL^C", "South", 1),
]


@dataclass
class Site:
    archive: Archive
    auditor: Auditor
    studies: dict[str, str] = field(default_factory=dict)
    sops: dict[str, list[str]] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)

    @property
    def db(self):  # type: ignore[no-untyped-def]
        return self.archive.db

    def p(self, name: str) -> Principal:
        principal = user_principal(self.db, self.users[name])
        assert principal is not None
        return principal

    def nick(self, uids: set[str] | list[str]) -> set[str]:
        by_uid = {v: k for k, v in self.studies.items()}
        return {by_uid.get(u, u) for u in uids}


def populate(archive: Archive, tmp_path: Path, auditor: Auditor) -> Site:
    site = Site(archive, auditor)
    n = 0
    for nick, issuer, pid, name, institution, count in STUDIES:
        study_uid, series_uid = uid(), uid()
        site.studies[nick] = study_uid
        site.sops[nick] = []
        for i in range(1, count + 1):
            ds = ct_slice(
                patient_id=pid,
                patient_name=name,
                issuer=issuer,
                study_uid=study_uid,
                series_uid=series_uid,
                instance_number=i,
                rows=4,
                columns=4,
            )
            n += 1
            source = Source(door="test", ae_title=institution.upper(), institution=institution)
            archive.ingest_file(write(ds, tmp_path / "in" / f"{n}.dcm"), source)
            site.sops[nick].append(ds.SOPInstanceUID)
    db = archive.db
    add_institution(db, "North", issuer="NORTH")
    add_institution(db, "South", issuer="SOUTH")
    add_institution(db, "East", issuer="EAST")
    users = {
        "alice": (Kind.PATIENT, None, None),
        "bob": (Kind.PATIENT, None, None),
        "north_admin": (Kind.STAFF, "North", Role.INSTITUTION_ADMIN),
        "north_rad": (Kind.STAFF, "North", Role.RADIOLOGIST),
        "south_admin": (Kind.STAFF, "South", Role.INSTITUTION_ADMIN),
        "east_rad": (Kind.STAFF, "East", Role.RADIOLOGIST),
        "east_clerk": (Kind.STAFF, "East", Role.CLERK),
        "op": (Kind.OPERATOR, None, None),
        "aud": (Kind.AUDITOR, None, None),
    }
    for name, (kind, inst, role) in users.items():
        site.users[name] = add_user(db, name, kind, institution=inst, role=role)
    evidence = "passport checked at the front desk"
    for account, issuer, pid, by in [
        ("alice", "NORTH", "P1", "north_admin"),
        ("alice", "SOUTH", "S77", "south_admin"),
        ("bob", "NORTH", "P2", "op"),
    ]:
        link_patient(
            db,
            auditor,
            account_id=site.users[account],
            issuer=issuer,
            patient_id=pid,
            by=site.p(by),
            evidence=evidence,
        )
    return site


@pytest.fixture
def auditor(archive: Archive) -> Iterator[Auditor]:
    aud = Auditor(archive.db, window_seconds=300)
    yield aud
    aud.close()


@pytest.fixture
def site(archive: Archive, tmp_path: Path, auditor: Auditor) -> Site:
    return populate(archive, tmp_path, auditor)


@pytest.fixture
def northpacs(site: Site) -> Principal:
    return peer_principal(site.db, "NORTHPACS", "North")
