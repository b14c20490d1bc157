"""Proxy access: a guardian or legal representative, linked like a patient (by an
institution's attestation or an operator's verification, audited), sees and shares
the ward's studies until the link ends; the ward's history names the proxy."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from consent.access import Gate, permitted_studies
from consent.audit import iter_records
from consent.history import access_history
from consent.links import LinkRules, create_link, exchange
from consent.patients import link_patient, unlink_patient
from consent.principals import ConsentError, Kind, Operation, add_user
from consent.tokens import resolve
from gateway.archive.models import utcnow
from tests.consent.conftest import POLICY, Site

pytestmark = pytest.mark.fast

EVIDENCE = "family register certificate and the parent's ID card"


def _guardian(site: Site, *, by: str = "north_admin", **kw) -> int:  # type: ignore[no-untyped-def]
    site.users["mom"] = site.users.get("mom") or add_user(site.db, "mom", Kind.PATIENT)
    return link_patient(
        site.db,
        site.auditor,
        account_id=site.users["mom"],
        issuer="NORTH",
        patient_id="P2",  # bob's ID at North: bob is the ward
        by=site.p(by),
        evidence=EVIDENCE,
        relation=kw.pop("relation", "guardian"),
        **kw,
    )


def _sees(site: Site, who: str) -> set[str]:
    return site.nick(permitted_studies(site.db, site.p(who), Operation.VIEW, site.studies.values()))


def test_a_guardian_sees_and_shares_the_wards_studies(site: Site):
    assert _sees(site, "bob") == {"b1"}
    site.users["mom"] = add_user(site.db, "mom", Kind.PATIENT)
    assert _sees(site, "mom") == set()
    _guardian(site, ends_at=utcnow() + dt.timedelta(days=365))
    assert _sees(site, "mom") == {"b1"}  # the ward's, nothing else
    _id, token = create_link(site.db, site.p("mom"), [site.studies["b1"]], LinkRules(), POLICY)
    holder = resolve(site.db, exchange(site.db, token, POLICY, client="10.0.0.1").token)
    assert holder is not None
    assert site.nick(permitted_studies(site.db, holder, Operation.VIEW, site.studies.values())) == {
        "b1"
    }
    # The grant is audited with its relation, and the ward's history shows the proxy.
    site.auditor.flush()
    grants = [
        json.loads(r.detail)
        for r in iter_records(site.db)
        if r.operation == "link-patient" and '"P2"' in r.detail
    ]
    assert [(g["relation"], g["method"]) for g in grants][-1] == ("guardian", "attestation")
    site.auditor.record_view = None
    Gate(site.db, site.auditor).check(site.p("mom"), Operation.VIEW, [site.studies["b1"]], door="t")
    site.auditor.flush()
    seen_by = {a.who for a in access_history(site.db, site.p("bob")).accesses}
    assert "mom" in seen_by


def test_a_proxy_link_ends_and_can_be_ended(site: Site):
    link_id = _guardian(site, ends_at=utcnow() + dt.timedelta(days=1))
    assert _sees(site, "mom") == {"b1"}
    later = utcnow() + dt.timedelta(days=2)  # the ward came of age
    assert (
        site.nick(
            permitted_studies(site.db, site.p("mom"), Operation.VIEW, site.studies.values(), later)
        )
        == set()
    )
    unlink_patient(site.db, site.auditor, link_id, by=site.p("op"))
    assert _sees(site, "mom") == set()
    assert _sees(site, "bob") == {"b1"}  # the ward keeps their own access


def test_who_may_grant_proxy_access(site: Site):
    with pytest.raises(ConsentError, match="own issuer"):
        _guardian(site, by="south_admin")  # South attests SOUTH IDs only
    with pytest.raises(ConsentError, match="only an institution admin or an operator"):
        _guardian(site, by="north_rad")
    with pytest.raises(ConsentError, match="relation"):
        _guardian(site, relation="friend")
    with pytest.raises(ConsentError, match="end before"):
        _guardian(site, ends_at=utcnow() - dt.timedelta(days=1))
    assert _guardian(site, by="op", relation="legal-representative")


def test_operators_link_proxies_from_the_command_line(site: Site, tmp_path: Path):
    from typer.testing import CliRunner

    from gateway.cli import app

    add_user(site.db, "dad", Kind.PATIENT)
    settings = site.archive.settings
    env = {"STUDYBRIDGE_DATABASE_URL": settings.database_url} if settings.database_url else {}
    args = ["users", "link-patient", "dad", "--issuer", "NORTH", "--patient-id", "P2"]
    args += ["--evidence", EVIDENCE, "--by", "op", "--relation", "guardian"]
    args += ["--until", "2099-01-01", "--data-dir", str(settings.data_dir)]
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "guardian" in result.output
    from sqlalchemy import select

    from consent.models import User
    from consent.principals import user_principal

    with site.db.reading() as session:
        dad = session.scalar(select(User.id).where(User.username == "dad"))
    principal = user_principal(site.db, dad)
    assert principal is not None
    assert site.nick(
        permitted_studies(site.db, principal, Operation.VIEW, site.studies.values())
    ) == {"b1"}
