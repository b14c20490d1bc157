"""Tokens and secret hashing.

Tokens (share links, access tokens) are 256 random bits from ``secrets``, URL-safe
base64; the database keeps only their SHA-256, so a copy of the database does not
let anyone in, and a fast hash is enough because the input cannot be guessed.
Human-chosen or short secrets (share-link access codes, client secrets) are hashed
with scrypt and a random salt and compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_BYTES = 32  # 256 bits (the floor is 128)

# scrypt cost: about 30 ms and 16 MiB per check on this kind of machine.
_N, _R, _P = 2**14, 8, 1


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_client_secret() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    encoded = (base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
    return f"scrypt${_N}${_R}${_P}${encoded[0]}${encoded[1]}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)
