"""Logging for serving processes: plain text or one JSON object per line.

JSON lines carry a UTC timestamp, level, logger, process, the message, and the
request ID of the HTTP request being served (``request_id``, set by the app's
middleware from X-Request-ID or made up). Whatever the format, secrets are masked
before a line is written: passwords in URLs, ``token=``/``key=`` style parameters
and Authorization values; national identification numbers are masked too
(``gateway.ops.national_ids``). Share tokens and keys must not be logged in the first
place; this is the safety net.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
from typing import Literal

from gateway.ops import national_ids

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_SECRETS = [
    # scheme://user:password@host
    (re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)"), "***"),
    # token=..., secret_key: ..., password=..., access_key=... (query strings, reprs)
    (
        re.compile(
            r"(?P<keep>\b(?:[\w-]*token|[\w-]*secret[\w-]*|password|passwd|access_key|"
            r"api_key|signature|x-amz-signature)\b['\"]?\s*[=:]\s*['\"]?)[^\s&'\",;]+",
            re.IGNORECASE,
        ),
        "***",
    ),
    # Authorization: Bearer xyz / Basic xyz
    (re.compile(r"(?P<keep>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+"), "***"),
    # Share-link and access tokens (consent.tokens) wherever they appear: URL
    # fragments, bodies, exception messages.
    (re.compile(r"(?P<keep>)\bsb(?:at|l)_[A-Za-z0-9_-]{8,}"), "***"),
    # Share-link access codes.
    (re.compile(r"(?P<keep>\baccess_code\b['\"]?\s*[=:]\s*['\"]?)[^\s&'\",;]+"), "***"),
    # National identification numbers (gateway.ops.national_ids): never in logs.
    (national_ids.PATTERN, national_ids.MASK),
    # OpenID Connect and OAuth 2 query parameters: the authorization code and state of a
    # callback (/api/oidc/callback?code=...&state=...), a nonce, an ID token hint.
    (
        re.compile(r"(?P<keep>[?&](?:code|state|nonce|session_state|id_token_hint)=)[^\s&'\",;#]+"),
        "***",
    ),
]


def redact(text: str) -> str:
    """``text`` with passwords, tokens and keys replaced by ``***``."""
    for pattern, mask in _SECRETS:
        text = pattern.sub(lambda m, mask=mask: m.group("keep") + mask, text)
    return text


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JSONFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


def setup_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Configure the root logger of this process (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            _Redacting("%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
