"""DICOM JSON (PS3.18 F.2): data sets as ``application/dicom+json`` bodies.

Values held by the archive are Unicode already (decoded with each instance's
Specific Character Set at ingest), so encoding is UTF-8 of either pydicom's
``Dataset.to_json_dict`` (``encode``) or, for query matches held as plain index
values, ``encode_matches``, which writes the same JSON without building a pydicom
data set per match (a tested equivalence). Person names come out as
``{"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}`` objects (only the
groups present), empty attributes as ``{"vr": ...}`` without ``Value``. Shared by
QIDO-RS and any route answering DICOM JSON.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

DICOM_JSON = "application/dicom+json"
JSON = "application/json"
JSON_MEDIA_TYPES = (DICOM_JSON, JSON)


def to_json(ds: Dataset) -> dict[str, Any]:
    """One data set as a DICOM JSON object (keys are 8-hex-digit tags, ascending)."""
    return ds.to_json_dict(bulk_data_threshold=1 << 30)


def encode(datasets: Iterable[Dataset]) -> bytes:
    """A DICOM JSON array of ``datasets``, UTF-8."""
    return dumps([to_json(ds) for ds in datasets])


# VRs whose string value is one value even if it holds a backslash (PS3.5 6.2);
# every other string VR is multi-valued with backslash separators.
_SINGLE_VALUED = frozenset({"LT", "ST", "UT"})
_INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def encode_matches(
    keys: Sequence[str],
    rows: Iterable[Sequence[Any]],
    extra: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]] = (),
) -> bytes:
    """A DICOM JSON array of query matches given as plain values.

    ``keys`` are attribute keywords and each row holds their values (``str``,
    ``int``, a list of ``str`` or None for empty), as the query engine returns them.
    ``extra`` adds attributes computed from a row's values by keyword (e.g. the
    Retrieve URL). Keywords without a registered tag are left out; objects have
    their tags in ascending order, like ``Dataset.to_json_dict``.
    """
    plan = []
    for position, keyword in enumerate(keys):
        tag = tag_for_keyword(keyword)
        if tag is not None:
            plan.append((tag, f"{tag:08X}", _converter(dictionary_VR(tag)), position, None))
    for keyword, compute in extra:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"{keyword} is not a DICOM keyword")
        plan.append((tag, f"{tag:08X}", _converter(dictionary_VR(tag)), -1, compute))
    plan.sort(key=lambda p: p[0])
    by_keyword = list(keys)
    out = []
    for row in rows:
        obj: dict[str, Any] = {}
        named: dict[str, Any] | None = None
        for _tag, hex_tag, convert, position, compute in plan:
            if compute is None:
                value = row[position]
            else:
                if named is None:
                    named = dict(zip(by_keyword, row, strict=True))
                value = compute(named)
            obj[hex_tag] = convert(value)
        out.append(obj)
    return dumps(out)


def element(vr: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON attribute object for a plain value (see ``encode_matches``)."""
    return _converter(vr)(value)


@functools.cache
def _converter(vr: str) -> Callable[[Any], dict[str, Any]]:
    # One function per VR, chosen once per column: a QIDO page of 100 studies
    # converts ~1,700 values, and deciding the VR's rules per value took a third of
    # the request.
    empty = {"vr": vr}  # shared: only ever serialised

    def values_of(value: Any) -> list[Any] | None:
        if value is None or value == "" or value == []:
            return None
        if isinstance(value, str):
            return [value] if vr in _SINGLE_VALUED else value.split("\\")
        return value if isinstance(value, list) else [value]

    if vr == "PN":

        def person_names(value: Any) -> dict[str, Any]:
            values = values_of(value)
            if values is None:
                return empty
            return {"vr": vr, "Value": [_person_name(v) for v in values]}

        return person_names
    if vr in _INT_VRS:

        def integers(value: Any) -> dict[str, Any]:
            if type(value) is int:
                return {"vr": vr, "Value": [value]}
            values = values_of(value)
            if values is None:
                return empty
            return {"vr": vr, "Value": [int(v) for v in values]}

        return integers
    if vr in _SINGLE_VALUED:

        def single(value: Any) -> dict[str, Any]:
            values = values_of(value)
            return empty if values is None else {"vr": vr, "Value": values}

        return single

    def strings(value: Any) -> dict[str, Any]:
        if type(value) is str and value and "\\" not in value:
            return {"vr": vr, "Value": [value]}
        values = values_of(value)
        return empty if values is None else {"vr": vr, "Value": values}

    return strings


def _person_name(value: str) -> dict[str, str]:
    groups = value.rstrip("=").split("=")
    return dict(zip(_PN_GROUPS, groups, strict=False))


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON (orjson: 3-4x the standard library's speed)."""
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        # What orjson refuses (integers beyond 64 bits, say): the standard library.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_accept(header: str) -> list[tuple[str, float]]:
    """Media ranges of an Accept value with their q values, best first.

    Parameters other than q (e.g. ``transfer-syntax``) are dropped; an unparseable
    q counts as 1 so a sloppy client is not refused for it.
    """
    ranges: list[tuple[str, float, int]] = []
    for index, part in enumerate(header.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        media = pieces[0].lower()
        if not media:
            continue
        q = 1.0
        for param in pieces[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 1.0
        ranges.append((media, q, index))
    ranges.sort(key=lambda r: (-r[1], r[2]))
    return [(media, q) for media, q, _ in ranges]


def choose_json_type(accept: str | None) -> str | None:
    """The JSON media type to answer with for an Accept value, or None (406).

    ``application/dicom+json`` unless the client names only ``application/json``.
    A missing or empty Accept means anything.
    """
    if not accept or not accept.strip():
        return DICOM_JSON
    ranges = parse_accept(accept)
    refused = {media for media, q in ranges if q <= 0}
    for media, q in ranges:
        if q <= 0:
            continue
        if media in (DICOM_JSON, JSON) and media not in refused:
            return media
        if media in ("*/*", "application/*"):
            for candidate in JSON_MEDIA_TYPES:
                if candidate not in refused:
                    return candidate
    return None
