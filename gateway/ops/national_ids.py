"""National identification numbers that sites put in PatientID and other fields.

A Korean resident registration number (주민등록번호) is ``YYMMDD-GNNNNNN``: birth date,
a sex/century digit, six more. Where a principal has no need for it, it is shown
as ``YYMMDD-G******`` (the usual Korean display: the last six digits hidden) in API
answers and pages, and always so in logs and audit exports. The pattern requires
the hyphen and a plausible date, so that UIDs, accession numbers and other digit
runs are never touched.

``mask`` works on text, ``mask_bytes`` on UTF-8 bodies (JSON answers) without
decoding them.
"""

from __future__ import annotations

import re

_RRN = r"(?P<keep>(?<![\d.])\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-[1-8])\d{6}(?!\d)"
PATTERN = re.compile(_RRN)
_PATTERN_BYTES = re.compile(_RRN.encode())
MASK = "******"


def mask(text: str) -> str:
    return PATTERN.sub(lambda m: m.group("keep") + MASK, text)


def mask_bytes(data: bytes) -> bytes:
    return _PATTERN_BYTES.sub(lambda m: m.group("keep") + MASK.encode(), data)
