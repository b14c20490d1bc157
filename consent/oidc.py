"""Sign-in through an OpenID Connect provider (a national or a hospital's identity provider).

The authorization code flow with PKCE (S256), ``state`` and ``nonce``, built on
authlib's OAuth 2 client (the code exchange) and joserfc (the ID token's signature
and claims, with authlib's ``CodeIDToken`` rules for nonce, azp and at_hash):

1. ``start`` reads the provider's ``/.well-known/openid-configuration`` (cached),
   makes a random state, nonce and PKCE verifier, keeps them in ``oidc_logins`` (the
   state only as a hash) with the hash of a random browser secret, and returns the
   provider's authorization URL and that secret (the portal sets it as a cookie).
2. ``finish`` takes the row of the returned state exactly once (deleted as it is
   read, whatever happens next), checks the browser secret and the ``iss``
   parameter (RFC 9207), exchanges the code with the verifier, and validates the
   ID token: a signature by a key of the provider's JWKS with an asymmetric
   algorithm of ``oidc_algorithms`` (``none`` and HS* never, so the public key can
   not be used as an HMAC secret), ``iss`` equal to the issuer, ``aud`` naming our
   client (and ``azp`` when there are several), ``exp``, ``iat`` and the nonce.
3. ``map_account`` turns the validated claims into one of our accounts by the
   configured rule, never by names: ``subject`` (an operator bound the issuer and
   ``sub`` to an account with ``studybridge users bind-oidc``, audited with the
   evidence checked) or
   ``institution-claim`` (also staff accounts made and kept up to date from an
   institution claim and a role claim). The portal then issues the same access
   token a local sign-in gets.
4. ``end_session_url`` (OpenID Connect RP-Initiated Logout 1.0): where a browser
   signing out of a session an OpenID Connect sign-in opened goes so the provider's
   own session ends too, when the provider announces an ``end_session_endpoint``.
   We keep no ID token, so the URL names our ``client_id`` (and the configured
   ``post_logout_redirect_uri``) instead of an ``id_token_hint``.

Nothing here logs a code, state, nonce or token; refusals carry a fixed message.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
from authlib.common.urls import add_params_to_uri
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from consent.audit import Attempt, Auditor
from consent.crypto import token_hash
from consent.models import Institution, OIDCLogin, User
from consent.principals import CLAIMED_PREFIX, ConsentError, Kind, Principal, Role
from gateway.archive.db import Database
from gateway.archive.models import utcnow

log = logging.getLogger(__name__)

# Signature algorithms an ID token may use: asymmetric ones only. A symmetric (HS*)
# token is signed with the client secret, and accepting HS* next to RS* is what lets
# an attacker sign with the provider's public key as the HMAC secret.
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
METADATA_SECONDS = 3600.0  # discovery document and JWKS are re-read after this
HTTP_TIMEOUT = 10.0


class OIDCRefused(Exception):
    """A sign-in that cannot go on. ``message`` is safe to show and to log: it never
    contains a code, state, nonce or token."""

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class OIDCConfig:
    issuer: str
    client_id: str
    client_secret: str
    token_auth: str = "client_secret_basic"  # noqa: S105 - a method name
    scopes: tuple[str, ...] = ("openid",)
    redirect_url: str = ""
    post_logout_redirect_url: str = ""
    claim_mapping: str = "subject"
    institution_claim: str = "institution"
    role_claim: str = "role"
    institutions: dict[str, str] = field(default_factory=dict)
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    leeway: float = 60.0
    login_ttl: dt.timedelta = dt.timedelta(minutes=10)

    @classmethod
    def from_settings(cls, settings: Any) -> OIDCConfig | None:
        """The configuration, or None when OpenID Connect sign-in is off."""
        if not settings.oidc_issuer:
            return None
        if not settings.oidc_client_id:
            raise ConsentError("oidc_issuer is set but oidc_client_id is not")
        if not secure_url(settings.oidc_issuer):
            raise ConsentError("oidc_issuer must be https:// (http only on a loopback address)")
        after_logout = urlsplit(settings.oidc_post_logout_redirect_url)
        if settings.oidc_post_logout_redirect_url and (
            after_logout.scheme not in ("http", "https") or not after_logout.hostname
        ):
            raise ConsentError("oidc_post_logout_redirect_url must be an absolute http(s) URL")
        scopes = tuple(settings.oidc_scopes)
        return cls(
            issuer=settings.oidc_issuer,
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret.get_secret_value(),
            token_auth=settings.oidc_token_auth,
            scopes=scopes if "openid" in scopes else ("openid", *scopes),
            redirect_url=settings.oidc_redirect_url,
            post_logout_redirect_url=settings.oidc_post_logout_redirect_url,
            claim_mapping=settings.oidc_claim_mapping,
            institution_claim=settings.oidc_institution_claim,
            role_claim=settings.oidc_role_claim,
            institutions=dict(settings.oidc_institutions),
            algorithms=tuple(a for a in settings.oidc_algorithms if a in ASYMMETRIC),
            leeway=settings.oidc_leeway_seconds,
            login_ttl=dt.timedelta(minutes=settings.oidc_login_minutes),
        )


def secure_url(url: str) -> bool:
    """https, or http to a loopback address (a provider on the same machine)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")


