"""Text normalisation shared by indexing and matching.

Values are decoded to Unicode by pydicom using the dataset's Specific Character Set
before they reach here. ``fold`` makes the case- and accent-insensitive form used
for person-name matching: Latin/Greek/Cyrillic accents are dropped, width variants
unified (NFKC: full-width Latin, half-width Katakana) and case folded, while Hangul
syllables and Kanji stay whole characters so that ``?`` still matches one of them.
"""

from __future__ import annotations

import re
import unicodedata

_COMBINING_ACCENTS = re.compile("[\u0300-\u036f]")


def fold(value: str) -> str:
    decomposed = unicodedata.normalize("NFD", value)
    stripped = _COMBINING_ACCENTS.sub("", decomposed)
    return unicodedata.normalize("NFKC", stripped).casefold()


def clean_pn_group(group: str) -> str:
    """A person-name group without trailing empty components or padding."""
    return group.strip(" \x00").rstrip("^").strip()


def split_pn(value: str) -> tuple[str, str, str]:
    """Alphabetic, ideographic and phonetic groups of a decoded PN value."""
    groups = ([*value.split("="), "", "", ""])[:3]
    return (clean_pn_group(groups[0]), clean_pn_group(groups[1]), clean_pn_group(groups[2]))


def normalize_date(value: str) -> str:
    """DA as YYYYMMDD; accepts the retired ACR-NEMA form YYYY.MM.DD."""
    return value.strip().replace(".", "")


def time_key(value: str) -> str:
    """TM padded to HHMMSS.FFFFFF so that ranges compare correctly as strings.

    '12' means 12:00:00.000000 and sorts with '120000'; the retired 'HH:MM:SS'
    form is accepted.
    """
    text = value.strip().replace(":", "")
    if not text:
        return ""
    whole, _, frac = text.partition(".")
    whole = (whole + "000000")[:6]
    frac = (frac + "000000")[:6]
    return f"{whole}.{frac}"
