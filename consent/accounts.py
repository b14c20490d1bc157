"""Local accounts, the embedded default sign-in: argon2 password hashes and TOTP.

Staff, operators and auditors must have a second factor (TOTP, RFC 6238) before they
can sign in; patients may add one. Sites with an identity provider use OpenID
Connect instead (``consent.oidc``). A failed sign-in says only that it failed, never
which part was wrong.
"""

from __future__ import annotations

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select

from consent.models import User
from consent.principals import ConsentError, Kind
from gateway.archive.db import Database

_HASHER = PasswordHasher()
# Checked against when the user does not exist, so both paths take as long. A hash
# made once with the hasher's parameters: hashing here cost every process that imports
# this module (each CLI call, each serving process) half a second of CPU.
_DUMMY = (
    "$argon2id$v=19$m=65536,t=3,p=4$BdKgLFki/5wtjhdFJRTyYA"
    "$BPNZlWWyz8OvjMN4hpKvGMZaFtJCKTZ9yz5xz4gz9nc"
)
if _HASHER.check_needs_rehash(_DUMMY):  # argon2-cffi's defaults changed: match them
    _DUMMY = _HASHER.hash("not a password of anyone")
SECOND_FACTOR_REQUIRED = {Kind.STAFF.value, Kind.OPERATOR.value, Kind.AUDITOR.value}
MIN_PASSWORD = 12


class SignInFailed(Exception):
    """Wrong username, password or code (deliberately not saying which)."""


class CodeRequired(SignInFailed):
    """The password was right and the account needs its TOTP code: the second step of
    a sign-in page. Said only after the password matched, as any two-step sign-in does."""


def set_password(db: Database, username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ConsentError(f"a password has at least {MIN_PASSWORD} characters")
    with db.writing() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise ConsentError(f"no user {username!r}")
        user.password_hash = _HASHER.hash(password)


def enable_totp(db: Database, username: str, issuer: str = "studybridge") -> str:
    """Give the user a new TOTP secret; returns the otpauth:// URI for their app."""
    secret = pyotp.random_base32()
    with db.writing() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise ConsentError(f"no user {username!r}")
        user.totp_secret = secret
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def sign_in(db: Database, username: str, password: str, code: str | None = None) -> int:
    """The user id if the password (and the TOTP code, when required or set) match."""
    with db.reading() as session:
        user = session.scalar(select(User).where(User.username == username))
    stored = user.password_hash if user is not None and user.password_hash else _DUMMY
    try:
        _HASHER.verify(stored, password)
        ok = user is not None and bool(user.password_hash) and user.disabled_at is None
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok or user is None:
        raise SignInFailed("sign-in failed")
    needs_code = user.kind in SECOND_FACTOR_REQUIRED or bool(user.totp_secret)
    if needs_code:
        if not user.totp_secret:
            raise SignInFailed("sign-in failed: set up a second factor first")
        if not code:
            raise CodeRequired("enter the code from your authenticator app")
        if not pyotp.TOTP(user.totp_secret).verify(code.strip(), valid_window=1):
            raise SignInFailed("sign-in failed")
    if _HASHER.check_needs_rehash(user.password_hash):
        set_password(db, username, password)
    return user.id
