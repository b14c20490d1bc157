"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

Each route turns its query parameters into a ``Query`` for the one query engine
(``gateway.archive.query``, the same one C-FIND uses) and answers a DICOM JSON
array. What is accepted and how it is answered:

- matching keys by keyword or tag (``PatientID=...`` or ``00100020=...``) with the
  engine's rules: single value, ``*``/``?`` wildcards, UID lists (comma or
  backslash separated), date/time ranges, universal matching; person names are
  always matched case- and accent-insensitively, so ``fuzzymatching=true`` and
  ``false`` behave alike (PS3.4 C.2.2.2.1 permits it; the conformance statement
  says so);
- ``includefield`` (repeatable, comma separated, keywords or tags, ``all``);
  attributes of a lower level are not returned (PS3.18 10.6.3.3); attributes the
  index does not hold are named in a ``Warning`` header;
- ``limit``/``offset``: default and cap from settings; a page with more results
  behind it carries ``Warning: 299 ... "The number of results exceeded ..."``;
- ``emptyvaluematching=true|false``; ``accept``/``charset`` as in PS3.18 8.3.3;
- anything else is refused with 400 naming it, as are unknown attributes, keys
  the index cannot match, nested (sequence) keys, bad UIDs, dates and ranges;
- 200 with the results, 204 with no body when nothing matches (PS3.18 Table
  10.6.3-1; dicomweb-client in Python and JavaScript, hence OHIF, read 204 as an
  empty list); 406 when the Accept header admits no JSON.

