"""Share links and the access tokens they are exchanged for."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from sqlalchemy import select

from consent.links import (
    REVOKE_NOTICE,
    LinkRefused,
    LinkRules,
    create_link,
    describe,
    exchange,
    list_links,
    revoke_link,
)
from consent.models import AccessToken, ShareLink
from consent.notify import LinkOpened
from consent.principals import ConsentError, Kind, add_dicomweb_client, system_principal
from consent.tokens import (
    authenticate_client,
    issue_for_system,
    issue_for_user,
    resolve,
    revoke_token,
)
from gateway.archive.models import utcnow
from tests.consent.conftest import POLICY, Site

pytestmark = pytest.mark.fast


def link(site: Site, *nicks: str, **rules) -> tuple[int, str]:
    return create_link(
        site.db, site.p("alice"), [site.studies[n] for n in nicks], LinkRules(**rules), POLICY
    )


def test_token_is_random_long_and_stored_only_as_a_hash(site: Site):
    link_id, token = link(site, "a1")
    assert token.startswith("sbl_") and len(token) - 4 >= 43  # 256 bits, base64url
    _other, token2 = link(site, "a1")
    assert token != token2
    with site.db.reading() as session:
        row = session.get(ShareLink, link_id)
        values = [str(getattr(row, c.key)) for c in ShareLink.__table__.columns]
    assert not any(token[4:] in v for v in values)


def test_expiry_defaults_to_seven_days_and_has_a_maximum(site: Site):
    link_id, _ = link(site, "a1")
    [view] = [v for v in list_links(site.db, site.p("alice")) if v.id == link_id]
    assert abs((view.expires_at - view.created_at) - dt.timedelta(days=7)) < dt.timedelta(seconds=1)
    with pytest.raises(ConsentError, match="at most 30 days"):
        link(site, "a1", lifetime=dt.timedelta(days=31))


def test_only_own_studies_can_be_shared(site: Site):
    with pytest.raises(ConsentError, match="your own studies"):
        link(site, "b1")
    with pytest.raises(ConsentError):
        create_link(site.db, site.p("north_rad"), [site.studies["a1"]], LinkRules(), POLICY)


def test_exchange_gives_a_scoped_short_lived_access_token(site: Site):
    _id, token = link(site, "a1", "a3")
    issued = exchange(site.db, token, POLICY, client="10.1.1.1")
    assert issued.token.startswith("sbat_")
    assert issued.expires_at - utcnow() <= dt.timedelta(minutes=60)
    holder = resolve(site.db, issued.token)
    assert holder is not None and holder.kind is Kind.LINK and not holder.can_download
    # The share token itself is not a bearer token.
    assert resolve(site.db, token) is None


def test_revocation_is_effective_on_the_next_request(site: Site):
    link_id, token = link(site, "a1")
    issued = exchange(site.db, token, POLICY, client="c")
    assert resolve(site.db, issued.token) is not None
    assert revoke_link(site.db, site.p("alice"), link_id) == REVOKE_NOTICE
    assert "cannot be recalled" in REVOKE_NOTICE
    assert resolve(site.db, issued.token) is None
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, token, POLICY, client="c")
    assert refused.value.reason == "revoked"
    # Someone else cannot revoke Alice's link.
    other_id, _ = link(site, "a2")
    with pytest.raises(ConsentError):
        revoke_link(site.db, site.p("bob"), other_id)


def test_expired_links_and_tokens_are_refused(site: Site):
    _id, token = link(site, "a1", lifetime=dt.timedelta(hours=1))
    issued = exchange(site.db, token, POLICY, client="c")
    # The access token never outlives the link.
    assert issued.expires_at <= utcnow() + dt.timedelta(hours=1)
    later = utcnow() + dt.timedelta(hours=2)
    assert resolve(site.db, issued.token, later) is None
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, token, POLICY, client="c", now=later)
    assert refused.value.reason == "expired"


def test_unknown_tokens_are_refused(site: Site):
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, "sbl_" + "A" * 43, POLICY, client="c")
    assert refused.value.reason == "unknown"
    assert resolve(site.db, "sbat_" + "A" * 43) is None
    assert resolve(site.db, "not-a-token") is None
    assert describe(site.db, "sbl_nothing") is None


def test_access_code_and_lockout_per_link(site: Site):
    _id, token = link(site, "a1", access_code="4711")
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, token, POLICY, client="1.1.1.1")
    assert refused.value.reason == "access-code"
    assert refused.value.remaining == POLICY.max_failures - 1
    assert exchange(site.db, token, POLICY, client="1.1.1.1", access_code="4711")
    for client in ("1.1.1.2", "1.1.1.3"):
        with pytest.raises(LinkRefused) as refused:
            exchange(site.db, token, POLICY, client=client, access_code="0000")
    assert refused.value.remaining == 0  # the third failure was the last try
    # Three failures (from three addresses) lock the link, even with the right code.
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, token, POLICY, client="1.1.1.4", access_code="4711")
    assert refused.value.reason == "locked"
    # The lockout ends after the window.
    later = utcnow() + POLICY.lockout + dt.timedelta(seconds=1)
    assert exchange(site.db, token, POLICY, client="1.1.1.4", access_code="4711", now=later)


def test_lockout_per_client_address_across_links(site: Site):
    tokens = [link(site, "a1", access_code="4711")[1] for _ in range(3)]
    attempts = [(t, "9.9.9.9") for t in tokens for _ in range(2)]  # 6 failures, 2 per link
    for n, (token, client) in enumerate(attempts[:5]):
        with pytest.raises(LinkRefused) as refused:
            exchange(site.db, token, POLICY, client=client, access_code="0000")
        assert refused.value.reason == "access-code", n
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, tokens[2], POLICY, client="9.9.9.9", access_code="4711")
    assert refused.value.reason == "locked"
    # Another address still gets in with the right code.
    assert exchange(site.db, tokens[2], POLICY, client="8.8.8.8", access_code="4711")


def test_single_use_survives_prefetching_and_is_consumed_once(site: Site):
    _id, token = link(site, "a1", single_use=True)
    for _ in range(3):  # link scanners and the landing page only describe
        info = describe(site.db, token)
        assert info is not None and info.status == "usable" and info.single_use
    assert exchange(site.db, token, POLICY, client="c")
    assert describe(site.db, token).status == "used"
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, token, POLICY, client="c")
    assert refused.value.reason == "used"


def test_recipient_institution_binding(site: Site):
    _id, token = link(site, "a1", recipient_institution="East")
    assert describe(site.db, token).recipient_institution == "East"
    with pytest.raises(LinkRefused) as refused:
        exchange(site.db, token, POLICY, client="c")
    assert refused.value.reason == "recipient"
    with pytest.raises(LinkRefused):
        exchange(site.db, token, POLICY, client="c", presenter=site.p("north_rad"))
    with pytest.raises(LinkRefused):
        exchange(site.db, token, POLICY, client="c", presenter=site.p("alice"))
    issued = exchange(site.db, token, POLICY, client="c", presenter=site.p("east_rad"))
    holder = resolve(site.db, issued.token)
    assert holder.kind is Kind.LINK and holder.name == "east_rad" and holder.institution == "East"


def test_opening_a_link_notifies_without_the_token(site: Site, caplog):
    seen: list[LinkOpened] = []

    class Collect:
        def link_opened(self, event: LinkOpened) -> None:
            seen.append(event)

    link_id, token = link(site, "a1")
    exchange(site.db, token, POLICY, client="7.7.7.7", notifier=Collect())
    assert [(e.link_id, e.client) for e in seen] == [(link_id, "7.7.7.7")]
    caplog.set_level(logging.INFO, logger="studybridge.notify")
    exchange(site.db, token, POLICY, client="7.7.7.7")  # default: a log line
    assert f"share link {link_id}" in caplog.text
    assert token not in caplog.text


def test_user_and_system_tokens(site: Site):
    issued = issue_for_user(site.db, site.users["east_rad"], dt.timedelta(minutes=5))
    principal = resolve(site.db, issued.token)
    assert principal.kind is Kind.STAFF and principal.institution == "East"
    assert principal.token_id == issued.id
    revoke_token(site.db, issued.id)
    assert resolve(site.db, issued.token) is None
    system_id, secret = add_dicomweb_client(site.db, "South", "south-viewer")
    assert authenticate_client(site.db, "south-viewer", secret) == system_id
    assert authenticate_client(site.db, "south-viewer", secret + "x") is None
    assert authenticate_client(site.db, "nobody", secret) is None
    issued = issue_for_system(site.db, system_id, dt.timedelta(minutes=5))
    assert resolve(site.db, issued.token) == system_principal(
        site.db, system_id, token_id=issued.id
    )
    with site.db.reading() as session:
        hashes = list(session.scalars(select(AccessToken.token_hash)))
    assert issued.token not in hashes and len(hashes) == 2
