"""Keep tokens and secrets out of every log handler, however it formats.

``gateway.ops.logs`` masks secrets in the handlers ``setup_logging`` installs; the
patterns (passwords in URLs, ``token=``/``secret=``/``access_code=`` parameters,
Bearer/Basic credentials, our ``sbl_``/``sbat_`` tokens anywhere) live there, once.
This filter applies the same masking to records *before* any handler formats them,
so handlers configured elsewhere (uvicorn's access log, a test's capture, a site's
own logging config) never see a token either. ``install`` attaches it to the root
logger's and uvicorn's handlers; the DICOMweb app calls it at startup.
"""

from __future__ import annotations

import logging

from gateway.ops.logs import redact

__all__ = ["RedactingFilter", "install", "redact"]


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
