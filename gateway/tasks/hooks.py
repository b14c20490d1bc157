"""The post-ingest hook: each stored instance nudges its series' derived work.

Attached by serving processes (``Archive.open(settings, post_ingest=True)``): every
instance stored touches its series in a ``Coalescer``; when the series' arrivals
pause, one ``studybridge.prepare_series`` task is submitted for it. The hook runs
on the ingest path, so it only records the arrival and returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.tasks.derived import PREPARE_SERIES
from gateway.tasks.dispatch import Coalescer, Dispatcher

if TYPE_CHECKING:
    from gateway.archive.ingest import IngestResult
    from gateway.config import Settings


class PostIngest:
    """Coalesces stored instances per series into one prepare task each."""

    def __init__(self, dispatcher: Dispatcher, settings: Settings) -> None:
        self.coalescer = Coalescer(
            dispatcher.submit, settings.task_series_pause, settings.task_series_max_wait
        )

    def __call__(self, result: IngestResult) -> None:
        self.coalescer.touch(
            result.series_uid,
            PREPARE_SERIES,
            study_uid=result.study_uid,
            series_uid=result.series_uid,
        )

    def close(self, *, flush: bool) -> None:
        self.coalescer.close(flush=flush)