def subject_key(issuer: str, subject: str) -> str:
    """What ``users.oidc_subject`` holds: an issuer URL has no fragment, so "#" splits."""
    return f"{issuer}#{subject}"


@dataclass(frozen=True)
class Started:
    url: str  # the provider's authorization URL to send the browser to
    browser_secret: str  # for a cookie: the callback must come from the same browser


def provider_of(state: Any) -> Provider | None:
    """The app's one ``Provider`` (``state`` is ``app.state``: made from its settings
    at first use and kept there), or None when OpenID Connect sign-in is off."""
    provider: Provider | None = getattr(state, "oidc", None)
    if provider is None:
        config = OIDCConfig.from_settings(state.settings)
        if config is None:
            return None
        provider = state.oidc = Provider(config)
    return provider


class Provider:
    """One OpenID Connect provider: its discovery document and keys (cached), and the
    sign-ins started with it. One instance per app; safe across requests."""

    def __init__(self, config: OIDCConfig) -> None:
        self.config = config
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._jwks: dict[str, Any] | None = None
        self._jwks_at = 0.0

    def _client(self, **kwargs: Any) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.config.client_id,
            client_secret=self.config.client_secret,
            token_endpoint_auth_method=self.config.token_auth,
            scope=" ".join(self.config.scopes),
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT,
            **kwargs,
        )

    async def _get_json(self, url: str) -> dict[str, Any]:
        if not secure_url(url):
            raise OIDCRefused("provider", "the identity provider announced an insecure URL", 502)
        try:
            async with self._client() as client:
                response = await client.request(
                    "GET", url, headers={"Accept": "application/json"}, withhold_token=True
                )
                response.raise_for_status()
                answer = response.json()
        except Exception as exc:
            log.warning(
                "identity provider unreachable or broken at %s: %s", url, type(exc).__name__
            )
            raise OIDCRefused("provider", "the identity provider cannot be reached", 502) from exc
        if not isinstance(answer, dict):
            raise OIDCRefused("provider", "the identity provider answered nonsense", 502)
        return answer

    async def metadata(self) -> dict[str, Any]:
        """The discovery document; its issuer must be ours exactly (Discovery 4.3)."""
        if self._metadata is None or time.monotonic() - self._metadata_at > METADATA_SECONDS:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            found = await self._get_json(url)
            if found.get("issuer") != self.config.issuer:
                log.warning("identity provider at %s names another issuer", url)
                raise OIDCRefused("provider", "the identity provider names another issuer", 502)
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(found.get(key), str) or not secure_url(found[key]):
                    raise OIDCRefused("provider", f"the identity provider has no {key}", 502)
            self._metadata, self._metadata_at = found, time.monotonic()
        return self._metadata

    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        if refresh or self._jwks is None or time.monotonic() - self._jwks_at > METADATA_SECONDS:
            self._jwks = await self._get_json((await self.metadata())["jwks_uri"])
            self._jwks_at = time.monotonic()
        return self._jwks

    async def end_session_url(self) -> str | None:
        """Where to send a browser signing out so the provider's session ends too
        (RP-Initiated Logout 1.0), or None when the provider announces no
        ``end_session_endpoint`` or cannot be reached (the sign-out stays local).

        We keep no ID token, so no ``id_token_hint``: the request names our
        ``client_id`` and, when configured, the ``post_logout_redirect_uri`` (which the
        provider accepts only when it is registered for our client). Nothing secret is
        in it."""
        try:
            meta = await self.metadata()
        except OIDCRefused:
            return None  # _get_json logged why
        endpoint = meta.get("end_session_endpoint")
        if not isinstance(endpoint, str) or not secure_url(endpoint):
            return None
        params = [("client_id", self.config.client_id)]
        if self.config.post_logout_redirect_url:
            params.append(("post_logout_redirect_uri", self.config.post_logout_redirect_url))
        return add_params_to_uri(endpoint, params)

    # -- the flow ----------------------------------------------------------------------
    async def start(self, db: Database, redirect_uri: str) -> Started:
        meta = await self.metadata()
        state, nonce, browser = (secrets.token_urlsafe(32) for _ in range(3))
        verifier = secrets.token_urlsafe(64)  # 86 characters (RFC 7636: 43 to 128)
        now = utcnow()

        def keep() -> None:
            with db.writing() as session:
                session.execute(delete(OIDCLogin).where(OIDCLogin.expires_at < now))
                session.add(
                    OIDCLogin(
                        state_hash=token_hash(state),
                        browser_hash=token_hash(browser),
                        nonce=nonce,
                        code_verifier=verifier,
                        redirect_uri=redirect_uri,
                        created_at=now,
                        expires_at=now + self.config.login_ttl,
                    )
                )

        await anyio.to_thread.run_sync(keep)
        async with self._client(redirect_uri=redirect_uri) as client:
            url, _state = client.create_authorization_url(
                meta["authorization_endpoint"], state=state, code_verifier=verifier, nonce=nonce
            )
        return Started(url, browser)

    async def finish(
        self,
        db: Database,
        *,
        state: str,
        code: str,
        browser_secret: str,
        iss: str | None = None,
    ) -> dict[str, Any]:
        """The validated ID token claims of a returning sign-in, or ``OIDCRefused``."""
        login = await anyio.to_thread.run_sync(_take, db, state)
        if login is None or login.expires_at < utcnow():
            raise OIDCRefused(
                "state", "this sign-in is unknown, expired or already used: start again", 400
            )
        if not browser_secret or not secrets.compare_digest(
            token_hash(browser_secret), login.browser_hash
        ):
            raise OIDCRefused("browser", "this sign-in was started in another browser", 400)
        meta = await self.metadata()
        if iss is not None and iss != self.config.issuer:
            raise OIDCRefused("issuer", "the answer comes from another identity provider", 400)
        if iss is None and meta.get("authorization_response_iss_parameter_supported"):
            raise OIDCRefused("issuer", "the identity provider's answer lacks its issuer", 400)
        try:
            async with self._client(redirect_uri=login.redirect_uri) as client:
                tokens = await client.fetch_token(
                    meta["token_endpoint"],
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=login.code_verifier,
                )
        except OAuthError as exc:
            log.warning("identity provider refused the code exchange: %s", exc.error)
            raise OIDCRefused("code", "the identity provider refused the sign-in") from exc
        except Exception as exc:
            log.warning("code exchange with the identity provider failed: %s", type(exc).__name__)
            raise OIDCRefused("provider", "the identity provider cannot be reached", 502) from exc
        raw = tokens.get("id_token")
        if not isinstance(raw, str):
            raise OIDCRefused("id-token", "the identity provider sent no ID token")
        return await self.validate(raw, nonce=login.nonce, access_token=tokens.get("access_token"))

    async def validate(
        self, raw: str, *, nonce: str, access_token: str | None = None
    ) -> dict[str, Any]:
        """Validate an ID token against the provider's current keys (re-read once when
        the token names a key we do not have: providers rotate keys)."""
        keys = await self.jwks()
        try:
            return validate_id_token(raw, self.config, keys, nonce=nonce, access_token=access_token)
        except OIDCRefused as exc:
            if not isinstance(exc.__cause__, InvalidKeyIdError):
                raise
        keys = await self.jwks(refresh=True)
        return validate_id_token(raw, self.config, keys, nonce=nonce, access_token=access_token)


