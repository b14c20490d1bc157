"""OpenID Connect sign-in against a real provider: node-oidc-provider on 127.0.0.1.

The provider (tests/dicomweb/oidc-provider.mjs, installed by scripts/oidc-provider.sh)
runs for this module; a test "browser" (httpx with a cookie jar) follows its redirects
and fills in its login form, and the portal runs in-process (TestClient, whose base
URL http://testserver is the redirect URI registered at the provider). The ID token
checks are run on genuine tokens this provider issued, then altered.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import anyio
import httpx
import pyotp
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import RSAKey
from pydantic import SecretStr

from consent.accounts import enable_totp, set_password
from consent.oidc import OIDCConfig, OIDCRefused, Provider, bind_subject, validate_id_token
from consent.patients import link_patient
from consent.principals import Kind, Role, add_institution, add_user, user_principal
from consent.redact import redact
from dicomweb.app import create_app
from dicomweb.sessions import CSRF_HEADER
from gateway.archive import Archive
from gateway.config import Settings
from tests.conftest import ServeStack
from tests.dicomweb.conftest import TEST_INSTITUTION, ingest_study
from tests.servers import free_port, missing, running_gateway, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.production]

REPO = Path(__file__).resolve().parents[2]
CALLBACK = "http://testserver/api/oidc/callback"
# The provider's test clients (tests/dicomweb/oidc-provider.mjs).
SECRET = "{}-secret-0123456789abcdef0123456789abcdef"
# Its test accounts: login -> (password, subject).
ALICE = ("alice", "alice-password", "a7c1e0f2-0001")
MALLORY = ("mallory", "mallory-password", "b9d2f1a3-0002")
DR_EAST = ("dr.east", "east-password", "c4e3a2b1-0003")
DR_NOWHERE = ("dr.nowhere", "nowhere-password", "d5f4b3c2-0004")

# A JWT as it would be written: base64url JSON header and payload (both begin with
# '{"', "eyJ"), dot-separated. (A bare "eyJ" also turns up in random base64, such as
# a cookie's signature.)
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.")


@pytest.fixture(scope="module")
def serve_port() -> int:
    """The HTTP port of a real ``studybridge serve`` (its callback is registered too)."""
    return free_port()


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Iterator[str]:
    """The provider's issuer URL, for this module's tests."""
    log = tmp_path_factory.mktemp("oidc") / "provider.log"
    with running_provider(
        log, f"{CALLBACK},http://127.0.0.1:{serve_port}/api/oidc/callback"
    ) as url:
        yield url


@contextlib.contextmanager
def running_provider(log: Path, redirect_uris: str, *flags: str) -> Iterator[str]:
    """node-oidc-provider on 127.0.0.1 (its output in ``log``): its issuer URL."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing("Node.js and npm are needed for the OpenID Connect provider (apt-get install npm)")
    installed = subprocess.run(
        ["bash", str(REPO / "scripts" / "oidc-provider.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if installed.returncode != 0:
        missing(f"scripts/oidc-provider.sh failed: {installed.stderr[-500:]}")
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "node",
                str(REPO / "tests" / "dicomweb" / "oidc-provider.mjs"),
                installed.stdout.strip(),
                str(port),
                redirect_uris,
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def authorize(url: str, login: str, password: str, callback: str = CALLBACK) -> str:
    """Be a new browser at the provider: follow its redirects, fill in its login form;
    return the callback URL it finally sends the browser to."""
    with httpx.Client(timeout=30) as browser:
        return visit_provider(browser, url, login, password, callback)[0]


def visit_provider(
    browser: httpx.Client, url: str, login: str, password: str, callback: str = CALLBACK
) -> tuple[str, bool]:
    """``authorize`` in a given browser (its cookies are the provider's session):
    the callback URL, and whether the provider asked who the browser is."""
    asked = False
    response = browser.get(url)
    for _ in range(12):
        if response.status_code in (302, 303):
            location = str(response.url.join(response.headers["location"]))
            if location.startswith(callback):
                return location, asked
            response = browser.get(location)
        elif response.status_code == 200 and 'name="login"' in response.text:
            asked = True
            action = re.search(r'action="([^"]+)"', response.text)
            assert action is not None
            response = browser.post(
                response.url.join(action.group(1)),
                data={"login": login, "password": password},
            )
        else:
            raise AssertionError(f"provider: {response.status_code} {response.text[:300]}")
    raise AssertionError("the provider never sent the browser back")


def set_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query[name] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class Portal:
    http: TestClient
    archive: Archive
    issuer: str
    alice_study: str
    bob_study: str

    def start(self) -> str:
        """GET /api/oidc/login; the provider's authorization URL it redirects to."""
        response = self.http.get("/api/oidc/login", follow_redirects=False)
        assert response.status_code == 303, response.text
        assert response.headers["referrer-policy"] == "no-referrer"
        return response.headers["location"]

    def callback(self, url: str, http: TestClient | None = None) -> httpx.Response:
        parts = urlsplit(url)
        return (http or self.http).get(f"{parts.path}?{parts.query}")

    def sign_in(
        self, account: tuple[str, str, str], tamper: Callable[[str], str] = lambda u: u
    ) -> httpx.Response:
        login, password, _sub = account
        return self.callback(authorize(tamper(self.start()), login, password))


def oidc_settings(settings: Settings, issuer: str, **extra: object) -> Settings:
    return settings.model_copy(
        update={
            "oidc_issuer": issuer,
            "oidc_client_id": "studybridge",
            "oidc_client_secret": SecretStr(SECRET.format("studybridge")),
            "oidc_scopes": ["openid", "profile", "studybridge"],
            **extra,
        }
    )


@contextlib.contextmanager
def portal_app(
    settings: Settings, archive: Archive, tmp_path: Path, issuer: str
) -> Iterator[Portal]:
    # Alice's and Bob's studies, sent by TEST_INSTITUTION (issuer NORTH).
    alice_study = ingest_study(archive, tmp_path, patient_id="P1", issuer="NORTH").study_uid
    bob_study = ingest_study(archive, tmp_path, patient_id="P2", issuer="NORTH").study_uid
    db = archive.db
    add_institution(db, TEST_INSTITUTION, issuer="NORTH")
    add_institution(db, "East", issuer="EAST")
    alice = add_user(db, "alice", Kind.PATIENT)
    op = add_user(db, "op", Kind.OPERATOR)
    with TestClient(create_app(settings, archive)) as http:
        bind_subject(
            db,
            http.app.state.gate.auditor,
            "alice",
            issuer,
            ALICE[2],
            by=user_principal(db, op),
            evidence="passport checked at the desk",
        )
        link_patient(
            db,
            http.app.state.gate.auditor,
            account_id=alice,
            issuer="NORTH",
            patient_id="P1",
            by=user_principal(db, op),
            evidence="identity card checked at the desk",
        )
        yield Portal(http, archive, issuer, alice_study, bob_study)


@pytest.fixture
def portal(settings: Settings, archive: Archive, tmp_path: Path, issuer: str) -> Iterator[Portal]:
    with portal_app(oidc_settings(settings, issuer), archive, tmp_path, issuer) as p:
        yield p


def bearer(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


# -- the flow ------------------------------------------------------------------------
def test_patient_signs_in_and_uses_the_api(portal: Portal, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    url = portal.start()
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) >= 43
    assert query["client_id"] == ["studybridge"] and "openid" in query["scope"][0].split()
    assert len(query["state"][0]) >= 32 and len(query["nonce"][0]) >= 32
    back = authorize(url, *ALICE[:2])
    answer = portal.callback(back)
    headers = bearer(answer)
    assert answer.json()["token_type"] == "Bearer" and answer.json()["expires_in"] > 0
    assert answer.headers["cache-control"] == "no-store"
    assert "sb_oidc" in answer.headers.get("set-cookie", "")  # the cookie is cleared

    # The same session as a local sign-in: Alice's own data, and only hers.
    assert portal.http.get("/api/me/links", headers=headers).status_code == 200
    found = portal.http.get("/dicom-web/studies", headers=headers)
    assert found.status_code == 200, found.text
    uids = {s["0020000D"]["Value"][0] for s in found.json()}
    assert uids == {portal.alice_study}
    for_other = portal.http.get(f"/dicom-web/studies/{portal.bob_study}/metadata", headers=headers)
    assert for_other.status_code == 404

    # Nothing secret reached a log: not the code, the state, the nonce, a JWT, our token.
    back_query = parse_qs(urlsplit(back).query)
    secrets_seen = [
        back_query["code"][0],
        back_query["state"][0],
        query["nonce"][0],
        answer.json()["access_token"],
    ]
    logged = caplog.text
    assert logged  # the capture works (the flow logs its HTTP requests)
    for value in secrets_seen:
        assert value not in logged
    assert not JWT.search(logged)  # no JWT (ID token) either
    # uvicorn's access log line of the callback is masked.
    line = f'127.0.0.1:5000 - "GET {urlsplit(back).path}?{urlsplit(back).query} HTTP/1.1" 200'
    assert back_query["code"][0] not in redact(line)
    assert back_query["state"][0] not in redact(line)

    # The sign-in is in the audit trail, as the account it mapped to.
    portal.http.app.state.gate.auditor.flush()
    from consent.audit import iter_records

    done = [r for r in iter_records(portal.archive.db) if r.operation == "oidc-sign-in"]
    assert [(r.principal_name, r.outcome) for r in done] == [("alice", "allowed")]
    assert not any(v in r.detail for r in done for v in secrets_seen)


def test_unknown_subject_is_refused(portal: Portal):
    answer = portal.sign_in(MALLORY)
    assert answer.status_code == 403
    assert answer.json()["error"] == "oidc-unknown-subject"
    assert "access_token" not in answer.text
    portal.http.app.state.gate.auditor.flush()
    from consent.audit import iter_records

    refused = [r for r in iter_records(portal.archive.db) if r.operation == "oidc-sign-in"]
    assert [(r.outcome, r.detail) for r in refused] == [("denied", "oidc-unknown-subject")]


def test_disabled_account_is_refused(portal: Portal):
    from consent.principals import disable_user

    with portal.archive.db.reading() as session:
        from sqlalchemy import select

        from consent.models import User

        alice = session.scalar(select(User.id).where(User.username == "alice"))
    disable_user(portal.archive.db, alice)
    answer = portal.sign_in(ALICE)
    assert answer.status_code == 403 and answer.json()["error"] == "oidc-account"


def test_replayed_state_is_refused(portal: Portal):
    back = authorize(portal.start(), *ALICE[:2])
    assert portal.callback(back).status_code == 200
    again = portal.callback(back)
    assert again.status_code == 400 and again.json()["error"] == "oidc-state"
    code = parse_qs(urlsplit(back).query)["code"][0]
    assert code not in again.text


def test_callback_in_another_browser_is_refused(portal: Portal):
    """Login CSRF: a callback URL (an attacker's own code and state) opened in a browser
    that did not start the sign-in is refused, and burns the state."""
    back = authorize(portal.start(), *ALICE[:2])
    with TestClient(portal.http.app) as victim:
        answer = portal.callback(back, victim)
    assert answer.status_code == 400 and answer.json()["error"] == "oidc-browser"
    assert portal.callback(back).json()["error"] == "oidc-state"


def test_wrong_nonce_is_refused(portal: Portal):
    """The nonce in the authorization request is changed on the way: the provider puts
    that one in the ID token, which then does not match the sign-in's."""
    answer = portal.sign_in(ALICE, lambda url: set_param(url, "nonce", secrets.token_urlsafe(32)))
    assert answer.status_code == 401 and answer.json()["error"] == "oidc-id-token"


def test_pkce_binds_the_code_to_the_sign_in(portal: Portal):
    """With another code challenge, the provider refuses our verifier: PKCE is real."""
    other = base64.urlsafe_b64encode(hashlib.sha256(b"x" * 50).digest()).rstrip(b"=").decode()
    answer = portal.sign_in(ALICE, lambda url: set_param(url, "code_challenge", other))
    assert answer.status_code == 401 and answer.json()["error"] == "oidc-code"


def test_wrong_issuer_parameter_is_refused(portal: Portal):
    back = authorize(portal.start(), *ALICE[:2])
    answer = portal.callback(set_param(back, "iss", "https://idp.example.org"))
    assert answer.status_code == 400 and answer.json()["error"] == "oidc-issuer"


def test_provider_error_and_missing_setup(portal: Portal, settings: Settings, archive: Archive):
    denied = portal.http.get("/api/oidc/callback?error=access_denied&state=x")
    assert denied.status_code == 401 and denied.json()["error"] == "oidc-access_denied"
    with TestClient(create_app(settings, archive)) as plain:
        assert plain.get("/api/oidc/login", follow_redirects=False).status_code == 404


def test_staff_from_institution_claim(
    settings: Settings, archive: Archive, tmp_path: Path, issuer: str
):
    configured = oidc_settings(
        settings,
        issuer,
        oidc_claim_mapping="institution-claim",
        oidc_institutions={"HOSP-EAST": "East", "HOSP-NOWHERE": "Nowhere"},
    )
    with portal_app(configured, archive, tmp_path, issuer) as portal:
        headers = bearer(portal.sign_in(DR_EAST))
        refused = portal.sign_in(DR_NOWHERE)  # mapped to an institution we do not have
        assert refused.status_code == 403 and refused.json()["error"] == "oidc-unknown-subject"
        assert portal.sign_in(MALLORY).status_code == 403  # no claims, not bound
        # East sent nothing: its radiologist sees no study, until Alice (whose binding
        # works under this rule too) consents to East.
        assert portal.http.get("/dicom-web/studies", headers=headers).status_code == 204
        alice = bearer(portal.sign_in(ALICE))
        given = portal.http.post("/api/me/consents", json={"institution": "East"}, headers=alice)
        assert given.status_code == 200, given.text
        found = portal.http.get("/dicom-web/studies", headers=headers)
        assert {s["0020000D"]["Value"][0] for s in found.json()} == {portal.alice_study}
        again = bearer(portal.sign_in(DR_EAST))  # the same account, not a second one
        assert again != headers
    from consent.tokens import resolve

    principal = resolve(archive.db, headers["Authorization"].split()[1])
    assert principal is not None and principal.kind is Kind.STAFF
    assert principal.institution == "East" and principal.role == Role.RADIOLOGIST.value
    assert principal.name == "oidc:" + DR_EAST[2]


def test_institution_claim_ignored_under_the_subject_rule(portal: Portal):
    assert portal.sign_in(DR_EAST).status_code == 403


def test_bind_subject_rules(archive: Archive, issuer: str):
    from consent.audit import Auditor, iter_records
    from consent.principals import ConsentError

    add_user(archive.db, "u1", Kind.PATIENT)
    add_user(archive.db, "u2", Kind.PATIENT)
    op = user_principal(archive.db, add_user(archive.db, "op", Kind.OPERATOR))
    assert op is not None
    auditor = Auditor(archive.db)
    evidence = "national ID card checked at the desk"

    def bind(user: str, subject: str, at: str = issuer, **kw: object) -> None:
        args = {"by": op, "evidence": evidence, **kw}
        bind_subject(archive.db, auditor, user, at, subject, **args)  # type: ignore[arg-type]

    bind("u1", "s-1")
    with pytest.raises(ConsentError, match="already bound"):
        bind("u2", "s-1")
    with pytest.raises(ConsentError, match="issuer"):
        bind("u2", "s-2", "http://idp.example.org")
    with pytest.raises(ConsentError, match="evidence"):
        bind("u2", "s-2", evidence="ok")
    with pytest.raises(ConsentError, match="operator"):
        bind("u2", "s-2", by=user_principal(archive.db, 1))
    bind("u1", "")  # unbind
    bind("u2", "s-1")
    auditor.close()
    details = [r.detail for r in iter_records(archive.db) if r.operation == "bind-oidc"]
    assert len(details) == 3 and all(evidence in d for d in details)
    assert details[1].endswith(f"unbound; evidence: {evidence}")


# -- ID token validation on genuine tokens of the provider ------------------------------
@dataclass(frozen=True)
class Issued:
    id_token: str
    nonce: str
    access_token: str


def issue(issuer: str, client_id: str, account: tuple[str, str, str] = ALICE) -> Issued:
    """Run the code flow as ``client_id`` (a relying party of our own making) and get
    its tokens straight from the provider's token endpoint."""
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(24)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = {
        "client_id": client_id,
        "response_type": "code",
        "scope": "openid profile",
        "redirect_uri": CALLBACK,
        "state": "s",
        "nonce": nonce,
        "code_challenge": challenge.rstrip(b"=").decode(),
        "code_challenge_method": "S256",
    }
    back = authorize(f"{issuer}/auth?{urlencode(query)}", *account[:2])
    code = parse_qs(urlsplit(back).query)["code"][0]
    tokens = httpx.post(
        f"{issuer}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "code_verifier": verifier,
        },
        auth=(client_id, SECRET.format(client_id)),
        timeout=30,
    )
    assert tokens.status_code == 200, tokens.text
    return Issued(tokens.json()["id_token"], nonce, tokens.json()["access_token"])


def config_for(issuer: str, client_id: str = "studybridge", **extra: object) -> OIDCConfig:
    return replace(
        OIDCConfig(issuer=issuer, client_id=client_id, client_secret=SECRET.format(client_id)),
        **extra,
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def jwks(issuer: str) -> dict:
    return httpx.get(f"{issuer}/jwks", timeout=30).json()


@pytest.fixture(scope="module")
def genuine(issuer: str) -> Issued:
    return issue(issuer, "studybridge")


def refused(raw: str, config: OIDCConfig, jwks: dict, nonce: str) -> None:
    with pytest.raises(OIDCRefused) as caught:
        validate_id_token(raw, config, jwks, nonce=nonce)
    assert caught.value.reason == "id-token"
    assert raw not in str(caught.value)


def test_genuine_id_token_is_valid(issuer: str, jwks: dict, genuine: Issued):
    claims = validate_id_token(
        genuine.id_token,
        config_for(issuer),
        jwks,
        nonce=genuine.nonce,
        access_token=genuine.access_token,
    )
    assert claims["sub"] == ALICE[2] and claims["aud"] == "studybridge"


def test_tampered_id_token_is_refused(issuer: str, jwks: dict, genuine: Issued):
    header, payload, signature = genuine.id_token.split(".")
    claims = json.loads(unb64(payload))
    claims["sub"] = MALLORY[2]
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    refused(forged, config_for(issuer), jwks, genuine.nonce)
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    refused(f"{header}.{payload}.{flipped}", config_for(issuer), jwks, genuine.nonce)
    refused("not a token", config_for(issuer), jwks, genuine.nonce)


def test_alg_none_is_refused(issuer: str, jwks: dict, genuine: Issued):
    _header, payload, _sig = genuine.id_token.split(".")
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        refused(f"{header}.{payload}.", config_for(issuer), jwks, genuine.nonce)


def test_hs256_with_the_public_key_is_refused(issuer: str, jwks: dict, genuine: Issued):
    """Algorithm confusion: HS256 "signed" with the provider's public RSA key."""
    _header, payload, _sig = genuine.id_token.split(".")
    public = RSAKey.import_key(jwks["keys"][0])
    for secret in (
        public.as_pem(private=False),
        json.dumps(jwks["keys"][0]).encode(),
    ):
        header = b64(json.dumps({"alg": "HS256", "kid": jwks["keys"][0]["kid"]}).encode())
        signing_input = f"{header}.{payload}".encode()
        mac = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
        refused(f"{header}.{payload}.{mac}", config_for(issuer), jwks, genuine.nonce)
    # Even "allowed" by the settings, a symmetric algorithm is never accepted.
    refused(
        f"{header}.{payload}.{mac}",
        config_for(issuer, algorithms=("RS256", "HS256")),
        jwks,
        genuine.nonce,
    )


def test_genuine_hs256_token_is_refused(issuer: str, jwks: dict):
    """The provider signs this client's ID tokens with HS256 (its client secret): valid
    for the provider, refused by us (asymmetric algorithms only)."""
    token = issue(issuer, "hs256")
    assert json.loads(unb64(token.id_token.split(".")[0]))["alg"] == "HS256"
    refused(token.id_token, config_for(issuer, "hs256"), jwks, token.nonce)


def test_wrong_audience_is_refused(issuer: str, jwks: dict):
    token = issue(issuer, "other")
    validate_id_token(token.id_token, config_for(issuer, "other"), jwks, nonce=token.nonce)
    refused(token.id_token, config_for(issuer), jwks, token.nonce)


def test_wrong_issuer_and_nonce_are_refused(issuer: str, jwks: dict, genuine: Issued):
    refused(genuine.id_token, config_for("https://idp.example.org"), jwks, genuine.nonce)
    refused(genuine.id_token, config_for(issuer), jwks, secrets.token_urlsafe(24))
    refused(genuine.id_token, config_for(issuer), jwks, "")


def test_expired_id_token_is_refused(issuer: str, jwks: dict):
    token = issue(issuer, "short-lived")  # the provider gives it 2 seconds
    config = config_for(issuer, "short-lived", leeway=0)
    validate_id_token(token.id_token, config, jwks, nonce=token.nonce)
    exp = json.loads(unb64(token.id_token.split(".")[1]))["exp"]
    time.sleep(max(0.0, exp - time.time()) + 1.1)
    refused(token.id_token, config, jwks, token.nonce)


def test_rotated_keys_are_read_again(issuer: str, genuine: Issued):
    """A token signed by a key the cached JWKS lacks makes the provider's JWKS be read
    again once (providers rotate keys); with no matching key it is still refused."""
    provider = Provider(config_for(issuer))
    stale = RSAKey.generate_key(2048, {"kid": "old-key", "use": "sig", "alg": "RS256"})
    provider._jwks, provider._jwks_at = {"keys": [stale.as_dict(private=False)]}, time.monotonic()
    claims = anyio.run(lambda: provider.validate(genuine.id_token, nonce=genuine.nonce))
    assert claims["sub"] == ALICE[2]
    assert provider._jwks["keys"][0]["kid"] == "test-rsa-1"


def test_unreachable_or_wrong_provider(settings: Settings, archive: Archive, issuer: str):
    """A provider that does not answer, or whose discovery document names another
    issuer (here: the configured issuer has a trailing slash), gives 502 and no redirect."""
    for wrong in (f"http://127.0.0.1:{free_port()}", issuer + "/"):
        with TestClient(create_app(oidc_settings(settings, wrong), archive)) as http:
            answer = http.get("/api/oidc/login", follow_redirects=False)
        assert answer.status_code == 502 and answer.json()["error"] == "oidc-provider"


def test_claimed_usernames_are_reserved(archive: Archive):
    from consent.principals import ConsentError

    with pytest.raises(ConsentError, match="OIDC"):
        add_user(archive.db, "oidc:" + DR_EAST[2], Kind.STAFF, institution="East")


@pytest.mark.slow
def test_running_gateway_signs_in_and_logs_no_secret(
    tmp_path: Path, issuer: str, serve_port: int, serve_stack: ServeStack
):
    """Through a real ``studybridge serve`` (uvicorn, logging at DEBUG): the
    operator binds the subject with the CLI, the browser signs in, and the gateway's
    whole log (DEBUG, its HTTP client's requests included) holds no secret of it."""
    env = {
        **serve_stack.env,
        "STUDYBRIDGE_OIDC_ISSUER": issuer,
        "STUDYBRIDGE_OIDC_CLIENT_ID": "studybridge",
        "STUDYBRIDGE_OIDC_CLIENT_SECRET": SECRET.format("studybridge"),
        "STUDYBRIDGE_LOG_LEVEL": "DEBUG",
    }
    with running_gateway(tmp_path, env) as gw:
        gw.http_port = serve_port
        # Accounts made and bound in process (the CLI's `users add` and `bind-oidc` are
        # tested in tests/consent/test_cli.py): three CLI starts less.
        from consent.audit import Auditor

        archive = Archive.open(serve_stack.settings(gw.data_dir), migrate_schema=True)
        try:
            add_user(archive.db, "alice", Kind.PATIENT)
            op = user_principal(archive.db, add_user(archive.db, "op", Kind.OPERATOR))
            assert op is not None
            auditor = Auditor(archive.db)
            bind_subject(archive.db, auditor, "alice", issuer, ALICE[2], by=op,
                         evidence="passport checked at the desk")  # fmt: skip
            auditor.close()
        finally:
            archive.close()
        gw.start()
        base = f"http://127.0.0.1:{serve_port}"
        with httpx.Client(base_url=base, timeout=30) as browser:
            start = browser.get("/api/oidc/login")
            assert start.status_code == 303, start.text
            nonce = parse_qs(urlsplit(start.headers["location"]).query)["nonce"][0]
            back = authorize(start.headers["location"], *ALICE[:2], callback=base)
            answer = browser.get(back)
            headers = bearer(answer)
            assert browser.get("/api/me/links", headers=headers).status_code == 200
            assert browser.get(back).status_code == 400  # the state is spent
        gw.stop()
        logged = gw.log_text()
    query = parse_qs(urlsplit(back).query)
    assert f"POST {issuer}/token" in logged  # the capture holds the code exchange
    secrets = [query["code"][0], query["state"][0], nonce, answer.json()["access_token"]]
    if "STUDYBRIDGE_S3_SECRET_KEY" in serve_stack.env:  # production: the store's too
        secrets.append(serve_stack.env["STUDYBRIDGE_S3_SECRET_KEY"])
    for value in secrets:
        assert value not in logged
    assert not JWT.search(logged)


def test_browser_gets_the_portal_session(portal: Portal):
    """A browser (Accept: text/html) gets the portal pages' session cookie and is sent
    to the sign-in page, which finds the session and goes on to the account's home."""
    back = authorize(portal.start(), *ALICE[:2])
    parts = urlsplit(back)
    page = portal.http.get(
        f"{parts.path}?{parts.query}",
        headers={"Accept": "text/html,application/xhtml+xml"},
        follow_redirects=False,
    )
    assert page.status_code == 303 and page.headers["location"] == "/viewer/signin"
    assert "access_token" not in page.text and "sbat_" not in page.headers["location"]
    session = portal.http.get("/api/session/browser")
    assert session.status_code == 200, session.text
    assert session.json()["account"]["username"] == "alice"


# -- signing out: RP-initiated logout -------------------------------------------------
SIGNED_OUT = "http://testserver/viewer/signin"  # registered at the provider


def browser_sign_in(portal: Portal, browser: httpx.Client) -> bool:
    """Sign Alice in through the provider as a browser does (the portal session
    cookie lands in ``portal.http``); whether the provider asked who she is."""
    back, asked = visit_provider(browser, portal.start(), *ALICE[:2])
    parts = urlsplit(back)
    page = portal.http.get(
        f"{parts.path}?{parts.query}", headers={"Accept": "text/html"}, follow_redirects=False
    )
    assert page.status_code == 303, page.text
    return asked


def sign_out(portal: Portal) -> dict:
    csrf = portal.http.get("/api/session/browser").json()["csrf"]
    answer = portal.http.delete("/api/session/browser", headers={CSRF_HEADER: csrf})
    assert answer.status_code == 200, answer.text
    assert portal.http.get("/api/session/browser").status_code == 401  # ended here
    return answer.json()


def test_sign_out_ends_the_provider_session(
    settings: Settings,
    archive: Archive,
    tmp_path: Path,
    issuer: str,
    caplog: pytest.LogCaptureFixture,
):
    """Signing out of a session an OpenID Connect sign-in opened answers the provider's
    end_session_endpoint; after the browser confirms there, the provider has forgotten
    it: the next sign-in asks for the password again instead of coming straight back."""
    caplog.set_level(logging.DEBUG)
    configured = oidc_settings(settings, issuer, oidc_post_logout_redirect_url=SIGNED_OUT)
    with (
        portal_app(configured, archive, tmp_path, issuer) as portal,
        httpx.Client(timeout=30) as browser,
    ):
        assert browser_sign_in(portal, browser)  # a new browser: asked
        # Signed out here only (the provider's page not visited): the provider still
        # knows the browser, and a sign-in comes back without asking. This is what
        # RP-initiated logout is for.
        assert sign_out(portal)["end_session_url"]
        assert not browser_sign_in(portal, browser)

        answer = sign_out(portal)
        url = answer["end_session_url"]
        end = urlsplit(url)
        meta = browser.get(f"{issuer}/.well-known/openid-configuration").json()
        assert f"{end.scheme}://{end.netloc}{end.path}" == meta["end_session_endpoint"]
        query = parse_qs(end.query)
        assert query == {"client_id": ["studybridge"], "post_logout_redirect_uri": [SIGNED_OUT]}
        # The provider asks the browser to confirm (a form with its xsrf value).
        page = browser.get(url)
        assert page.status_code == 200, page.text
        action = re.search(r'action="([^"]+)"', page.text)
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', page.text)
        assert action is not None and xsrf is not None
        done = browser.post(
            page.url.join(action.group(1)), data={"xsrf": xsrf.group(1), "logout": "yes"}
        )
        assert done.status_code in (302, 303) and done.headers["location"] == SIGNED_OUT

        assert browser_sign_in(portal, browser)  # asked again: the provider forgot it
        assert portal.http.get("/api/session/browser").status_code == 200

    assert not JWT.search(caplog.text)  # no ID token (JWT) in any log line
    assert "id_token" not in url


def test_sign_out_without_provider_logout(portal: Portal):
    """A local sign-in's session signs out locally only; and with no
    post_logout_redirect_uri configured the URL names our client alone (the provider
    then shows its own signed-out page)."""
    with httpx.Client(timeout=30) as browser:
        browser_sign_in(portal, browser)
        answer = sign_out(portal)
    assert parse_qs(urlsplit(answer["end_session_url"]).query) == {"client_id": ["studybridge"]}

    op_password = "a long operator password"
    set_password(portal.archive.db, "op", op_password)
    code = pyotp.parse_uri(enable_totp(portal.archive.db, "op")).now()
    signed = portal.http.post(
        "/api/session/browser", json={"username": "op", "password": op_password, "code": code}
    )
    assert signed.status_code == 200, signed.text
    local = portal.http.delete("/api/session/browser", headers={CSRF_HEADER: signed.json()["csrf"]})
    assert local.status_code == 200 and local.json() == {"status": "signed out"}


def test_provider_without_end_session_endpoint(
    settings: Settings, archive: Archive, tmp_path: Path
):
    """A provider announcing no end_session_endpoint: the sign-out is local only (the
    documented answer), and the provider still knows the browser afterwards."""
    with (
        running_provider(tmp_path / "provider.log", CALLBACK, "--no-logout") as plain,
        httpx.Client(timeout=30) as browser,
    ):
        meta = browser.get(f"{plain}/.well-known/openid-configuration").json()
        assert "end_session_endpoint" not in meta
        configured = oidc_settings(settings, plain, oidc_post_logout_redirect_url=SIGNED_OUT)
        with portal_app(configured, archive, tmp_path, plain) as portal:
            assert browser_sign_in(portal, browser)
            assert sign_out(portal) == {"status": "signed out"}
            assert not browser_sign_in(portal, browser)  # only our session ended
