"""Validation of DICOM UIDs, which are attacker-controlled input before they become keys.

PS3.5 9.1: at most 64 characters, components of digits separated by single dots, no
empty component, no leading zero in a multi-digit component. We are lenient on
leading zeros (some real devices emit them) but strict on everything that could
change a storage key or path: only digits and dots reach a key.
"""

from __future__ import annotations

import re

from gateway.archive.errors import InvalidUID

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def check_uid(value: object, what: str) -> str:
    """Return the UID stripped of DICOM padding, or raise InvalidUID naming ``what``."""
    text = value.strip("\x00 ") if isinstance(value, str) else value
    if not is_valid_uid(text):
        shown = repr(text)[:80] if isinstance(text, str) else type(text).__name__
        raise InvalidUID(f"{what} is not a valid UID: {shown}")
    return text  # type: ignore[return-value]
