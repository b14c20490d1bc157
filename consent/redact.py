"""Keep tokens and secrets out of logs: a logging filter for every handler.

It rewrites a record's message (after %-formatting) wherever a share-link or access
token, a bearer credential, or a ``token=``/``code=``/``secret=`` parameter appears.
``install`` adds it to the root logger's handlers and to uvicorn's access log.
"""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    # Our own tokens, wherever they appear (URLs, fragments, bodies, exceptions).
    re.compile(r"\bsb(?:at|l)_[A-Za-z0-9_\-]{8,}"),
    # Any bearer/basic credential.
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/\-=]+"),
    # Query or form parameters that carry secrets.
    re.compile(
        r"(?i)\b(token|access_token|code|access_code|secret|client_secret|password)=[^&\s\"']+"
    ),
]
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    text = _PATTERNS[0].sub(REDACTED, text)
    text = _PATTERNS[1].sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _PATTERNS[2].sub(lambda m: f"{m.group(1)}={REDACTED}", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler
            return True
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = RedactingFilter()


def install(*loggers: logging.Logger) -> RedactingFilter:
    """Attach the filter to the handlers of the root logger (and of ``loggers``)."""
    targets = [logging.getLogger(), logging.getLogger("uvicorn.access"), *loggers]
    for logger in targets:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER
