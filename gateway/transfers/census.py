"""Census of a source PACS by C-FIND: which studies, series and how many instances.

The clinic's PACS is asked at STUDY level over a date range (Study Root, StudyDate
range matching). PACS cap the number of C-FIND results (often a few hundred), so a
range whose answer reaches the cap (or that the PACS refuses as too large, 0xA700,
or cancels) is split in halves and asked again, down to single days; a single day
still at the cap is split by Study Time ranges (halves, down to one minute). Each
study is then asked at SERIES level, and each series counted by Number of Series
Related Instances, or at IMAGE level (SOP Instance UIDs counted) when the PACS does
not give that count (or when asked to); a series whose IMAGE answer reaches the cap
is split by Content Time ranges the same way.

A PACS that ignores the time key answers the same instances for two disjoint time
ranges: the split stops there and the census warns that the cap may hide some. So
does a range still at the cap at one minute. Studies without a Study Date (or,
once a day is split, a Study Time; instances without a Content Time in a split
series) are not found by range matching; the census says so.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as _FIND

from gateway.config import Settings
from gateway.dimse.client import AssociationFailed, PeerClient
from gateway.peers import Peer
from gateway.transfers.expected import ExpectedLine

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
# Statuses that say "too many matches" in practice: out of resources, cancelled.
_TOO_MANY = (0xA700, 0xFE00)
_DAY_SECONDS = 24 * 3600
# The narrowest time range a split asks for (seconds).
_MIN_SPAN = 60


class CensusError(RuntimeError):
    """The source PACS could not be asked (association refused, query failed)."""


@dataclass
class Census:
    lines: list[ExpectedLine] = field(default_factory=list)
    studies: int = 0
    series: int = 0
    instances: int = 0
    queries: int = 0
    warnings: list[str] = field(default_factory=list)


class _Finder:
    """C-FIND over one association to the source, re-associating when it drops."""

    def __init__(self, settings: Settings, peer: Peer) -> None:
        self.client = PeerClient(settings, peer, [build_context(_FIND)])
        self.peer = peer
        self.queries = 0

    def find(self, query: Dataset) -> tuple[int, list[Dataset]]:
        """Final status and the identifiers answered."""
        for attempt in (1, 2):
            try:
                assoc = self.client.association()
            except AssociationFailed as exc:
                raise CensusError(f"cannot ask the source: {exc}") from exc
            found: list[Dataset] = []
            final: int | None = None
            self.queries += 1
            for status, identifier in assoc.send_c_find(query, _FIND):
                if not status:  # no answer: association dropped or timed out
                    break
                code = int(status.Status)
                if code in _PENDING:
                    if identifier is not None:
                        found.append(identifier)
                else:
                    final = code
            if final is not None:
                return final, found
            self.client.drop()
            if attempt == 2:
                raise CensusError(f"{self.peer.ae_title} stopped answering a C-FIND")
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _count(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def take_census(
    settings: Settings,
    peer: Peer,
    date_from: dt.date,
    date_to: dt.date,
    *,
    cap: int | None = None,
    image_level: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Census:
    if date_to < date_from:
        raise CensusError("the census range ends before it starts")
    cap = cap or settings.census_max_results
    finder = _Finder(settings, peer)
    census = Census()
    say = progress or (lambda _msg: None)
    try:
        studies = _studies(finder, date_from, date_to, cap, census, say)
        for study in studies:
            _series_of(finder, study, cap, image_level, census)
        census.studies = len(studies)
    finally:
        finder.close()
    census.queries = finder.queries
    census.warnings.append(
        "studies without a Study Date are not found by date range matching; "
        "list them in a manifest if the source holds any"
    )
    return census


def _studies(
    finder: _Finder,
    date_from: dt.date,
    date_to: dt.date,
    cap: int,
    census: Census,
    say: Callable[[str], None],
) -> list[Dataset]:
    found: dict[str, Dataset] = {}
    ranges = [(date_from, date_to)]
    while ranges:
        start, end = ranges.pop()
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.StudyDate = f"{start:%Y%m%d}-{end:%Y%m%d}" if start != end else f"{start:%Y%m%d}"
        q.PatientID = ""
        q.NumberOfStudyRelatedInstances = ""
        status, answers = finder.find(q)
        too_many = _too_many(status, answers, cap)
        if too_many and start < end:
            mid = start + (end - start) // 2
            ranges += [(mid + dt.timedelta(days=1), end), (start, mid)]
            continue
        if status not in (0x0000,) and not too_many:
            raise CensusError(f"C-FIND for studies {q.StudyDate} failed with status 0x{status:04X}")
        if too_many:
            day = f"{start:%Y-%m-%d}"
            answers = _split_by_time(
                finder, q, "StudyTime", "StudyInstanceUID", cap, census, day, answers
            )
            census.warnings.append(
                f"{start:%Y-%m-%d}: split by Study Time ({len(answers)} studies); studies of "
                "that day without a Study Time are not found that way"
            )
        for ds in answers:
            uid = _text(ds, "StudyInstanceUID")
            if uid:
                found.setdefault(uid, ds)
        say(f"{q.StudyDate}: {len(answers)} studies")
    return sorted(
        found.values(), key=lambda d: (_text(d, "StudyDate"), _text(d, "StudyInstanceUID"))
    )


def _series_of(
    finder: _Finder, study: Dataset, cap: int, image_level: bool, census: Census
) -> None:
    study_uid = _text(study, "StudyInstanceUID")
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.NumberOfSeriesRelatedInstances = ""
    status, answers = finder.find(q)
    if status != 0x0000:
        raise CensusError(f"C-FIND for the series of {study_uid} failed: 0x{status:04X}")
    if len(answers) >= cap:
        census.warnings.append(f"study {study_uid}: series answer reached the cap {cap}")
    common = {
        "patient_id": _text(study, "PatientID")[:64],
        "study_date": _text(study, "StudyDate")[:8],
    }
    if not answers:
        count = _count(study, "NumberOfStudyRelatedInstances")
        census.lines.append(ExpectedLine(study_uid=study_uid, instances=count, **common))
        census.instances += count or 0
        return
    for series in answers:
        series_uid = _text(series, "SeriesInstanceUID")
        if not series_uid:
            continue
        count = None if image_level else _count(series, "NumberOfSeriesRelatedInstances")
        if count is None:
            count = _image_count(finder, study_uid, series_uid, cap, census)
        census.lines.append(
            ExpectedLine(
                study_uid=study_uid,
                series_uid=series_uid,
                instances=count,
                modality=_text(series, "Modality")[:16],
                **common,
            )
        )
        census.series += 1
        census.instances += count


def _image_count(finder: _Finder, study_uid: str, series_uid: str, cap: int, census: Census) -> int:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    q.SOPInstanceUID = ""
    status, answers = finder.find(q)
    too_many = _too_many(status, answers, cap)
    if status != 0x0000 and not too_many:
        raise CensusError(f"C-FIND for the instances of {series_uid} failed: 0x{status:04X}")
    if too_many:
        q.ContentTime = ""
        answers = _split_by_time(
            finder, q, "ContentTime", "SOPInstanceUID", cap, census, f"series {series_uid}", answers
        )
        census.warnings.append(
            f"series {series_uid}: split by Content Time ({len(answers)} instances); "
            "instances without a Content Time are not found that way"
        )
    return len({_text(a, "SOPInstanceUID") for a in answers if _text(a, "SOPInstanceUID")})


def _too_many(status: int, answers: list[Dataset], cap: int) -> bool:
    return status in _TOO_MANY or len(answers) >= cap


def _time(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def _split_by_time(
    finder: _Finder,
    base: Dataset,
    keyword: str,
    uid_keyword: str,
    cap: int,
    census: Census,
    label: str,
    whole: list[Dataset],
    start: int = 0,
    end: int = _DAY_SECONDS - 1,
) -> list[Dataset]:
    """The answers to ``base`` asked over halves of the time range [start, end] of
    ``keyword`` (a TM key), halving again where an answer still reaches the cap.
    ``whole`` is the answer without the time key, kept when the source refuses or
    ignores the key."""
    mid = (start + end) // 2
    halves = []
    for low, high in ((start, mid), (mid + 1, end)):
        q = deepcopy(base)
        setattr(q, keyword, f"{_time(low)}-{_time(high)}")
        status, answers = finder.find(q)
        too_many = _too_many(status, answers, cap)
        if status != 0x0000 and not too_many:
            census.warnings.append(
                f"{label}: the source refused {keyword} ranges (0x{status:04X}); it may hold "
                f"more than the {len(whole)} answered (cap {cap})"
            )
            return whole
        halves.append((low, high, too_many, answers))
    uids = [{_text(a, uid_keyword) for a in h[3]} - {""} for h in halves]
    if uids[0] and uids[0] == uids[1]:
        # Two disjoint ranges cannot match the same entities: the key is ignored.
        census.warnings.append(
            f"{label}: the source ignores {keyword} ranges; it may hold more than the "
            f"{len(whole)} answered (cap {cap})"
        )
        return whole
    found: list[Dataset] = []
    for low, high, too_many, answers in halves:
        if too_many and high - low + 1 > _MIN_SPAN:
            found += _split_by_time(
                finder, base, keyword, uid_keyword, cap, census, label, answers, low, high
            )
            continue
        if too_many:
            census.warnings.append(
                f"{label} {_time(low)}-{_time(high)}: {len(answers)} answered (cap {cap}); "
                "may hold more"
            )
        found += answers
    return found
