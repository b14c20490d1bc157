"""Process-wide library settings for serving processes (DIMSE receivers, HTTP).

pydicom validates every value it reads or sets. On our hot paths (command sets,
file meta, query answers built per result) that costs more than the work itself,
and the values that matter are validated by the archive (``uids.check_uid``,
``part10``); so serving processes switch it off once at start.
"""

from __future__ import annotations

import pydicom.config


def configure_serving_process() -> None:
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