Each result carries the attributes PS3.18 Tables 10.6.3-3/-4/-5 require (those the
index holds), the keys and included fields, Instance Availability, and a Retrieve
URL (0008,1190) to its WADO-RS resource built from the request's base URL
(``X-Forwarded-Proto`` is applied by uvicorn's proxy headers, ``X-Forwarded-Host``
here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomweb import dicomjson
from dicomweb.access import search_scope
from dicomweb.deps import get_archive, requested_accept
from dicomweb.errors import HTTPError
from dicomweb.urls import service_url
from gateway.archive import Archive, Level, Query
from gateway.archive.errors import InvalidQuery
from gateway.archive.query import attribute_level, is_supported, supported_keywords
from gateway.archive.uids import is_valid_uid

router = APIRouter()

# Required return attributes (PS3.18 Tables 10.6.3-3, -4, -5) that the index holds,
# plus Study Description and Issuer of Patient ID (patients are keyed by issuer and
# ID here) at the study level. Not held, hence not returned: Timezone Offset From
# UTC and Request Attributes Sequence (both "if known").
STUDY_FIELDS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_FIELDS = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_FIELDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

# Query parameters other than matching keys.
CONTROL_PARAMETERS = (
    "includefield",
    "fuzzymatching",
    "limit",
    "offset",
    "emptyvaluematching",
    "accept",
    "charset",
)

_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_UINT_RE = re.compile(r"^\d{1,9}$")
_BOOLEAN = {"true": True, "false": False}
_MORE_RESULTS = (
    '"The number of results exceeded the maximum supported by the server. '
    'Additional results can be requested."'
)


@dataclass
class Search:
    """One QIDO-RS request, parsed."""

    level: Level
    # Which levels' required attributes to return (the target resource's and above).
    field_levels: tuple[Level, ...]
    keys: dict[str, str] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    limit: int = 0
    offset: int = 0
    capped: bool = False
    empty_value_matching: bool = False
    warnings: list[str] = field(default_factory=list)


# -- routes ----------------------------------------------------------------------------
@router.get("/studies", summary="Search for studies")
def search_studies(request: Request, archive: Archive = Depends(get_archive)) -> Response:
    return _search(request, archive, Level.STUDY, (Level.STUDY,))


@router.get("/series", summary="Search for series (all studies)")
def search_series(request: Request, archive: Archive = Depends(get_archive)) -> Response:
    return _search(request, archive, Level.SERIES, (Level.STUDY, Level.SERIES))


@router.get("/instances", summary="Search for instances (all studies)")
def search_instances(request: Request, archive: Archive = Depends(get_archive)) -> Response:
    levels = (Level.STUDY, Level.SERIES, Level.IMAGE)
    return _search(request, archive, Level.IMAGE, levels)


@router.get("/studies/{study}/series", summary="Search for series of a study")
def search_study_series(
    study: str, request: Request, archive: Archive = Depends(get_archive)
) -> Response:
    fixed = {"StudyInstanceUID": _path_uid(study, "Study Instance UID")}
    return _search(request, archive, Level.SERIES, (Level.SERIES,), fixed)


@router.get("/studies/{study}/instances", summary="Search for instances of a study")
def search_study_instances(
    study: str, request: Request, archive: Archive = Depends(get_archive)
) -> Response:
    fixed = {"StudyInstanceUID": _path_uid(study, "Study Instance UID")}
    return _search(request, archive, Level.IMAGE, (Level.SERIES, Level.IMAGE), fixed)


@router.get(
    "/studies/{study}/series/{series}/instances", summary="Search for instances of a series"
)
def search_series_instances(
    study: str, series: str, request: Request, archive: Archive = Depends(get_archive)
) -> Response:
    fixed = {
        "StudyInstanceUID": _path_uid(study, "Study Instance UID"),
        "SeriesInstanceUID": _path_uid(series, "Series Instance UID"),
    }
    return _search(request, archive, Level.IMAGE, (Level.IMAGE,), fixed)


# -- the one search --------------------------------------------------------------------
def _search(
    request: Request,
    archive: Archive,
    level: Level,
    field_levels: tuple[Level, ...],
    fixed: dict[str, str] | None = None,
) -> Response:
    params = request.query_params
    media_type = _negotiate(request)
    settings = archive.settings
    search = parse_search(
        params.multi_items(),
        level,
        field_levels,
        fixed or {},
        default_limit=settings.qido_default_limit,
        max_limit=settings.qido_max_limit,
    )
    query = Query(
        level=level,
        keys=search.keys,
        include=search.include,
        limit=search.limit,
        offset=search.offset,
        strict_levels=True,
        empty_value_matching=search.empty_value_matching,
        # Only what this principal may see, inside the query (paging and counts too).
        study_scope=search_scope(request),
    )
    result = archive.query(query)
    base = service_url(request, settings)
    headers = _warning_headers(base, search, result.truncated)
    if not result.rows:
        response = Response(status_code=204)
    else:
        body = dicomjson.encode_matches(
            result.keys,
            result.rows,
            [("RetrieveURL", lambda values: retrieve_url(base, level, values))],
        )
        response = Response(body, media_type=media_type)
    for value in headers:
        response.headers.append("Warning", value)
    # The body depends on Accept, and its Retrieve URLs on the forwarded host/scheme.
    response.headers["Vary"] = "Accept, X-Forwarded-Host, X-Forwarded-Proto"
    return response


def parse_search(
    items: list[tuple[str, str]],
    level: Level,
    field_levels: tuple[Level, ...],
    fixed: dict[str, str],
    *,
    default_limit: int,
    max_limit: int,
) -> Search:
    """Query parameters -> ``Search``; raises 400 (``HTTPError``) naming what is wrong."""
    search = Search(level=level, field_levels=field_levels, keys=dict(fixed))
    seen_control: set[str] = set()
    include: list[str] = []
    limit: int | None = None
    for name, value in items:
        if name in CONTROL_PARAMETERS:
            if name != "includefield" and name in seen_control:
                raise _bad(f"query parameter {name} is given more than once")
            seen_control.add(name)
            if name == "includefield":
                include.extend(_include_fields(value, search))
            elif name == "fuzzymatching":
                _boolean(name, value)  # person names always match fuzzily (see above)
            elif name == "emptyvaluematching":
                search.empty_value_matching = _boolean(name, value)
            elif name == "limit":
                limit = _uint(name, value)
                if limit == 0:
                    raise _bad("query parameter limit must be at least 1")
            elif name == "offset":
                search.offset = _uint(name, value)
            # accept and charset were handled by content negotiation.
            continue
        keyword = _match_keyword(name)
        if keyword in fixed:
            raise _bad(f"{keyword} is given by the resource path; it cannot be a query key")
        vr = dictionary_VR(keyword)
        value = value.strip()
        if vr in ("UI", "CS"):
            # UID lists may be comma separated (PS3.18 8.3.4.1); CS values hold no comma.
            value = value.replace(",", "\\")
        if keyword in search.keys:
            if vr != "UI":
                raise _bad(f"{keyword} is given more than once")
            value = f"{search.keys[keyword]}\\{value}"
        search.keys[keyword] = value

    if search.include_all:
        include.extend(k for k in supported_keywords() if _level_ok(k, level))
    for lvl in field_levels:
        include.extend(_FIELDS[lvl])
    search.include = list(dict.fromkeys(include))

    if limit is None:
        search.limit = min(default_limit, max_limit)
    elif limit > max_limit:
        search.limit = max_limit
        search.capped = True
    else:
        search.limit = limit
    return search


_FIELDS = {Level.STUDY: STUDY_FIELDS, Level.SERIES: SERIES_FIELDS, Level.IMAGE: INSTANCE_FIELDS}
_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


def _level_ok(keyword: str, level: Level) -> bool:
    attr_level = attribute_level(keyword)
    return attr_level is not None and _DEPTH[attr_level] <= _DEPTH[level]


def _attribute(text: str, what: str) -> str | None:
    """A keyword for a tag or keyword; None for a private or unregistered tag."""
    text = text.strip()
    if "." in text:
        raise _bad(f"{what} {text[:80]!r}: attributes inside sequences are not supported")
    if _TAG_RE.match(text):
        tag = int(text, 16)
        keyword = keyword_for_tag(tag)
        if keyword:
            return keyword
        if (tag >> 16) % 2 == 1:
            return None  # private: not supported
        raise _bad(f"{what} {text!r} is not a DICOM attribute tag")
    if tag_for_keyword(text) is None:
        raise _bad(f"{what} {text[:80]!r} is not a DICOM attribute keyword or tag")
    return text


def _match_keyword(name: str) -> str:
    if name[:1].islower() and "." not in name and not _TAG_RE.match(name):
        # Keywords are CamelCase: a lower-case name is meant as a query parameter.
        raise _bad(
            f"unsupported query parameter {name[:80]!r} "
            f"(supported: {', '.join(CONTROL_PARAMETERS)} and attribute keys)"
        )
    keyword = _attribute(name, "query parameter")
    if keyword is None:
        raise _bad(f"matching on the private attribute {name} is not supported")
    if not is_supported(keyword):
        label = f"{keyword} ({name})" if name != keyword else f"{keyword} ({_tag_text(keyword)})"
        raise _bad(f"matching on {label} is not supported")
    return keyword


def _include_fields(value: str, search: Search) -> list[str]:
    out = []
    for text in value.split(","):
        text = text.strip()
        if not text:
            raise _bad("includefield has an empty value")
        if text == "all":
            search.include_all = True
            continue
        keyword = _attribute(text, "includefield")
        if keyword is None or not is_supported(keyword):
            search.warnings.append(f"includefield {text} is not supported and is not returned")
            continue
        out.append(keyword)
    return out


def _tag_text(keyword: str) -> str:
    tag = tag_for_keyword(keyword) or 0
    return f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


def _boolean(name: str, value: str) -> bool:
    try:
        return _BOOLEAN[value.strip().lower()]
    except KeyError:
        raise _bad(f"query parameter {name} must be true or false, not {value[:40]!r}") from None


def _uint(name: str, value: str) -> int:
    if not _UINT_RE.match(value.strip()):
        raise _bad(f"query parameter {name} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def _path_uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise InvalidQuery(f"{what} in the path is not a valid UID: {value[:70]!r}")
    return value


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message, reason="invalid-query")


# -- content negotiation ---------------------------------------------------------------
def _negotiate(request: Request) -> str:
    """The response media type (``accept`` query parameter first, then Accept)."""
    accept = requested_accept(request)
    media_type = dicomjson.choose_json_type(accept)
    if media_type is None:
        raise HTTPError(
            406,
            f"search results are available as {dicomjson.DICOM_JSON} or "
            f"{dicomjson.JSON}, not {str(accept)[:120]!r}",
            reason="not-acceptable",
        )
    charset = request.query_params.get("charset")
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8", "*"):
        raise HTTPError(
            406, f"search results are encoded in UTF-8, not {charset[:40]!r}", "not-acceptable"
        )
    return media_type


# -- URLs and headers ------------------------------------------------------------------
def retrieve_url(base: str, level: Level, values: Mapping[str, Any]) -> str:
    """The WADO-RS URL of a match, from its UIDs (keyword -> value)."""
    url = f"{base}/studies/{values.get('StudyInstanceUID') or ''}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{values.get('SeriesInstanceUID') or ''}"
    if level is Level.IMAGE:
        url += f"/instances/{values.get('SOPInstanceUID') or ''}"
    return url


def _warning_headers(base: str, search: Search, truncated: bool) -> list[str]:
    agent = urlsplit(base).netloc or "-"
    warnings = []
    if truncated:
        warnings.append(f"299 {agent}: {_MORE_RESULTS}")
    for text in search.warnings:
        warnings.append(f'299 {agent}: "{text}"')
    return warnings


def _own_keywords(level: Level) -> list[str]:
    """Keywords the index matches at ``level`` (patient attributes count as study's)."""
    levels = {Level.PATIENT, Level.STUDY} if level is Level.STUDY else {level}
    return [k for k in supported_keywords() if attribute_level(k) in levels]


def capabilities(settings: object) -> dict[str, object]:
    """What QIDO-RS supports, for the service root's capability description."""
    return {
        "resources": [
            "/studies",
            "/series",
            "/instances",
            "/studies/{study}/series",
            "/studies/{study}/instances",
            "/studies/{study}/series/{series}/instances",
        ],
        "media_types": list(dicomjson.JSON_MEDIA_TYPES),
        "query_parameters": [*CONTROL_PARAMETERS, "{attribute}"],
        "matching": {
            "attributes": {
                "study": _own_keywords(Level.STUDY),
                "series": _own_keywords(Level.SERIES),
                "instance": _own_keywords(Level.IMAGE),
            },
            "kinds": [
                "single value",
                "wildcard (* ?)",
                "UID list (comma or backslash)",
                "date and time range",
                "universal",
                "empty value (emptyvaluematching=true)",
            ],
            "fuzzymatching": "person names always match case- and accent-insensitively",
            "sequence_matching": False,
        },
        "default_limit": getattr(settings, "qido_default_limit", None),
        "max_limit": getattr(settings, "qido_max_limit", None),
        "no_match_status": 204,
        "default_fields": {
            "study": list(STUDY_FIELDS),
            "series": list(SERIES_FIELDS),
            "instance": list(INSTANCE_FIELDS),
        },
    }
