"""Consents as FHIR, access requests, patient links, access history, log redaction."""

from __future__ import annotations

import datetime as dt
import io
import logging

import pytest

from consent import breakglass, consents, redact
from consent.access import Gate
from consent.audit import iter_records
from consent.history import access_history
from consent.links import LinkRules, create_link, exchange
from consent.patients import link_patient, linked_ids, unlink_patient
from consent.principals import ConsentError, Kind, Operation, add_user
from consent.tokens import resolve
from tests.consent.conftest import POLICY, Site
from tests.consent.test_access import visible

pytestmark = pytest.mark.fast


def test_consent_exports_as_fhir(site: Site):
    alice = site.p("alice")
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    consent_id = consents.grant(
        site.db,
        alice,
        institution="East",
        purpose="TREAT",
        study_uids=[site.studies["a1"]],
        start=start,
        end=end,
    )
    fhir = consents.to_fhir(site.db, consent_id)
    assert fhir["resourceType"] == "Consent" and fhir["status"] == "active"
    provision = fhir["provision"]
    assert provision["type"] == "permit"
    assert provision["period"] == {"start": "2026-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"}
    assert provision["actor"][0]["reference"]["display"] == "East"
    assert provision["purpose"][0]["code"] == "TREAT"
    assert provision["data"][0]["reference"]["identifier"]["value"] == (
        f"urn:oid:{site.studies['a1']}"
    )
    assert fhir["patient"]["identifier"]["value"] == "alice"
    consents.revoke(site.db, alice, consent_id)
    assert consents.to_fhir(site.db, consent_id)["status"] == "inactive"
    all_id = consents.grant(site.db, alice, institution="South", decision="deny")
    fhir = consents.to_fhir(site.db, all_id)
    assert fhir["provision"]["type"] == "deny" and "data" not in fhir["provision"]
    assert [c.id for c in consents.list_consents(site.db, alice)] == [all_id, consent_id]
    with pytest.raises(ConsentError):
        consents.revoke(site.db, site.p("bob"), all_id)


def test_access_request_approved_becomes_a_consent(site: Site):
    east = site.p("east_rad")
    request_id = consents.request_access(
        site.db, east, issuer="NORTH", patient_id="P1", reason="follow-up", purpose="TREAT"
    )
    assert [r.id for r in consents.requests_for(site.db, site.p("alice"))] == [request_id]
    assert consents.requests_for(site.db, site.p("bob")) == []
    with pytest.raises(ConsentError):
        consents.decide(site.db, site.p("bob"), request_id, approve=True)
    assert visible(site, east) == set()
    consent_id = consents.decide(site.db, site.p("alice"), request_id, approve=True)
    assert consent_id is not None
    assert visible(site, east) == {"a1", "a2", "a3"}
    assert consents.requests_for(site.db, site.p("alice")) == []
    declined = consents.request_access(
        site.db, site.p("south_admin"), issuer="NORTH", patient_id="P2", study_uids=[]
    )
    assert consents.decide(site.db, site.p("bob"), declined, approve=False) is None
    [req] = consents.requests_for(site.db, site.p("bob"), pending_only=False)
    assert req.status == "declined"
    with pytest.raises(ConsentError):
        consents.request_access(site.db, site.p("alice"), issuer="NORTH", patient_id="P2")


def test_patient_links_need_a_responsible_attester(site: Site):
    dave = site.users["dave"] = add_user(site.db, "dave", Kind.PATIENT)
    kwargs = dict(account_id=dave, issuer="SOUTH", patient_id="S99", evidence="ID card seen")
    # North's admin cannot attest South's IDs; radiologists and patients cannot at all.
    for by in ("north_admin", "east_rad", "alice"):
        with pytest.raises(ConsentError):
            link_patient(site.db, site.auditor, by=site.p(by), **kwargs)
    with pytest.raises(ConsentError, match="10 characters"):
        link_patient(site.db, site.auditor, by=site.p("op"), **{**kwargs, "evidence": "ok"})
    link_id = link_patient(site.db, site.auditor, by=site.p("south_admin"), **kwargs)
    assert linked_ids(site.db, dave) == [("SOUTH", "S99")]
    assert visible(site, site.p("dave")) == {"c1"}
    unlink_patient(site.db, site.auditor, link_id, by=site.p("op"))
    assert visible(site, site.p("dave")) == set()
    operations = [r.operation for r in iter_records(site.db) if r.door == "admin"]
    assert operations.count("link-patient") == 4 and "unlink-patient" in operations


def test_access_history_shows_who_opened_what_and_break_glass(site: Site):
    gate = Gate(site.db, site.auditor)
    _id, token = create_link(site.db, site.p("alice"), [site.studies["a1"]], LinkRules(), POLICY)
    holder = resolve(site.db, exchange(site.db, token, POLICY, client="5.5.5.5").token)
    gate.check(holder, Operation.VIEW, [site.studies["a1"]], door="dicomweb", client="5.5.5.5")
    gate.check(site.p("east_rad"), Operation.VIEW, [site.studies["a2"]], door="dicomweb")
    gate.check(site.p("east_rad"), Operation.VIEW, [site.studies["b1"]], door="dicomweb")
    breakglass.declare(
        site.db,
        site.auditor,
        site.p("east_rad"),
        issuer="NORTH",
        patient_id="P1",
        reason="stroke alert, patient cannot consent",
        duration=dt.timedelta(minutes=20),
        max_duration=dt.timedelta(hours=1),
    )
    history = access_history(site.db, site.p("alice"))
    seen = {(a.who, site.nick([a.study_uid]).pop(), a.outcome) for a in history.accesses}
    assert seen == {("link-1", "a1", "allowed"), ("east_rad", "a2", "denied")}
    assert [g.reason for g in history.break_glass] == ["stroke alert, patient cannot consent"]
    assert all(site.nick([a.study_uid]) <= {"a1", "a2", "a3"} for a in history.accesses)


def test_tokens_never_reach_the_logs(site: Site):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        redact.install()
        _id, token = create_link(
            site.db, site.p("alice"), [site.studies["a1"]], LinkRules(), POLICY
        )
        issued = exchange(site.db, token, POLICY, client="1.2.3.4")
        log = logging.getLogger("anything.at.all")
        log.info("GET /s#%s HTTP/1.1", token)
        log.info("GET /viewer?token=%s&x=1", issued.token)
        log.warning("Authorization: Bearer %s", issued.token)
        log.info("client_secret=abc123 access_code=4711")
        try:
            raise ValueError(f"bad token {token}")
        except ValueError:
            log.exception("failed")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = stream.getvalue()
    assert token not in text and issued.token not in text
    assert token[4:20] not in text and issued.token[5:20] not in text
    assert "abc123" not in text and "4711" not in text
    assert text.count("***") >= 6
    assert "GET /viewer?token=***&x=1" in text


def test_redact_function():
    assert redact.redact("Bearer abc.def") == "Bearer ***"
    assert redact.redact("x sbl_AAAAAAAAAAAA y /s#sbat_BBBBBBBBBBBB") == "x *** y /s#***"
    assert redact.redact("access_code=4711&x=1") == "access_code=***&x=1"
    assert redact.redact("nothing here") == "nothing here"
