"""DICOM JSON (PS3.18 F.2): data sets as ``application/dicom+json`` bodies.

Values held by the archive are Unicode already (decoded with each instance's
Specific Character Set at ingest), so encoding is pydicom's ``Dataset.to_json_dict``
and UTF-8. Person names come out as ``{"Alphabetic": ..., "Ideographic": ...,
"Phonetic": ...}`` objects (only the groups present), empty attributes as
``{"vr": ...}`` without ``Value``. Shared by QIDO-RS and any route answering DICOM
JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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


def dumps(value: Any) -> bytes:
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
