"""Sign-in throttling: /api/session, /api/session/browser and /api/token lock an
account, a client id or an address out after repeated failures (429, Retry-After),
refuse even the right secret meanwhile, audit it, and open again after the window."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from consent.audit import iter_records
from consent.models import AuthFailure
from tests.dicomweb.test_portal import PASSWORD, Portal, portal

pytestmark = [pytest.mark.fast, pytest.mark.production]
__all__ = ["portal"]  # the fixture, shared with test_portal


def _age_failures(p: Portal, by: dt.timedelta) -> None:
    """Move every counted failure ``by`` into the past (the window passing)."""
    with p.archive.db.writing() as session:
        for row in session.scalars(select(AuthFailure)):
            row.at = row.at - by


def _audited(p: Portal, operation: str) -> list[str]:
    p.http.app.state.gate.auditor.flush()
    return [
        r.detail
        for r in iter_records(p.archive.db)
        if r.operation == operation and r.outcome == "denied"
    ]


def test_password_lockout_refuses_the_right_password_and_ends(portal: Portal):
    portal.settings.sign_in_max_failures = 3
    wrong = {"username": "alice", "password": "not it"}
    right = {"username": "alice", "password": PASSWORD}
    for _ in range(3):
        assert portal.http.post("/api/session", json=wrong).status_code == 401
    locked = portal.http.post("/api/session", json=right)
    assert locked.status_code == 429, locked.text
    assert locked.json()["error"] == "too-many-attempts"
    assert 0 < int(locked.headers["retry-after"]) <= 15 * 60
    assert "sbat_" not in locked.text
    # The browser sign-in is the same door for the same account.
    browser = portal.http.post("/api/session/browser", json=right)
    assert browser.status_code == 429 and "retry-after" in browser.headers
    # Another account is not locked by this one's failures (the address is under its limit).
    other = portal.http.post("/api/session", json={"username": "op", "password": "x"})
    assert other.status_code == 401
    details = _audited(portal, "sign-in")
    assert any(d.startswith("locked out (account)") for d in details), details
    assert "sign-in-failed" in details
    assert not any("not it" in d for d in details)
    # Once the window has let the failures go, the right password works again.
    _age_failures(portal, dt.timedelta(minutes=16))
    assert portal.http.post("/api/session", json=right).status_code == 200


def test_address_lockout_covers_every_account(portal: Portal):
    portal.settings.sign_in_max_failures_per_client = 4
    for name in ("alice", "op", "east_rad", "nobody-such"):
        body = {"username": name, "password": "not it"}
        assert portal.http.post("/api/session", json=body).status_code == 401
    refused = portal.http.post("/api/session", json={"username": "alice", "password": PASSWORD})
    assert refused.status_code == 429
    assert any(d.startswith("locked out (address)") for d in _audited(portal, "sign-in"))
    # The typed name of an unknown account is not recorded.
    portal.http.app.state.gate.auditor.flush()
    names = {r.principal_name for r in iter_records(portal.archive.db)}
    assert "nobody-such" not in names and "unknown account" in names


def test_client_credentials_lockout(portal: Portal):
    portal.settings.sign_in_max_failures = 2
    form = {
        "grant_type": "client_credentials",
        "client_id": "north-viewer",
        "client_secret": portal.client_secret,
    }
    for _ in range(2):
        bad = portal.http.post("/api/token", data={**form, "client_secret": "nope"})
        assert bad.status_code == 401 and bad.json() == {"error": "invalid_client"}
    locked = portal.http.post("/api/token", data=form)
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert "access_token" not in locked.json()
    assert any(d.startswith("locked out") for d in _audited(portal, "client-creds"))
    _age_failures(portal, dt.timedelta(minutes=16))
    issued = portal.http.post("/api/token", data=form)
    assert issued.status_code == 200 and issued.json()["token_type"] == "Bearer"


def test_successful_and_failed_sign_ins_are_audited_once(portal: Portal):
    """Successes are audited as allowed with who signed in; a failure is one denied
    record (the throttle's), not two."""
    right = {"username": "alice", "password": PASSWORD}
    assert portal.http.post("/api/session", json=right).status_code == 200
    assert portal.http.post("/api/session/browser", json=right).status_code == 200
    wrong = {"username": "alice", "password": "not it"}
    assert portal.http.post("/api/session", json=wrong).status_code == 401
    form = {
        "grant_type": "client_credentials",
        "client_id": "north-viewer",
        "client_secret": portal.client_secret,
    }
    assert portal.http.post("/api/token", data=form).status_code == 200
    portal.http.app.state.gate.auditor.flush()
    records = [r for r in iter_records(portal.archive.db) if r.door == "portal"]
    allowed = [(r.operation, r.principal_name, r.count) for r in records if r.outcome == "allowed"]
    assert sum(n for op, who, n in allowed if (op, who) == ("sign-in", "alice")) == 2
    assert ("client-creds", "north-viewer", 1) in allowed
    denied = [r for r in records if r.outcome == "denied" and r.operation == "sign-in"]
    assert [(r.principal_name, r.count) for r in denied] == [("alice", 1)]
    assert not any(portal.client_secret in r.detail or "not it" in r.detail for r in records)
