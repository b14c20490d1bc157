"""DICOM JSON metadata of stored instances (PS3.18 F.2), and its series-level cache.

``instance_metadata`` turns one stored instance into its DICOM JSON object without
reading its pixel data: pixel data and every large binary value (OB, OD, OF, OL, OV,
OW, UN longer than ``threshold`` bytes) become a ``BulkDataURI``. The URIs are
written relative to a placeholder (``BASE``) which the door replaces with its own
absolute address (``bind_base``), so one cached copy serves every host name.

Series metadata is prepared once and kept beside the instances as a derived,
rebuildable artifact: gzipped JSON under
``metadata/<study>/<series>/<count>-<max instance id>.json.gz``. The key carries a
cheap marker of the series' content (its number of instances and newest instance
row), so an instance arriving later makes the old copy unreachable; it is rebuilt
on the next request (``series_metadata``) or by whoever calls
``build_series_metadata`` when the series' arrivals pause. Until it exists, metadata
is built on the fly.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from gateway.archive.blobstore import BlobStore
from gateway.archive.db import Database
from gateway.archive.errors import InvalidDataset, NotFound
from gateway.archive.frames import FrameReader
from gateway.archive.models import Instance, Series, Study
from gateway.archive.query import Level
from gateway.archive.retrieve import RetrieveRequest, StoredInstance, find_instances
from gateway.archive.uids import check_uid

log = logging.getLogger(__name__)

# Placeholder for the absolute base address of the DICOMweb service (scheme, host,
# prefix) in cached metadata; replaced when a response is made.
BASE = "@@studybridge-base@@/"
DEFAULT_THRESHOLD = 1024
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
AVAILABLE_TRANSFER_SYNTAX = "00083002"
_UNDEFINED = 0xFFFFFFFF


def bulk_path(inst: StoredInstance, tag_path: str) -> str:
    """Resource path (below the DICOMweb base) of a bulk data value of ``inst``."""
    return (
        f"studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
        f"/bulk/{tag_path}"
    )


def instance_metadata(
    store: BlobStore, inst: StoredInstance, threshold: int = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """The DICOM JSON object of one stored instance (pixel data as a BulkDataURI)."""
    reader = FrameReader(store, inst)
    header = reader.header
    out = _dataset_json(header, inst, "", threshold)
    if reader.pixel_tag is not None:
        tag = f"{reader.pixel_tag:08X}"
        out[tag] = {"vr": reader.pixel_vr, "BulkDataURI": BASE + bulk_path(inst, tag)}
    out.setdefault(AVAILABLE_TRANSFER_SYNTAX, {"vr": "UI", "Value": [inst.transfer_syntax_uid]})
    return dict(sorted(out.items()))


def _dataset_json(ds: Dataset, inst: StoredInstance, prefix: str, threshold: int) -> dict:
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating ds would decode every element
        if tag.element == 0 or tag.group == 0x0002 or tag in PIXEL_TAGS:
            continue  # group lengths, file meta; pixel data is added by the caller
        key = f"{tag:08X}"
        raw = ds.get_item(tag)
        vr, length = _vr_and_length(raw, tag)
        if vr == "SQ":
            out[key] = _sequence_json(ds, tag, inst, prefix + key, threshold)
            continue
        if _is_bulk(vr, length, threshold):
            out[key] = {
                "vr": vr if vr in BULK_VRS else "OB" if vr.startswith("OB") else "OW",
                "BulkDataURI": BASE + bulk_path(inst, prefix + key),
            }
            continue
        try:
            elem = ds[tag]
            if elem.VR == "SQ":
                out[key] = _sequence_json(ds, tag, inst, prefix + key, threshold)
                continue
            out[key] = elem.to_json_dict(None, 2**31)
        except Exception as exc:  # a malformed value: keep the attribute, without value
            log.debug("metadata: %s of %s not converted: %s", key, inst.sop_uid, exc)
            out[key] = {"vr": vr if len(vr) == 2 else "UN"}
    return out


def _sequence_json(ds: Dataset, tag: Any, inst: StoredInstance, path: str, threshold: int) -> dict:
    try:
        items = ds[tag].value
    except Exception as exc:
        log.debug("metadata: sequence %08X of %s not parsed: %s", tag, inst.sop_uid, exc)
        return {"vr": "SQ"}
    if not items:
        return {"vr": "SQ"}
    return {
        "vr": "SQ",
        "Value": [
            _dataset_json(item, inst, f"{path}/{index}/", threshold)
            for index, item in enumerate(items)
        ],
    }


def _vr_and_length(raw: Any, tag: Any) -> tuple[str, int]:
    if isinstance(raw, RawDataElement):
        vr = raw.VR
        length = raw.length
        if vr is None:
            try:
                vr = str(dictionary_VR(tag))
            except KeyError:
                vr = "UN"
        return str(vr), int(length)
    value = raw.value
    length = len(value) if isinstance(value, bytes | bytearray) else 0
    return str(raw.VR), length


def _is_bulk(vr: str, length: int, threshold: int) -> bool:
    if length == _UNDEFINED or length <= threshold:
        return False
    return vr in BULK_VRS or vr in ("OB or OW", "US or OW", "OB/OW", "US/OW")


def bind_base(data: bytes, base: str) -> bytes:
    """Metadata JSON with the BulkDataURI placeholder replaced by ``base`` (no slash at
    the end, e.g. ``https://host/dicom-web``)."""
    escaped = json.dumps(base.rstrip("/"))[1:-1].encode()
    return data.replace(b'"' + BASE.encode(), b'"' + escaped + b"/")


def dumps(objects: list[dict[str, Any]]) -> bytes:
    return json.dumps(objects, separators=(",", ":"), ensure_ascii=False).encode()


# -- series cache ----------------------------------------------------------------------
def series_marker(db: Database, study_uid: str, series_uid: str) -> tuple[int, int]:
    """(number of instances, newest instance row id) of a series: NotFound if none."""
    stmt = (
        select(func.count(Instance.id), func.max(Instance.id))
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .where(Series.series_uid == series_uid, Study.study_uid == study_uid)
    )
    with db.reading() as session:
        count, newest = session.execute(stmt).one()
    if not count:
        raise NotFound(f"no such series: {series_uid}")
    return int(count), int(newest)


def cache_key(study_uid: str, series_uid: str, marker: tuple[int, int]) -> str:
    study_uid = check_uid(study_uid, "Study Instance UID")
    series_uid = check_uid(series_uid, "Series Instance UID")
    return f"metadata/{study_uid}/{series_uid}/{marker[0]}-{marker[1]}.json.gz"


def build_series_metadata(
    db: Database,
    store: BlobStore,
    scratch_dir: Path,
    study_uid: str,
    series_uid: str,
    *,
    threshold: int = DEFAULT_THRESHOLD,
) -> bytes:
    """Build the series' metadata, keep it in the blob store, and return the JSON.

    What a background task calls once a series' arrivals pause; a request calls it
    (through ``series_metadata``) when no current copy exists.
    """
    marker = series_marker(db, study_uid, series_uid)
    instances = find_instances(
        db,
        RetrieveRequest(Level.SERIES, study_uids=[study_uid], series_uids=[series_uid]),
        require=True,
    )
    data = dumps([instance_metadata(store, inst, threshold) for inst in instances])
    # The marker read before listing: an instance arriving meanwhile makes this copy
    # stale at once rather than letting a copy without it look current.
    _keep(store, scratch_dir, cache_key(study_uid, series_uid, marker), data)
    return data


def series_metadata(
    db: Database,
    store: BlobStore,
    scratch_dir: Path,
    study_uid: str,
    series_uid: str,
    *,
    threshold: int = DEFAULT_THRESHOLD,
) -> bytes:
    """The series' metadata JSON (placeholders unbound): cached copy, else built now."""
    marker = series_marker(db, study_uid, series_uid)
    key = cache_key(study_uid, series_uid, marker)
    if store.exists(key):
        try:
            with store.open(key) as fh:
                return gzip.decompress(fh.read())
        except (OSError, EOFError, NotFound) as exc:
            log.warning("series metadata cache %s unreadable, rebuilding: %s", key, exc)
    return build_series_metadata(db, store, scratch_dir, study_uid, series_uid, threshold=threshold)


def study_series(db: Database, study_uid: str) -> list[str]:
    """Series Instance UIDs of a study in series order (NotFound if it has none)."""
    stmt = (
        select(Series.series_uid)
        .join(Study, Series.study_fk == Study.id)
        .where(Study.study_uid == study_uid)
        .where(select(Instance.id).where(Instance.series_fk == Series.id).exists())
        .order_by(Series.series_number, Series.id)
    )
    with db.reading() as session:
        found = [row[0] for row in session.execute(stmt)]
    if not found:
        raise NotFound(f"no such study: {study_uid}")
    return found


def iter_study_metadata(
    db: Database,
    store: BlobStore,
    scratch_dir: Path,
    study_uid: str,
    *,
    series_uids: list[str] | None = None,
    threshold: int = DEFAULT_THRESHOLD,
) -> Iterator[bytes]:
    """The study's metadata JSON array, series by series (each from its cache)."""
    series = series_uids if series_uids is not None else study_series(db, study_uid)
    yield b"["
    first = True
    for series_uid in series:
        try:
            data = series_metadata(
                db, store, scratch_dir, study_uid, series_uid, threshold=threshold
            )
        except NotFound:
            continue  # the series lost its instances meanwhile
        inner = data.strip()[1:-1].strip()
        if not inner:
            continue
        if not first:
            yield b","
        first = False
        yield inner
    yield b"]"


def _keep(store: BlobStore, scratch_dir: Path, key: str, data: bytes) -> None:
    """Store ``data`` gzipped under ``key``, then drop older copies of the series."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=scratch_dir, suffix=".json.gz")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        ):
            gz.write(data)
        store.put_file(key, Path(name), move=True)
    except Exception as exc:  # a cache that cannot be written is rebuilt next time
        log.warning("series metadata not cached (%s): %s", key, exc)
        return
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    folder = key.rsplit("/", 1)[0] + "/"
    try:
        for old in store.iter_keys(folder):
            if old != key:
                store.delete(old)
    except (OSError, ValueError, InvalidDataset) as exc:
        log.debug("old metadata copies under %s not removed: %s", folder, exc)
