"""Which Specific Character Set a query response is sent in.

The index holds decoded Unicode, whatever character set each instance arrived in. A
C-FIND response is encoded once more by the door (pydicom), and PS3.4 C.4.1.1.3.3
says the response uses the character set the requester declared when it can. So:

- every text value (SH, LO, ST, LT, UT, UC and each component of a PN) of the response
  encodes in the requested set: answer with the requested set;
- otherwise answer in UTF-8 (``ISO_IR 192``), which holds every value; a requester that
  cannot read it is no worse off than with replacement characters, and usually can;
- no request means the default repertoire (``ISO_IR 6``, ASCII), then UTF-8.

"Encodes" is decided the way pydicom will encode when the door writes the response
(``pydicom.charset.encode_string``: the whole value in one of the encodings, else in
runs switched by ISO 2022 escape sequences), with one correction: pydicom encodes the
default repertoire as ISO 8859-1, which would silently put Latin-1 bytes into a value
declared ASCII. Here the default repertoire means ASCII. The check is strict and has no
side effects (no warnings, no change of pydicom's global validation mode), so it is safe
to call from concurrent association threads.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.charset import custom_encoders, python_encoding
from pydicom.dataset import Dataset

UTF8 = "ISO_IR 192"
DEFAULT_REPERTOIRE = "ISO_IR 6"

# Value representations whose values (0008,0005) governs (PS3.5 6.1.2.3).
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# Terms meaning the default repertoire (ASCII) in G0.
_DEFAULT_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# Terms that cannot be combined with code extensions (PS3.3 C.12.1.1.2).
_STANDALONE = frozenset({"ISO_IR 192", "GB18030", "GBK"})
# Terms whose G0 is not ASCII (JIS X 0201 Romaji: yen sign and overline).
_NON_ASCII_G0 = frozenset({"ISO_IR 13", "ISO 2022 IR 13"})


def requested_terms(requested: Sequence[str] | str | None) -> list[str]:
    """The defined terms of a Specific Character Set value ([] when absent or empty)."""
    if requested is None:
        return []
    terms = requested.split("\\") if isinstance(requested, str) else [str(t) for t in requested]
    terms = [t.strip() for t in terms]
    return terms if any(terms) else []


def response_character_set(ds: Dataset, requested: Sequence[str] | str | None) -> list[str]:
    """The Specific Character Set to send ``ds`` (values as Unicode strings) in.

    ``requested`` is the requester's Specific Character Set: a list of defined terms, a
    backslash-separated string, or None/empty for the default repertoire.
    """
    terms = requested_terms(requested) or [DEFAULT_REPERTOIRE]
    if _usable(terms) and dataset_encodes_in(ds, terms):
        return terms
    return [UTF8]


def dataset_encodes_in(ds: Dataset, terms: Sequence[str]) -> bool:
    """Whether every text value of ``ds`` (sequences included) encodes in ``terms``."""
    encodings = [python_encoding[t] for t in terms]
    default_first = terms[0] in _DEFAULT_TERMS
    ascii_ok = terms[0] not in _NON_ASCII_G0
    return all(_encodes(piece, encodings, default_first, ascii_ok) for piece in _text_pieces(ds))


def _usable(terms: Sequence[str]) -> bool:
    if any(t not in python_encoding for t in terms):
        return False
    if len(terms) > 1:
        # Code extensions: ISO 2022 terms only (the first may be empty: default G0).
        if any(t in _STANDALONE for t in terms):
            return False
        if any(not t.startswith("ISO 2022") for t in terms[1:]):
            return False
        if terms[0] and not terms[0].startswith("ISO 2022"):
            return False
    return True


def _text_pieces(ds: Dataset):  # type: ignore[no-untyped-def]
    """Each string pydicom encodes separately: a value, or one PN component."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _text_pieces(item)
            continue
        if elem.VR not in TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, list | tuple) or elem.VM > 1 else [elem.value]
        for value in values:
            if value is None or isinstance(value, bytes):
                continue
            text = str(value)
            if not text:
                continue
            if elem.VR == "PN":
                for group in text.split("="):
                    yield from group.split("^")
            else:
                yield text


def _encode(value: str, encoding: str) -> bytes:
    encoder = custom_encoders.get(encoding)
    if encoder is not None:
        return encoder(value)  # strict: raises UnicodeEncodeError
    return value.encode(encoding)


def _encodes(value: str, encodings: Sequence[str], default_first: bool, ascii_ok: bool) -> bool:
    if not value or (ascii_ok and value.isascii()):
        return True
    # As pydicom.charset.encode_string: the whole value in the first encoding that can.
    for index, encoding in enumerate(encodings):
        try:
            _encode(value, encoding)
        except (UnicodeError, LookupError):
            continue
        # pydicom encodes the default repertoire as Latin-1: not ASCII, not conformant.
        return not (index == 0 and default_first and not value.isascii())
    if len(encodings) == 1:
        return False
    # As pydicom's _encode_string_parts: runs, each in the encoding covering the longest
    # prefix of the rest, switched by escape sequences.
    rest = value
    while rest:
        best, best_len = 0, 0
        for index, encoding in enumerate(encodings):
            try:
                _encode(rest, encoding)
            except (UnicodeEncodeError, UnicodeDecodeError) as err:
                if err.start > best_len:
                    best, best_len = index, err.start
            except LookupError:
                continue
            else:
                best, best_len = index, len(rest)
                break
        if best_len == 0:
            return False
        if best == 0 and default_first and not rest[:best_len].isascii():
            return False
        rest = rest[best_len:]
    return True
