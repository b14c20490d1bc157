"""Process-wide settings for serving processes (DIMSE receivers, HTTP).

pydicom validates every value it reads or sets. On our hot paths (command sets,
file meta, query answers built per result) that costs more than the work itself,
and the values that matter are validated by the archive (``uids.check_uid``,
``part10``); so serving processes switch it off once at start.

Python's cyclic garbage collector runs after every 700 net allocations of container
objects, and its older generations walk the whole heap of a serving process (some
170,000 objects of pydicom's dictionaries, SQLAlchemy's mappings and FastAPI's
routes). A QIDO-RS page of 100 studies allocates tens of thousands of small dicts
and lists, so the collector took 70% of encoding it (4.2 ms, 1.2 ms with the
threshold below). Our objects are freed by reference counting; cycles are rare. So
serving processes collect less often, and once started they move everything they
built at start out of the collector's sight (``gc.freeze``).
"""

from __future__ import annotations

import gc

import pydicom.config

# Net allocations of container objects between two collections of the youngest
# generation (CPython's default: 700).
GC_GEN0_THRESHOLD = 10_000


def configure_serving_process() -> None:
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def freeze_startup_heap() -> None:
    """Once a serving process has imported and built what it serves with: collect
    once, then keep those objects out of every later collection."""
    gc.collect()
    gc.freeze()