@dataclass(frozen=True)
class _Login:
    browser_hash: str
    nonce: str
    code_verifier: str
    redirect_uri: str
    expires_at: dt.datetime


def _take(db: Database, state: str) -> _Login | None:
    """Delete the started sign-in of ``state`` and return it: one statement, so two
    callbacks racing with one state cannot both get it."""
    with db.writing() as session:
        row = session.execute(
            delete(OIDCLogin)
            .where(OIDCLogin.state_hash == token_hash(state))
            .returning(
                OIDCLogin.browser_hash,
                OIDCLogin.nonce,
                OIDCLogin.code_verifier,
                OIDCLogin.redirect_uri,
                OIDCLogin.expires_at,
            )
        ).first()
    return _Login(*row) if row is not None else None


def validate_id_token(
    raw: str,
    config: OIDCConfig,
    jwks: dict[str, Any],
    *,
    nonce: str,
    access_token: str | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """The claims of a valid ID token for ``config``'s client, or ``OIDCRefused``."""
    algorithms = [a for a in config.algorithms if a in ASYMMETRIC]
    try:
        token = jwt.decode(raw, KeySet.import_key_set(jwks), algorithms=algorithms)
        claims = CodeIDToken(
            token.claims,
            token.header,
            {
                "iss": {"essential": True, "value": config.issuer},
                "aud": {"essential": True, "value": config.client_id},
                "sub": {"essential": True},
            },
            {"nonce": nonce, "client_id": config.client_id, "access_token": access_token},
        )
        claims.validate(now=now, leeway=int(config.leeway))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        what = getattr(exc, "error", type(exc).__name__)
        log.warning("ID token refused: %s %s", what, getattr(exc, "claim", "") or "")
        raise OIDCRefused("id-token", "the identity provider's ID token is not valid") from exc
    if not nonce or claims.get("nonce") != nonce:  # the flow always sends one
        raise OIDCRefused("id-token", "the identity provider's ID token is not valid")
    subject = claims["sub"]
    if (
        not isinstance(subject, str)
        or not subject
        or len(subject_key(config.issuer, subject)) > 255
    ):
        raise OIDCRefused("id-token", "the identity provider's subject is not usable")
    return dict(claims)


# -- claims to accounts ----------------------------------------------------------------
def map_account(db: Database, config: OIDCConfig, claims: dict[str, Any]) -> int:
    """The id of the account these (validated) claims sign in to, by the configured rule."""
    key = subject_key(config.issuer, claims["sub"])
    with db.reading() as session:
        user = session.scalar(select(User).where(User.oidc_subject == key))
    claimed = config.claim_mapping == "institution-claim"
    if user is not None and not (claimed and user.username.startswith(CLAIMED_PREFIX)):
        if user.disabled_at is not None:
            raise OIDCRefused("account", "this account is disabled", 403)
        return user.id
    if not claimed:
        raise OIDCRefused(
            "unknown-subject",
            "no studybridge account is bound to this identity: ask an operator to bind it",
            403,
        )
    try:
        return _claimed_staff(db, config, claims, key, user)
    except IntegrityError:
        # Two first sign-ins of one person at once: the other made the account.
        with db.reading() as session:
            user = session.scalar(select(User).where(User.oidc_subject == key))
        return _claimed_staff(db, config, claims, key, user)


def _claimed_staff(
    db: Database, config: OIDCConfig, claims: dict[str, Any], key: str, user: User | None
) -> int:
    """A staff account made from (and kept in step with) the institution and role claims."""
    value, role = claims.get(config.institution_claim), claims.get(config.role_claim)
    name = config.institutions.get(value) if config.institutions else value
    if not isinstance(name, str) or not isinstance(role, str) or role not in set(Role):
        raise OIDCRefused(
            "unknown-subject",
            "this identity names no institution and role studybridge knows",
            403,
        )
    with db.writing() as session:
        inst = session.scalar(select(Institution).where(Institution.name == name))
        if inst is None or inst.disabled_at is not None:
            raise OIDCRefused("unknown-subject", "this identity's institution is not known", 403)
        if user is None:
            subject = claims["sub"]
            username = CLAIMED_PREFIX + (
                subject if len(subject) <= 120 else hashlib.sha256(key.encode()).hexdigest()
            )
            user = User(username=username, kind=Kind.STAFF.value, oidc_subject=key)
            session.add(user)
        else:
            user = session.merge(user)
            if user.disabled_at is not None:
                raise OIDCRefused("account", "this account is disabled", 403)
        user.institution_fk, user.role = inst.id, role
        display = claims.get("name")
        if isinstance(display, str):
            user.display_name = display[:200]
        session.flush()
        return user.id


def bind_subject(
    db: Database,
    auditor: Auditor,
    username: str,
    issuer: str,
    subject: str,
    *,
    by: Principal,
    evidence: str,
    client: str = "",
) -> None:
    """The operator step binding a provider's subject to an existing account (an empty
    subject removes the binding), after checking who the person is; audited with the
    evidence, like a patient link."""
    if by.kind is not Kind.OPERATOR:
        raise ConsentError("only an operator binds accounts to an identity provider")
    if len(evidence.strip()) < 10:
        raise ConsentError("say how the person's identity was checked (evidence)")
    subject = subject.strip()
    if subject and not secure_url(issuer):
        raise ConsentError("name the provider's issuer URL (https://...)")
    key = subject_key(issuer, subject) if subject else ""
    if len(key) > 255:
        raise ConsentError("the issuer and subject are too long together (255 characters)")
    try:
        with db.writing() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                raise ConsentError(f"no user {username!r}")
            user.oidc_subject = key
            user_id = user.id
    except IntegrityError as exc:
        raise ConsentError("this subject is already bound to another account") from exc
    action = f"bound to {key}" if key else "unbound"
    auditor.record(
        Attempt(
            principal=by,
            door="admin",
            operation="bind-oidc",
            outcome="allowed",
            client=client,
            detail=f"account {user_id} {action}; evidence: {evidence.strip()}",
        )
    )
