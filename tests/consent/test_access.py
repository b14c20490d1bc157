"""The one access decision: default deny, each rule, applied inside the query."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import event

from consent import breakglass, consents
from consent.access import Gate, may_store, permitted_studies, study_filter
from consent.links import LinkRules, create_link, exchange
from consent.principals import DEMO, ConsentError, Kind, Operation, Principal
from consent.tokens import resolve
from gateway.archive import Level, Query
from gateway.archive.models import utcnow
from tests.consent.conftest import POLICY, Site

pytestmark = pytest.mark.fast

ALL = ["a1", "a2", "a3", "b1", "c1"]


def visible(site: Site, principal: Principal, op: Operation = Operation.VIEW) -> set[str]:
    uids = [site.studies[n] for n in ALL] + ["1.2.3.4.5.999"]  # one that does not exist
    return site.nick(permitted_studies(site.db, principal, op, uids))


def searched(site: Site, principal: Principal, level: Level = Level.STUDY, **kw) -> list:
    now = utcnow()
    query = Query(
        level=level,
        patient_root=level is Level.PATIENT,
        study_scope=lambda: study_filter(principal, Operation.SEARCH, now),
        **kw,
    )
    return site.archive.query(query).datasets


def test_an_institution_sees_what_it_sent(site: Site, northpacs: Principal):
    assert visible(site, site.p("north_rad")) == {"a1", "a2", "b1"}
    assert visible(site, northpacs) == {"a1", "a2", "b1"}
    assert visible(site, site.p("south_admin")) == {"a3", "c1"}
    assert visible(site, site.p("east_rad")) == set()


def test_default_deny_for_operators_auditors_and_unknown_kinds(site: Site):
    assert visible(site, site.p("op")) == set()
    assert visible(site, site.p("aud")) == set()
    stranger = Principal(kind=Kind.STAFF, id=999, name="x")  # no institution
    assert visible(site, stranger) == set()


def test_patient_sees_linked_studies_from_every_institution(site: Site):
    assert visible(site, site.p("alice")) == {"a1", "a2", "a3"}
    assert visible(site, site.p("bob")) == {"b1"}
    assert visible(site, site.p("alice"), Operation.STORE) == set()


def test_search_scope_applies_inside_the_query_at_every_level(site: Site):
    east = site.p("east_rad")
    consents.grant(site.db, site.p("alice"), institution="East", study_uids=[site.studies["a1"]])
    # STUDY level: only a1, with paging and counts consistent.
    found = searched(site, east, Level.STUDY, keys={"NumberOfStudyRelatedInstances": ""})
    assert [ds.StudyInstanceUID for ds in found] == [site.studies["a1"]]
    assert found[0].NumberOfStudyRelatedInstances == 2
    # PATIENT level: Alice appears (through a1), Bob and Carol do not.
    patients = searched(site, east, Level.PATIENT, keys={"PatientID": ""})
    assert [ds.PatientID for ds in patients] == ["P1"]
    # IMAGE level with limit/offset pages through a1's two instances only.
    first = searched(site, east, Level.IMAGE, limit=1)
    second = searched(site, east, Level.IMAGE, limit=1, offset=1)
    third = searched(site, east, Level.IMAGE, limit=1, offset=2)
    assert {first[0].SOPInstanceUID, second[0].SOPInstanceUID} == set(site.sops["a1"])
    assert third == []
    # SERIES level.
    assert len(searched(site, east, Level.SERIES)) == 1


def test_consent_permits_named_studies_or_all(site: Site):
    alice, east = site.p("alice"), site.p("east_rad")
    consents.grant(site.db, alice, institution="East", study_uids=[site.studies["a3"]])
    assert visible(site, east) == {"a3"}
    consents.grant(site.db, alice, institution="East")
    assert visible(site, east) == {"a1", "a2", "a3"}
    # Alice's consent never reaches Bob's study.
    assert "b1" not in visible(site, east)


def test_deny_consent_overrides_permits_but_not_what_an_institution_sent(site: Site):
    alice = site.p("alice")
    consents.grant(site.db, alice, institution="North")  # permit all
    consents.grant(site.db, alice, institution="North", decision="deny")
    # North still sees what it sent; Alice's South study stays hidden from it.
    assert visible(site, site.p("north_rad")) == {"a1", "a2", "b1"}
    consents.grant(site.db, alice, institution="East")
    deny = consents.grant(site.db, alice, institution="East", decision="deny")
    assert visible(site, site.p("east_rad")) == set()
    consents.revoke(site.db, alice, deny)
    assert visible(site, site.p("east_rad")) == {"a1", "a2", "a3"}


def test_consent_period_and_revocation_hold_on_the_next_decision(site: Site):
    alice, east = site.p("alice"), site.p("east_rad")
    now = utcnow()
    later = consents.grant(site.db, alice, institution="East", start=now + dt.timedelta(days=1))
    assert visible(site, east) == set()
    consents.revoke(site.db, alice, later)
    past = consents.grant(
        site.db,
        alice,
        institution="East",
        start=now - dt.timedelta(days=3),
        end=now - dt.timedelta(days=1),
    )
    assert past and visible(site, east) == set()
    current = consents.grant(site.db, alice, institution="East")
    assert visible(site, east) == {"a1", "a2", "a3"}
    consents.revoke(site.db, alice, current)
    assert visible(site, east) == set()


def test_a_consent_can_only_name_the_patients_own_studies(site: Site):
    with pytest.raises(ConsentError, match="your own studies"):
        consents.grant(
            site.db, site.p("alice"), institution="East", study_uids=[site.studies["b1"]]
        )
    with pytest.raises(ConsentError, match="your own studies"):
        consents.grant(site.db, site.p("alice"), institution="East", study_uids=["1.2.3.999"])
    with pytest.raises(ConsentError):
        consents.grant(site.db, site.p("north_rad"), institution="East")


def test_share_link_holder_sees_the_links_studies_and_downloads_only_if_allowed(site: Site):
    alice = site.p("alice")
    _id, token = create_link(site.db, alice, [site.studies["a1"]], LinkRules(), POLICY)
    holder = resolve(site.db, exchange(site.db, token, POLICY, client="10.0.0.9").token)
    assert holder is not None and holder.kind is Kind.LINK
    assert visible(site, holder) == {"a1"}
    assert visible(site, holder, Operation.SEARCH) == {"a1"}
    assert visible(site, holder, Operation.DOWNLOAD) == set()
    _id, token = create_link(
        site.db, alice, [site.studies["a3"]], LinkRules(can_download=True), POLICY
    )
    holder = resolve(site.db, exchange(site.db, token, POLICY, client="10.0.0.9").token)
    assert visible(site, holder, Operation.DOWNLOAD) == {"a3"}


def test_break_glass_grants_one_patient_for_a_limited_time_and_is_flagged(site: Site):
    rad = site.p("east_rad")
    grant = breakglass.declare(
        site.db,
        site.auditor,
        rad,
        issuer="NORTH",
        patient_id="P2",
        reason="unconscious patient in the emergency room",
        duration=dt.timedelta(minutes=30),
        max_duration=dt.timedelta(hours=4),
    )
    assert visible(site, rad) == {"b1"}
    gate = Gate(site.db, site.auditor)
    allowed = gate.check(rad, Operation.VIEW, [site.studies["b1"]], door="test", client="x")
    assert allowed == {site.studies["b1"]}
    site.auditor.flush()
    from consent.audit import iter_records

    records = [r for r in iter_records(site.db) if r.study_uid == site.studies["b1"]]
    assert records and all(r.break_glass and r.purpose == "ETREAT" for r in records)
    # After expiry the grant is gone.
    later = grant.expires_at + dt.timedelta(seconds=1)
    assert (
        site.nick(permitted_studies(site.db, rad, Operation.VIEW, [site.studies["b1"]], later))
        == set()
    )
    # It shows in Bob's history of grants.
    assert [g.id for g in breakglass.grants(site.db, patient_account=site.users["bob"])] == [
        grant.id
    ]


def test_break_glass_is_refused_to_clerks_and_needs_a_reason(site: Site):
    kwargs = dict(
        issuer="NORTH",
        patient_id="P2",
        duration=dt.timedelta(minutes=30),
        max_duration=dt.timedelta(hours=4),
    )
    with pytest.raises(ConsentError):
        breakglass.declare(site.db, site.auditor, site.p("east_clerk"), reason="x" * 20, **kwargs)
    with pytest.raises(ConsentError):
        breakglass.declare(site.db, site.auditor, site.p("east_rad"), reason="urgent", **kwargs)
    kwargs["duration"] = dt.timedelta(hours=5)
    with pytest.raises(ConsentError):
        breakglass.declare(site.db, site.auditor, site.p("east_rad"), reason="x" * 20, **kwargs)


def test_operator_reads_images_only_under_break_glass(site: Site):
    op = site.p("op")
    assert visible(site, op) == set()
    breakglass.declare(
        site.db,
        site.auditor,
        op,
        issuer="SOUTH",
        patient_id="S99",
        reason="verifying a reported mix-up with the hospital on the phone",
        duration=dt.timedelta(minutes=10),
        max_duration=dt.timedelta(hours=4),
    )
    assert visible(site, op) == {"c1"}


def test_store_permission(site: Site, northpacs: Principal):
    assert may_store(northpacs)
    assert may_store(site.p("east_clerk"))
    assert not may_store(site.p("east_rad"))
    assert not may_store(site.p("alice"))
    assert not may_store(site.p("op"))
    assert may_store(DEMO)


def test_demo_principal_sees_everything(site: Site):
    assert visible(site, DEMO) == set(ALL)


def test_gate_audits_allowed_and_denied_studies(site: Site):
    gate = Gate(site.db, site.auditor)
    rad = site.p("east_rad")
    allowed = gate.check(
        rad, Operation.VIEW, [site.studies["a1"], "1.2.3.4.5.6"], door="dicomweb", client="c"
    )
    assert allowed == set()
    from consent.audit import iter_records

    denied = [r for r in iter_records(site.db) if r.operation == "view"]
    assert {(r.study_uid, r.outcome) for r in denied} == {
        (site.studies["a1"], "denied"),
        ("1.2.3.4.5.6", "denied"),
    }


def test_a_dimse_peer_acts_for_its_registered_institution(site: Site):
    from consent.principals import peer_principal

    assert visible(site, peer_principal(site.db, "SOUTHPACS", "South")) == {"a3", "c1"}
    # An institution named by the peer registry but not registered for consents still
    # sees what it sent (here: nothing); a peer without an institution sees nothing.
    assert visible(site, peer_principal(site.db, "WESTPACS", "West")) == set()
    assert visible(site, peer_principal(site.db, "LONER", "")) == set()
    consents.grant(site.db, site.p("alice"), institution="East")
    assert visible(site, peer_principal(site.db, "EASTPACS", "East")) == {"a1", "a2", "a3"}


def test_storing_into_another_senders_study_is_refused(site: Site):
    from consent.access import may_add_to_study
    from consent.principals import peer_principal

    north = peer_principal(site.db, "NORTHPACS", "North")
    assert may_add_to_study(site.db, north, "1.2.3.4.5.6.7")  # a new study
    assert may_add_to_study(site.db, north, site.studies["a1"])  # its own
    assert not may_add_to_study(site.db, north, site.studies["c1"])  # South's
    consents.grant(site.db, site.p("alice"), institution="North")
    assert may_add_to_study(site.db, north, site.studies["a3"])  # visible by consent
    assert may_add_to_study(site.db, DEMO, site.studies["c1"])


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, {"a1", "a2", "a3", "b1"}),
        ({"PatientName": "LIDDELL*"}, {"a1", "a2", "a3"}),
        ({"ModalitiesInStudy": "CT"}, {"a1", "a2", "a3", "b1"}),
        ({"PatientID": "P1"}, {"a1", "a2"}),
    ],
    ids=["none", "wildcard-name", "modality", "patient-id"],
)
def test_a_page_read_one_rule_at_a_time_is_the_page_the_whole_scope_gives(
    site: Site, keys, expected
):
    # North sees what it sent (a1, a2, b1) and, by Alice's consent, a3; a1 and a2
    # are in both rules. Without a key that picks out few studies, PostgreSQL reads
    # a page per rule and then the page of their union: the same pages, in the same
    # order, with the same truncation, as the scope applied as one condition.
    consents.grant(site.db, site.p("alice"), institution="North")
    scope = Gate(site.db, site.auditor).search_scope(site.p("north_rad"), door="test")
    statements: list[str] = []
    listen = lambda conn, cursor, statement, *rest: statements.append(statement)  # noqa: E731
    event.listen(site.db.engine, "before_cursor_execute", listen)

    def page(study_scope, limit: int, offset: int) -> tuple[list[str], bool]:
        query = Query(
            level=Level.STUDY,
            keys=dict(keys, StudyInstanceUID=""),
            limit=limit,
            offset=offset,
            study_scope=study_scope,
        )
        result = site.archive.query(query)
        at = result.keys.index("StudyInstanceUID")
        return [row[at] for row in result.rows], result.truncated

    try:
        for limit, offset in [(10, 0), (2, 0), (2, 2), (1, 3), (2, 4), (3, 1)]:
            statements.clear()
            by_rule = page(scope, limit, offset)
            unioned = any(" UNION " in s for s in statements)
            assert by_rule == page(lambda: scope(), limit, offset)
            assert unioned == (not site.db.is_sqlite and "PatientID" not in keys)
        everything = page(scope, 10, 0)[0]
        assert len(everything) == len(set(everything))
        assert site.nick(everything) == expected
    finally:
        event.remove(site.db.engine, "before_cursor_execute", listen)
