"""How fast does studybridge answer DICOMweb (QIDO-RS, WADO-RS), against Orthanc?

What it measures
----------------
For each target (studybridge on SQLite, studybridge on PostgreSQL, and Orthanc with
its DICOMweb plugin when installed), in one run on this machine:

1. Index. N synthetic studies (``--studies``, default 10,000) are loaded, one series
   of one tiny instance (8x8 pixels) each, with varied Patient ID (about two studies
   per patient), Patient Name (about a third 'KIM^...'; Korean names carry Hangul and
   Hanja groups, half of them in ISO 2022 IR 149, the rest UTF-8), Study Date over
   2015-2024 and Modality among CT/MR/CR/US. Two loaders (``--loader``):

   - ``ingest``: every instance goes through the real ``Archive.ingest_file``
     (validation, SHA-256, blob written and fsynced, index committed), from
     ``--load-threads`` threads like concurrent receivers. The default up to
     20,000 studies.
   - ``sql``: rows for patients/studies/series/instances inserted in batches with
     SQLAlchemy Core into the same tables, the column values computed by the real
     ``gateway.archive.attributes.extract``. No blob is written (QIDO reads only the
     index; WADO is measured on the CT study below, which is always ingested). The
     default above 20,000 studies (100,000 through full ingest takes too long here).

   Orthanc gets the first ``--orthanc-studies`` (default min(N, 10,000)) of the same
   instances through its REST API (``POST /instances``); its counts are printed.
2. QIDO-RS latency: ``--repeat`` (default 50) requests per query over one keep-alive
   connection (httpx) after ``--warmup`` unmeasured ones; p50 and p95 of the wall
   time until the whole body is read. Queries: by PatientID, by a one-month
   StudyDate range with ModalitiesInStudy=CT and limit=100, PatientName=KIM* with
   limit=100, /studies?limit=100, and the series and instances of the CT study.
3. WADO-RS on one 250-slice CT study (512x512 16-bit, about 131 MB; generated as in
   bench/ingest.py and ingested through ``Archive.ingest_file``): the whole study as
   ``multipart/related; type="application/dicom"; transfer-syntax=*`` (checked once
   with httpx, then timed ``--stream-repeat`` times with curl, a C client that does
   not compete for the 2 cores as a Python client would), study metadata (the first
   call, which builds studybridge's series metadata cache, then cached), one frame
   and one instance (cycling through the 250 instances). While the study streams,
   the server process tree's VmRSS is sampled every 20 ms (``_common.RssWatch``).

4. With ``--big-study-slices N`` (2,000 slices: a 1 GB study), studybridge targets
   also get that study, retrieved once as stored with curl while the server's RSS
   is sampled: peak RSS growth while streaming 1 GB (target: flat).

JSON answers (QIDO, metadata) are requested with ``Accept-Encoding: identity`` from
every target, so the ratios compare the same work; Orthanc runs with
``HttpCompressionEnabled: false`` (its default since 1.12.2). studybridge's JSON
endpoints are measured a second time with ``Accept-Encoding: gzip`` (what browsers
send; studybridge then gzips JSON), and the target verdicts use the slower of the two.

Targets (from the issue, at 10,000 studies): QIDO p50 under 20 ms for every query;
study metadata under 30 ms; one frame under 10 ms; study retrieval at least Orthanc's
MB/s; flat RSS while streaming (growth under ``--rss-flat-mb``, default 50 MB, where
a server holding the study would grow by its 131 MB).

Usage
-----
    python bench/dicomweb.py [--studies 10000] [--targets sqlite,postgresql,orthanc]
                             [--install-orthanc] [--json out.json] [--keep]
                             [--backend production] [--scope institution|sender|none]

``--scope`` is whose access scope studybridge's queries run in (a real access token of
the bench institution's DICOMweb client): ``institution`` (default) when it sent one
study in 10 and holds consents of some other patients, ``sender`` when it sent every
study, ``none`` without a token (the demo principal: unscoped).

``--backend production`` replaces the sqlite and postgresql targets with one target on
PostgreSQL + SeaweedFS S3 + a Celery worker on Redis (bench/ingest.py's
ProductionBackend), and adds throughput with one and with two gateway processes on
the same index and bucket, and the ratio (see bench/README.md).

Everything listens and connects on 127.0.0.1 (Orthanc 1.10 has no listen-address
option: it binds all interfaces, refusing remote clients with RemoteAccessAllowed
false). Every process started is stopped at the end, also on Ctrl-C; the PostgreSQL
database created for the run (``sb_bench_<random>``) is dropped and the temp dir
removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

BENCH_DIR = Path(__file__).resolve().parent
# This file is named like the ``dicomweb`` package it measures: keep the bench folder
# (sys.path[0] when run as a script) behind the repository, so ``import dicomweb``
# finds the package, and ``_common`` and ``ingest`` are still found here.


def _bench_dir_last() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    sys.path.append(str(BENCH_DIR))


_bench_dir_last()
from _common import (  # noqa: E402
    LOOPBACK,
    MB,
    Processes,
    RssWatch,
    apt_install,
    free_port,
    load_average,
    log_tail,
    percentile,
    process_tree,
    wait_for_port,
)
from ingest import (  # noqa: E402
    DEFAULT_BROKER,
    ProductionBackend,
    cpu_model,
    git_head,
    make_ct_corpus,
)

_bench_dir_last()  # bench/ingest.py puts the bench folder first again

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
CURL = "/usr/bin/curl"
ALL_TARGETS = ("sqlite", "postgresql", "production", "orthanc")
# --backend production: one studybridge target on PostgreSQL + S3 + a Celery worker.
OURS = ("sqlite", "postgresql", "production")
PREFIX = "/dicom-web"
CT_SLICES = 250
SQL_LOADER_ABOVE = 20_000  # --loader auto: full ingest up to this many studies
START_TIMEOUT_S = 120.0
QIDO_TARGET_MS = 20.0
METADATA_TARGET_MS = 30.0
FRAME_TARGET_MS = 10.0
RSS_FLAT_MB = 50.0
TINY = 8  # rows and columns of the synthetic index instances
# Every synthetic and CT instance is sent by this institution, and the benchmark asks
# as its DICOMweb client (a real access token): queries run with the access scope an
# institution's viewer gets ("what it sent", a SQL condition inside each query).
BENCH_INSTITUTION = "studybridge bench"
# --scope institution: the bench institution sent one study in SCOPE_SHARE (the rest
# come from SCOPE_SHARE - 1 other hospitals) and holds a permit consent (all studies)
# of one patient in CONSENTS_PER, from patients of studies it did not send.
SCOPE_SHARE = 10
CONSENTS_PER = 1000
SCOPE_NOTES = {
    "institution": f"a DICOMweb client of an institution that sent 1 in {SCOPE_SHARE} studies "
    f"and holds permit consents of 1 in {CONSENTS_PER} other studies' patients",
    "sender": "a DICOMweb client of the institution that sent every study",
    "none": "no token (the demo principal: unscoped)",
}
# Credentials of the target being measured (one target at a time).
AUTH: dict[str, str] = {}

DICOM_JSON = "application/dicom+json"
ACCEPT_STUDY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_INSTANCE = ACCEPT_STUDY
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
# Fallbacks for a server that refuses transfer-syntax=* (the stored syntax is
# Explicit VR Little Endian, so these ask for the same bytes).
ACCEPT_STUDY_EXPLICIT = (
    f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'
)
ACCEPT_FRAME_PLAIN = 'multipart/related; type="application/octet-stream"'

# Reference figures the issue quotes: Orthanc 1.10 + DICOMweb plugin, 2 cores, 20,000 studies.
ISSUE_REFERENCE = {
    "qido_patient_id": "43-53 ms",
    "qido_date_ct": "144-196 ms",
    "qido_all": "~210 ms",
    "qido_series": "30 ms",
    "qido_instances": "250 ms",
    "qido_instances_all": "250 ms",
    "metadata_cached": "130 ms",
    "metadata_first": "130 ms",
    "frame": "14-16 ms",
    "instance": "14-16 ms",
    "study": "~170 ms, ~730 MB/s",
}


# --- synthetic index data ----------------------------------------------------------------

SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "US": UltrasoundImageStorage,
}
# Korean family names: romanised, Hanja, Hangul, weight. KIM dominates as it does in Korea.
KOREAN_FAMILIES = [
    ("KIM", "金", "김", 45),
    ("LEE", "李", "이", 15),
    ("PARK", "朴", "박", 10),
    ("CHOI", "崔", "최", 6),
    ("JUNG", "鄭", "정", 5),
    ("KANG", "姜", "강", 4),
    ("CHO", "趙", "조", 4),
    ("YOON", "尹", "윤", 4),
    ("JANG", "張", "장", 4),
    ("LIM", "林", "임", 3),
]
KOREAN_GIVEN = [
    ("MINJUN", "敏俊", "민준"),
    ("SEOYEON", "瑞姸", "서연"),
    ("JIHO", "智浩", "지호"),
    ("HAYUN", "夏潤", "하윤"),
    ("DOYUN", "道潤", "도윤"),
    ("SEOJUN", "瑞俊", "서준"),
    ("JIWOO", "智友", "지우"),
    ("SUBIN", "秀彬", "수빈"),
    ("YEJUN", "藝俊", "예준"),
    ("HAEUN", "夏恩", "하은"),
]
OTHER_FAMILIES = ["SMITH", "MÜLLER", "GARCIA", "NGUYEN", "DUBOIS", "ROSSI", "KIMBALL", "TANAKA"]
OTHER_GIVEN = ["ANNA", "JOHN", "MARIA", "LUCAS", "EMMA", "NOAH", "JOSÉ", "YUKI"]
FIRST_DAY = dt.date(2015, 1, 1)
DAYS = (dt.date(2024, 12, 31) - FIRST_DAY).days + 1
QUERY_MONTH = ("20200301", "20200331")


@dataclass(frozen=True)
class StudySpec:
    index: int
    patient: int
    date: str
    time: str
    modality: str


def make_specs(count: int, seed: int = 20240601) -> list[StudySpec]:
    """Deterministic study specs: ~2 studies per patient, dates over 2015-2024."""
    rng = random.Random(seed)
    patients = max(1, math.ceil(count / 2))
    specs = []
    for i in range(count):
        day = FIRST_DAY + dt.timedelta(days=rng.randrange(DAYS))
        seconds = rng.randrange(7 * 3600, 20 * 3600)
        specs.append(
            StudySpec(
                index=i,
                patient=rng.randrange(patients),
                date=day.strftime("%Y%m%d"),
                time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                modality=rng.choice(list(SOP_CLASSES)),
            )
        )
    return specs


def patient_id(patient: int) -> str:
    return f"SBP{patient:07d}"


def patient_attributes(patient: int) -> dict[str, Any]:
    """Name, character set, birth date and sex of a synthetic patient (deterministic)."""
    rng = random.Random(patient * 7919 + 17)
    if rng.random() < 0.8:
        fam = rng.choices(KOREAN_FAMILIES, weights=[f[3] for f in KOREAN_FAMILIES])[0]
        given = rng.choice(KOREAN_GIVEN)
        name = f"{fam[0]}^{given[0]}={fam[1]}^{given[1]}={fam[2]}^{given[2]}"
        charset: Any = ["", "ISO 2022 IR 149"] if rng.random() < 0.5 else "ISO_IR 192"
    else:
        name = f"{rng.choice(OTHER_FAMILIES)}^{rng.choice(OTHER_GIVEN)}"
        charset = "ISO_IR 192" if not name.isascii() else None
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(365 * 90))
    return {
        "name": name,
        "charset": charset,
        "birth": birth.strftime("%Y%m%d"),
        "sex": rng.choice("MF"),
    }


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["studybridge-bench-dicomweb", *map(str, parts)])


def study_uid(spec: StudySpec) -> str:
    return _uid(spec.index, "study")


def spec_dataset(spec: StudySpec, with_pixels: bool = True) -> Dataset:
    """One tiny instance (one series of one instance) of a synthetic study."""
    p = patient_attributes(spec.patient)
    ds = Dataset()
    if p["charset"]:
        ds.SpecificCharacterSet = p["charset"]
    sop_class = SOP_CLASSES[spec.modality]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(spec.index, "sop")
    ds.StudyInstanceUID = study_uid(spec)
    ds.SeriesInstanceUID = _uid(spec.index, "series")
    ds.PatientName = p["name"]
    ds.PatientID = patient_id(spec.patient)
    ds.PatientBirthDate = p["birth"]
    ds.PatientSex = p["sex"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = spec.time
    ds.AccessionNumber = f"A{spec.index:09d}"
    ds.StudyID = str(spec.index % 100000)
    ds.StudyDescription = f"{spec.modality} synthetic study"
    ds.ReferringPhysicianName = "PARK^JISOO" if spec.index % 3 else "LEE^HANA"
    ds.InstitutionName = "studybridge bench (synthetic)"
    ds.Modality = spec.modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{spec.modality} series"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = TINY
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if with_pixels:
        ds.PixelData = (np.arange(TINY * TINY, dtype="<u2") * (spec.index % 61)).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def spec_bytes(spec: StudySpec) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, spec_dataset(spec), enforce_file_format=True)
    return out.getvalue()


@dataclass
class Probe:
    """What the queries ask for, chosen from the synthetic data (and the CT study)."""

    patient_id: str
    month: tuple[str, str]
    ct_study: str
    ct_series: str
    ct_instances: list[str]


def source_of(spec: StudySpec, scope: str) -> str:
    """The institution recorded as the sender of a synthetic study."""
    if scope != "institution" or spec.index % SCOPE_SHARE == 0:
        return BENCH_INSTITUTION
    return f"bench other hospital {spec.index % SCOPE_SHARE}"


def choose_probe(specs: Sequence[StudySpec], orthanc_count: int, ct_files: list[Path]) -> Probe:
    """A patient that Orthanc's smaller load holds too, with a study the bench
    institution sent (so it is in every scope); the CT study's UIDs."""
    middle = min(len(specs), max(orthanc_count, 1)) // 2
    spec = specs[middle - middle % SCOPE_SHARE]
    sops = []
    for path in ct_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        sops.append(str(ds.SOPInstanceUID))
    head = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    return Probe(
        patient_id=patient_id(spec.patient),
        month=QUERY_MONTH,
        ct_study=str(head.StudyInstanceUID),
        ct_series=str(head.SeriesInstanceUID),
        ct_instances=sops,
    )


# --- loading studybridge -----------------------------------------------------------------


@dataclass
class LoadResult:
    loader: str
    studies: int
    seconds: float
    ct_seconds: float = 0.0
    note: str = ""

    @property
    def per_s(self) -> float:
        return self.studies / self.seconds if self.seconds else 0.0


def load_by_ingest(archive: Any, specs: Sequence[StudySpec], threads: int, scope: str) -> None:
    """Each tiny instance through the real Archive.ingest_file (the file is moved in)."""
    from gateway.archive import Outcome, Source

    sources = {
        name: Source(door="import", ae_title="BENCHLOAD", host=LOOPBACK, institution=name)
        for name in {source_of(s, scope) for s in specs}
    }
    staging = archive.settings.staging_dir
    staging.mkdir(parents=True, exist_ok=True)
    done = [0]
    lock = threading.Lock()
    started = time.monotonic()

    def one(spec: StudySpec) -> None:
        data = spec_bytes(spec)
        path = staging / f"bench-{spec.index}.dcm"
        path.write_bytes(data)
        result = archive.ingest_file(path, sources[source_of(spec, scope)], owned=True)
        if result.outcome is not Outcome.STORED:
            raise RuntimeError(f"study {spec.index}: {result.outcome}")
        with lock:
            done[0] += 1
            if done[0] % 2000 == 0:
                rate = done[0] / (time.monotonic() - started)
                print(f"    {done[0]}/{len(specs)} ingested ({rate:.0f}/s)", flush=True)

    run_all(threads, one, specs)


def run_all(threads: int, fn: Any, items: Sequence[Any]) -> None:
    """``fn`` over ``items`` on a thread pool; the first failure (or Ctrl-C) cancels the rest."""
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()  # re-raise the first failure
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_by_sql(archive: Any, specs: Sequence[StudySpec], scope: str, batch: int = 2000) -> None:
    """Bulk rows through SQLAlchemy Core into the index tables (no blobs).

    Column values come from the real attribute extraction of each synthetic data set,
    so they are what ingest would have indexed; blob_key names a blob that does not
    exist (QIDO never reads blobs).
    """
    from sqlalchemy import insert

    from gateway.archive.attributes import extract, text
    from gateway.archive.models import Instance, Patient, Series, Study, StudySource, utcnow

    patients_t, studies_t = Patient.__table__, Study.__table__
    sources_t = StudySource.__table__
    series_t, instances_t = Series.__table__, Instance.__table__
    issuer = archive.settings.default_issuer
    patient_rows: dict[int, int] = {}
    started = time.monotonic()
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        now = utcnow()
        datasets = [spec_dataset(s, with_pixels=False) for s in chunk]
        attrs = [extract(ds) for ds in datasets]
        with archive.db.write_conn() as conn:
            new = {}
            for spec, a, ds in zip(chunk, attrs, datasets, strict=True):
                if spec.patient not in patient_rows and spec.patient not in new:
                    new[spec.patient] = {
                        "issuer": issuer,
                        "patient_id": text(ds, "PatientID"),
                        "unidentified_study_uid": "",
                        "created_at": now,
                        **a.patient,
                    }
            if new:
                ids = conn.execute(
                    insert(patients_t).returning(patients_t.c.id, sort_by_parameter_order=True),
                    list(new.values()),
                ).scalars()
                patient_rows.update(zip(new, ids, strict=True))
            study_ids = conn.execute(
                insert(studies_t).returning(studies_t.c.id, sort_by_parameter_order=True),
                [
                    {
                        "study_uid": ds.StudyInstanceUID,
                        "patient_fk": patient_rows[s.patient],
                        "created_at": now,
                        **a.study,
                    }
                    for s, a, ds in zip(chunk, attrs, datasets, strict=True)
                ],
            ).scalars()
            study_ids = list(study_ids)
            # Each study's sender, as ingest records it (the access scope asks it).
            conn.execute(
                insert(sources_t),
                [
                    {"study_fk": sid, "institution": source_of(s, scope)}
                    for sid, s in zip(study_ids, chunk, strict=True)
                ],
            )
            series_ids = conn.execute(
                insert(series_t).returning(series_t.c.id, sort_by_parameter_order=True),
                [
                    {
                        "series_uid": ds.SeriesInstanceUID,
                        "study_fk": sid,
                        "created_at": now,
                        **a.series,
                    }
                    for sid, a, ds in zip(study_ids, attrs, datasets, strict=True)
                ],
            ).scalars()
            conn.execute(
                insert(instances_t),
                [
                    {
                        "sop_uid": ds.SOPInstanceUID,
                        "series_fk": se,
                        "sop_class_uid": ds.SOPClassUID,
                        "transfer_syntax_uid": ExplicitVRLittleEndian,
                        "blob_key": f"studies/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
                        f"{ds.SOPInstanceUID}.synthetic.dcm",
                        "dataset_offset": 0,
                        "size": 1024,
                        "sha256": hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest(),
                        "received_at": now,
                        "door": "bench-sql",
                        "source_ae": "BENCHLOAD",
                        "source_host": LOOPBACK,
                        "source_institution": source_of(spec, scope),
                        "transfer_id": None,
                        "received_patient_id": ds.PatientID,
                        "received_issuer": issuer,
                        "frame_offsets": None,
                        **a.instance,
                    }
                    for spec, se, a, ds in zip(
                        chunk, list(series_ids), attrs, datasets, strict=True
                    )
                ],
            )
        done = start + len(chunk)
        if done % 20000 == 0 or done == len(specs):
            rate = done / (time.monotonic() - started)
            print(f"    {done}/{len(specs)} rows inserted ({rate:.0f} studies/s)", flush=True)


def bench_token(archive: Any, specs: Sequence[StudySpec], scope: str) -> str:
    """A day's access token of a DICOMweb client of the bench institution ('' with
    ``--scope none``: requests go without one, as the demo principal). With ``--scope
    institution``, patients of studies it did not send consent to it first."""
    import datetime

    from consent.principals import add_dicomweb_client, add_institution
    from consent.tokens import issue_for_system

    if scope == "none":
        return ""
    add_institution(archive.db, BENCH_INSTITUTION)
    if scope == "institution":
        add_consents(archive, specs)
    client, _secret = add_dicomweb_client(archive.db, BENCH_INSTITUTION, "bench-viewer")
    return issue_for_system(archive.db, client, datetime.timedelta(days=1)).token


def add_consents(archive: Any, specs: Sequence[StudySpec]) -> int:
    """Permit consents (all studies) to the bench institution from the patients of
    one study in CONSENTS_PER it did not send: each patient gets an account linked
    to its archive patient, as the portal would, then consents."""
    from consent.audit import Auditor
    from consent.consents import grant
    from consent.patients import link_patient
    from consent.principals import Kind, add_user, user_principal

    auditor = Auditor(archive.db)
    patients = sorted(
        {
            s.patient
            for s in specs[CONSENTS_PER // 2 + 1 :: CONSENTS_PER]
            if source_of(s, "institution") != BENCH_INSTITUTION
        }
    )
    operator = user_principal(archive.db, add_user(archive.db, "bench-operator", Kind.OPERATOR))
    assert operator is not None
    for patient in patients:
        account = add_user(archive.db, f"bench-patient-{patient}", Kind.PATIENT)
        link_patient(
            archive.db,
            auditor,
            account_id=account,
            issuer=archive.settings.default_issuer,
            patient_id=patient_id(patient),
            by=operator,
            evidence="bench: synthetic patient",
        )
        principal = user_principal(archive.db, account)
        assert principal is not None
        grant(archive.db, principal, institution=BENCH_INSTITUTION)
    return len(patients)


def ingest_ct(archive: Any, files: Sequence[Path]) -> None:
    from gateway.archive import Source

    source = Source(
        door="import", ae_title="BENCHLOAD", host=LOOPBACK, institution=BENCH_INSTITUTION
    )
    for path in files:
        archive.ingest_file(path, source, owned=False)


# --- targets -----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    base: str  # DICOMweb root, e.g. http://127.0.0.1:PORT/dicom-web
    proc: subprocess.Popen
    log: Path
    load: LoadResult
    studies: int  # studies in its index (synthetic + the CT study)
    note: str = ""
    auth: dict[str, str] = field(default_factory=dict)  # headers every request carries


class Target:
    name = ""

    def available(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    def start(self, procs: Processes, work: Path) -> Server:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Drop what outlives the temp dir (a PostgreSQL database)."""


# A tiny launcher: the same uvicorn options `studybridge serve` gives its HTTP child.
LAUNCHER = """
import uvicorn
from dicomweb.app import create_app
from gateway.config import Settings
from gateway.runtime import configure_serving_process, freeze_startup_heap
settings = Settings()
configure_serving_process()  # as `studybridge serve`'s HTTP process does
app = create_app(settings)
freeze_startup_heap()
uvicorn.run(app, host=settings.http_host, port=settings.http_port,
            log_level="warning", access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace))
"""


class Studybridge(Target):
    def __init__(
        self, backend: str, args: argparse.Namespace, specs: list[StudySpec], ct: list[Path]
    ):
        self.name = backend
        self.backend = backend
        self.args = args
        self.specs = specs
        self.ct = ct
        self.big: list[Path] = []
        self.pg_db: str | None = None
        self.pg_url: str | None = None
        # --backend production: PostgreSQL + S3 + worker (ingest.py's ProductionBackend).
        self.production: ProductionBackend | None = None
        self.env: dict[str, str] = {}
        self.token = ""

    def available(self) -> str | None:
        try:
            import dicomweb.app  # noqa: F401
            import gateway.archive  # noqa: F401
        except ImportError as exc:
            return f"studybridge is not importable: {exc}"
        if self.backend in ("postgresql", "production"):
            try:
                with self._admin() as conn:
                    conn.execute("SELECT 1")
            except Exception as exc:
                return f"PostgreSQL at {self.args.pg_admin_url} unreachable: {exc}"
        return None

    def version(self) -> str:
        from importlib.metadata import version

        text = f"studybridge {version('studybridge')} ({git_head()}{dirty_note()})"
        if self.backend in ("postgresql", "production"):
            with contextlib.suppress(Exception), self._admin() as conn:
                text += "; " + conn.execute("SHOW server_version").fetchone()[0].split()[0]
                text = text.replace("; ", "; PostgreSQL ")
            if self.backend == "production":
                text += " + SeaweedFS S3 + Celery worker (Redis)"
        else:
            import sqlite3

            text += f"; SQLite {sqlite3.sqlite_version}"
        return text

    def _admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.args.pg_admin_url, autocommit=True, connect_timeout=5)

    def _database_url(self) -> str:
        if self.backend != "postgresql":
            return ""
        from sqlalchemy.engine import make_url

        self.pg_db = f"sb_bench_{secrets.token_hex(4)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.pg_db}"')
        url = make_url(self.args.pg_admin_url).set(
            drivername="postgresql+psycopg", database=self.pg_db
        )
        self.pg_url = url.render_as_string(hide_password=False)
        return self.pg_url

    def cleanup(self) -> None:
        if self.pg_db:
            with contextlib.suppress(Exception), self._admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
            self.pg_db = None

    def load(self, data: Path) -> LoadResult:
        from gateway.archive import Archive
        from gateway.config import Settings

        if self.production is not None:
            # The same settings the servers get from the environment.
            fields = {k.removeprefix("STUDYBRIDGE_").lower(): v for k, v in self.env.items()}
            settings = Settings(data_dir=data, log_level="WARNING", **fields)  # type: ignore[arg-type]
        else:
            settings = Settings(
                data_dir=data, database_url=self._database_url(), log_level="WARNING"
            )
        archive = Archive.open(settings, migrate_schema=True)
        loader = self.args.loader
        if loader == "auto":
            loader = "ingest" if len(self.specs) <= SQL_LOADER_ABOVE else "sql"
        note = (
            f"Archive.ingest_file, {self.args.load_threads} threads"
            if loader == "ingest"
            else "bulk SQL rows (SQLAlchemy Core), no blobs"
        )
        print(f"  loading {len(self.specs)} studies into {self.backend} ({note}) ...", flush=True)
        try:
            t0 = time.perf_counter()
            if loader == "ingest":
                load_by_ingest(archive, self.specs, self.args.load_threads, self.args.scope)
            else:
                load_by_sql(archive, self.specs, self.args.scope)
            seconds = time.perf_counter() - t0
            print(f"  ingesting the {len(self.ct)}-slice CT study ...", flush=True)
            t0 = time.perf_counter()
            ingest_ct(archive, self.ct)
            ct_seconds = time.perf_counter() - t0
            if self.big:
                print(f"  ingesting the {len(self.big)}-slice big study ...", flush=True)
                ingest_ct(archive, self.big)
            self.token = bench_token(archive, self.specs, self.args.scope)
            # As `studybridge import` does after a bulk import (and autovacuum would
            # later): PostgreSQL's planner statistics of the loaded index. (This was
            # once run inside a transaction that was then rolled back, which threw the
            # statistics away and left PostgreSQL planning blind: 73 ms at 100k.) After
            # the token: its consents and patient links are tables of the scope query,
            # and until they are analysed (autovacuum does within a minute or so) the
            # planner takes them for one row each and joins them by nested loop; the
            # measured figures then depended on whether autovacuum had come by yet
            # (PatientID 21 vs 7.5 ms).
            archive.db.analyze()
        finally:
            archive.close()
        return LoadResult(loader, len(self.specs), seconds, ct_seconds, note)

    def start(self, procs: Processes, work: Path) -> Server:
        data = work / "data"
        if self.production is not None:
            self.env = self.production.start_run("dicomweb")
            self.production.start_worker(procs, work, {**os.environ, **self.env})
        load = self.load(data)
        proc, port, log = self.start_http(procs, work, "server")
        note = "uvicorn (uvloop and httptools when installed), 1 process"
        if self.production is not None:
            note += "; S3 blobs, series metadata built by the worker"
        return Server(
            self.name,
            f"http://{LOOPBACK}:{port}{PREFIX}",
            proc,
            log,
            load,
            len(self.specs) + 1,
            note,
            auth={"Authorization": f"Bearer {self.token}"} if self.token else {},
        )

    def start_http(self, procs: Processes, work: Path, name: str) -> tuple[Any, int, Path]:
        """One more HTTP gateway process on the loaded index: (process, port, log)."""
        port, log = free_port(), work / f"{name}.log"
        env = dict(os.environ)
        env.update(
            {
                "STUDYBRIDGE_DATA_DIR": str(work / "data"),
                "STUDYBRIDGE_DATABASE_URL": self.pg_url or "",
                **self.env,
                "STUDYBRIDGE_HTTP_HOST": LOOPBACK,
                "STUDYBRIDGE_HTTP_PORT": str(port),
                "STUDYBRIDGE_LOG_LEVEL": "WARNING",
                # Anonymous requests as the demo principal (sees everything; each
                # request still runs the access decision and the audit).
                "STUDYBRIDGE_PROFILE": "demo",
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(BENCH_DIR.parent), os.environ.get("PYTHONPATH")])
                ),
            }
        )
        proc = procs.start([sys.executable, "-c", LAUNCHER], log=log, env=env, cwd=work)
        wait_for_port(port, proc, START_TIMEOUT_S, log)
        wait_ready(f"http://{LOOPBACK}:{port}/readyz", proc, log)
        return proc, port, log


class Orthanc(Target):
    name = "orthanc"

    def __init__(self, args: argparse.Namespace, specs: list[StudySpec], ct: list[Path]):
        self.args = args
        self.specs = specs[: args.orthanc_studies]
        self.ct = ct

    @staticmethod
    def plugin() -> Path | None:
        for folder in ORTHANC_PLUGIN_DIRS:
            for path in sorted(Path(folder).glob("libOrthancDicomWeb*.so*")):
                return path
        return None

    def available(self) -> str | None:
        if not os.access(ORTHANC, os.X_OK):
            return f"{ORTHANC} not installed (pass --install-orthanc)"
        if self.plugin() is None:
            return (
                "the DICOMweb plugin (orthanc-dicomweb) is not installed (pass --install-orthanc)"
            )
        return None

    def version(self) -> str:
        r = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True, timeout=30)
        text = (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"],
            capture_output=True,
            text=True,
        )
        return f"{text.replace('/usr/sbin/', '')}; DICOMweb plugin {r.stdout.strip() or '?'}"

    def start(self, procs: Processes, work: Path) -> Server:
        http, log = free_port(), work / "server.log"
        plugin = self.plugin()
        assert plugin is not None
        config = {
            "Name": "studybridge-bench",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"),
            "DicomServerEnabled": False,
            "HttpServerEnabled": True,
            "HttpPort": http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "KeepAlive": True,
            "WebDavEnabled": False,
            "Plugins": [str(plugin.parent)],
            "LuaScripts": [],
            "DicomModalities": {},
            "OrthancPeers": {},
            "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": f"{PREFIX}/", "EnableWado": False},
        }
        cfg = work / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        proc = procs.start([ORTHANC, str(cfg)], log=log, cwd=work)
        wait_for_port(http, proc, START_TIMEOUT_S, log)
        root = f"http://{LOOPBACK}:{http}"
        wait_ready(f"{root}/system", proc, log)
        load = self.load(root)
        return Server(
            self.name,
            f"{root}{PREFIX}",
            proc,
            log,
            load,
            len(self.specs) + 1,
            f"SQLite index; {len(self.specs)} synthetic studies",
        )

    def load(self, root: str) -> LoadResult:
        print(f"  loading {len(self.specs)} studies into Orthanc (POST /instances) ...", flush=True)
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            return local.client

        def post(data: bytes) -> None:
            r = client().post(f"{root}/instances", content=data)
            if r.status_code != 200:
                raise RuntimeError(f"Orthanc POST /instances: {r.status_code} {r.text[:200]}")

        t0 = time.perf_counter()
        run_all(self.args.load_threads, lambda s: post(spec_bytes(s)), self.specs)
        seconds = time.perf_counter() - t0
        print(f"  sending the {len(self.ct)}-slice CT study to Orthanc ...", flush=True)
        t0 = time.perf_counter()
        run_all(self.args.load_threads, lambda p: post(p.read_bytes()), self.ct)
        ct_seconds = time.perf_counter() - t0
        stats = httpx.get(f"{root}/statistics", timeout=60).json()
        expected = len(self.specs) + len(self.ct)
        if int(stats["CountInstances"]) != expected:
            raise RuntimeError(f"Orthanc holds {stats['CountInstances']} instances, not {expected}")
        return LoadResult(
            "orthanc-rest",
            len(self.specs),
            seconds,
            ct_seconds,
            f"POST /instances, {self.args.load_threads} threads",
        )


def dirty_note() -> str:
    """' + uncommitted changes in N files' when the product code differs from HEAD."""
    try:
        r = subprocess.run(
            ["git", "-C", str(BENCH_DIR.parent), "status", "--porcelain", "--", "gateway", "dicomweb"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except OSError:
        return ""
    changed = [line for line in r.stdout.splitlines() if line.strip()]
    return f" + uncommitted changes in {len(changed)} file(s)" if changed else ""


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s{log_tail(log)}")


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Latency:
    key: str
    label: str
    samples_ms: list[float] = field(default_factory=list)
    results: int | None = None  # QIDO: number of results in the answer
    body_bytes: int = 0
    encoding: str = ""  # Content-Encoding of the answers
    status: int = 0
    note: str = ""
    error: str = ""
    gzip_samples_ms: list[float] = field(default_factory=list)
    gzip_bytes: int = 0
    gzip_encoding: str = ""

    @property
    def p50(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None

    @property
    def p95(self) -> float | None:
        return percentile(self.samples_ms, 95) if self.samples_ms else None

    @property
    def gzip_p50(self) -> float | None:
        return statistics.median(self.gzip_samples_ms) if self.gzip_samples_ms else None

    @property
    def gzip_p95(self) -> float | None:
        return percentile(self.gzip_samples_ms, 95) if self.gzip_samples_ms else None

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "p50_ms": self.p50,
            "p95_ms": self.p95,
            "min_ms": min(self.samples_ms) if self.samples_ms else None,
            "max_ms": max(self.samples_ms) if self.samples_ms else None,
            "n": len(self.samples_ms),
            "results": self.results,
            "body_bytes": self.body_bytes,
            "encoding": self.encoding or "identity",
            "gzip_p50_ms": self.gzip_p50,
            "gzip_p95_ms": self.gzip_p95,
            "gzip_body_bytes": self.gzip_bytes,
            "gzip_encoding": self.gzip_encoding,
            "note": self.note,
            "error": self.error,
            "samples_ms": [round(s, 3) for s in self.samples_ms],
        }


class Bench:
    """Times requests against one server over one keep-alive connection."""

    def __init__(self, base: str, repeat: int, warmup: int) -> None:
        self.base = base
        self.repeat = repeat
        self.warmup = warmup
        self.client = httpx.Client(timeout=300, headers={"Accept-Encoding": "identity", **AUTH})

    def close(self) -> None:
        self.client.close()

    def _get(
        self, path: str, accept: str, encoding: str = "identity"
    ) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        r = self.client.get(
            self.base + path, headers={"Accept": accept, "Accept-Encoding": encoding}
        )
        r.read()
        return r, (time.perf_counter() - t0) * 1000

    def series(
        self,
        key: str,
        label: str,
        paths: Sequence[str],
        accept: str,
        *,
        json_results: bool = False,
        gzip_too: bool = False,
        fallback_accept: str | None = None,
    ) -> Latency:
        """``repeat`` timed GETs cycling through ``paths`` (after ``warmup`` untimed)."""
        lat = Latency(key, label)
        r, _ = self._get(paths[0], accept)
        if r.status_code not in (200, 204) and fallback_accept:
            lat.note = f"refused {accept!r} ({r.status_code}); asked {fallback_accept!r}"
            accept = fallback_accept
            r, _ = self._get(paths[0], accept)
        if r.status_code not in (200, 204):
            lat.status = r.status_code
            lat.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return lat
        for i in range(self.warmup):
            self._get(paths[i % len(paths)], accept)
        for i in range(self.repeat):
            r, ms = self._get(paths[i % len(paths)], accept)
            if r.status_code not in (200, 204):
                lat.error = f"HTTP {r.status_code} on {paths[i % len(paths)]}: {r.text[:200]}"
                return lat
            lat.samples_ms.append(ms)
        lat.status = r.status_code
        lat.body_bytes = len(r.content)
        lat.encoding = r.headers.get("content-encoding", "")
        if json_results:
            lat.results = 0 if r.status_code == 204 else len(r.json())
        if gzip_too:
            for i in range(self.warmup):
                self._get(paths[i % len(paths)], accept, "gzip")
            for i in range(self.repeat):
                r, ms = self._get(paths[i % len(paths)], accept, "gzip")
                lat.gzip_samples_ms.append(ms)
            lat.gzip_encoding = r.headers.get("content-encoding", "") or "identity"
            lat.gzip_bytes = int(r.headers.get("content-length") or len(r.content))
        return lat

    def once(self, key: str, label: str, path: str, accept: str) -> Latency:
        lat = Latency(key, label)
        r, ms = self._get(path, accept)
        lat.status = r.status_code
        if r.status_code != 200:
            lat.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return lat
        lat.samples_ms.append(ms)
        lat.body_bytes = len(r.content)
        lat.encoding = r.headers.get("content-encoding", "")
        with contextlib.suppress(ValueError):
            lat.results = len(r.json())
        return lat


@dataclass
class StreamResult:
    bytes: int = 0
    parts: int = 0
    seconds: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    accept: str = ACCEPT_STUDY
    client: str = ""
    rss: dict[str, Any] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    error: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def mb_per_s(self) -> float | None:
        s = self.median_s
        return self.bytes / MB / s if s else None


def check_study_stream(base: str, study: str, accept: str) -> tuple[int, int, int, str]:
    """Stream the study once with httpx: (status, bytes, parts, content-type)."""
    marker = b"\r\nContent-Type: application/dicom"
    total = parts = 0
    tail = b""
    with (
        httpx.Client(timeout=600, headers=AUTH) as client,
        client.stream(
            "GET",
            f"{base}/studies/{study}",
            headers={"Accept": accept, "Accept-Encoding": "identity"},
        ) as r,
    ):
        if r.status_code != 200:
            r.read()
            return r.status_code, 0, 0, r.text[:200]
        for chunk in r.iter_raw(1 << 20):
            total += len(chunk)
            window = tail + chunk
            parts += window.count(marker)
            tail = window[-(len(marker) - 1) :]
        return r.status_code, total, parts, r.headers.get("content-type", "")


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def stream_study(
    server: Server, probe: Probe, repeat: int, expect_parts: int, use_curl: bool
) -> StreamResult:
    """Retrieve the whole study: checked once with httpx, then timed ``repeat`` times."""
    res = StreamResult()
    url = f"{server.base}/studies/{probe.ct_study}"
    res.client = "curl" if use_curl else "httpx"
    # The baseline is taken before the study's first retrieval (the checked one).
    watch = RssWatch(server.proc.pid)
    watch.start()
    try:
        status, total, parts, ctype = check_study_stream(server.base, probe.ct_study, ACCEPT_STUDY)
        if status != 200:
            res.accept = ACCEPT_STUDY_EXPLICIT
            status, total, parts, ctype = check_study_stream(
                server.base, probe.ct_study, ACCEPT_STUDY_EXPLICIT
            )
        if status != 200:
            res.error = f"HTTP {status}: {ctype}"
            return res
        if parts != expect_parts:
            res.error = f"{parts} parts, expected {expect_parts} ({ctype})"
        res.bytes, res.parts = total, parts
        tree = process_tree(server.proc.pid)
        cpu0 = cpu_seconds(tree)
        for _ in range(repeat):
            if use_curl:
                seconds, ttfb, size = curl_get(url, res.accept)
            else:
                seconds, ttfb, size = httpx_stream(url, res.accept)
            if size != total:
                res.error = f"a timed run got {size} bytes, the checked one {total}"
            res.seconds.append(seconds)
            res.ttfb.append(ttfb)
        res.server_cpu_s = (cpu_seconds(tree) - cpu0) / max(repeat, 1)
    finally:
        rss = watch.stop()
    res.rss = {
        "growth_mb": rss.growth_mb,
        "hwm_growth_mb": rss.hwm_growth_mb,
        "sampled_growth_mb": rss.sampled_growth_mb,
        "baseline_mb": rss.baseline_mb,
        "processes": rss.processes,
    }
    return res


def stream_big(server: Server, study: str) -> dict[str, Any]:
    """One retrieval of the big study as stored (curl), RSS sampled meanwhile."""
    watch = RssWatch(server.proc.pid)
    watch.start()
    try:
        seconds, _, size = curl_get(f"{server.base}/studies/{study}", ACCEPT_STUDY)
    finally:
        rss = watch.stop()
    return {
        "bytes": size,
        "seconds": seconds,
        "mb_per_s": size / MB / seconds if seconds else 0.0,
        "growth_mb": rss.growth_mb,
        "hwm_growth_mb": rss.hwm_growth_mb,
        "baseline_mb": rss.baseline_mb,
    }


def curl_auth() -> list[str]:
    return [arg for name, value in AUTH.items() for arg in ("-H", f"{name}: {value}")]


def curl_get(url: str, accept: str) -> tuple[float, float, int]:
    r = subprocess.run(
        [
            CURL, "-sS", "-o", "/dev/null", "-H", f"Accept: {accept}", *curl_auth(),
            "-H", "Accept-Encoding: identity",
            "-w", "%{http_code} %{time_total} %{time_starttransfer} %{size_download}", url,
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    code, total, ttfb, size = r.stdout.split()
    if r.returncode != 0 or code != "200":
        raise RuntimeError(f"curl: HTTP {code} {r.stderr.strip()}")
    return float(total), float(ttfb), int(size)


def httpx_stream(url: str, accept: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttfb = 0.0
    size = 0
    with (
        httpx.Client(timeout=600, headers=AUTH) as client,
        client.stream("GET", url, headers={"Accept": accept, "Accept-Encoding": "identity"}) as r,
    ):
        for chunk in r.iter_raw(1 << 20):
            if not size:
                ttfb = time.perf_counter() - t0
            size += len(chunk)
    return time.perf_counter() - t0, ttfb, size


@dataclass
class TargetResult:
    name: str
    version: str = ""
    studies: int = 0
    load: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    loadavg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    loadavg_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    latencies: dict[str, Latency] = field(default_factory=dict)
    stream: StreamResult | None = None
    big_stream: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


def measure(server: Server, probe: Probe, args: argparse.Namespace, is_ours: bool) -> TargetResult:
    result = TargetResult(server.name, studies=server.studies, note=server.note)
    result.loadavg_before = load_average()
    bench = Bench(server.base, args.repeat, args.warmup)
    qido = [
        ("qido_patient_id", f"/studies?PatientID={probe.patient_id}"),
        (
            "qido_date_ct",
            f"/studies?StudyDate={probe.month[0]}-{probe.month[1]}&ModalitiesInStudy=CT&limit=100",
        ),
        ("qido_name_kim", "/studies?PatientName=KIM*&limit=100"),
        ("qido_all", "/studies?limit=100"),
        ("qido_series", f"/studies/{probe.ct_study}/series"),
        ("qido_instances", f"/studies/{probe.ct_study}/instances"),
        (
            "qido_instances_all",
            f"/studies/{probe.ct_study}/instances?limit={len(probe.ct_instances)}",
        ),
    ]
    try:
        # The first metadata call comes before anything else touches the CT study.
        meta_path = f"/studies/{probe.ct_study}/metadata"
        print(f"  {server.name}: WADO-RS study metadata (first call) ...", flush=True)
        result.latencies["metadata_first"] = bench.once(
            "metadata_first", "study metadata, first call", meta_path, DICOM_JSON
        )
        print(f"  {server.name}: QIDO-RS ...", flush=True)
        for key, path in qido:
            result.latencies[key] = bench.series(
                key, path, [path], DICOM_JSON, json_results=True, gzip_too=is_ours
            )
        print(f"  {server.name}: WADO-RS metadata, frames, instances ...", flush=True)
        result.latencies["metadata_cached"] = bench.series(
            "metadata_cached", "study metadata, cached", [meta_path], DICOM_JSON,
            json_results=True, gzip_too=is_ours,
        )  # fmt: skip
        inst_paths = [
            f"/studies/{probe.ct_study}/series/{probe.ct_series}/instances/{sop}"
            for sop in probe.ct_instances
        ]
        result.latencies["frame"] = bench.series(
            "frame", "one frame (/frames/1)", [p + "/frames/1" for p in inst_paths],
            ACCEPT_FRAME, fallback_accept=ACCEPT_FRAME_PLAIN,
        )  # fmt: skip
        result.latencies["instance"] = bench.series(
            "instance", "one instance", inst_paths, ACCEPT_INSTANCE,
            fallback_accept=ACCEPT_STUDY_EXPLICIT,
        )  # fmt: skip
        print(f"  {server.name}: WADO-RS whole study x{args.stream_repeat} ...", flush=True)
        result.stream = stream_study(
            server, probe, args.stream_repeat, len(probe.ct_instances), args.stream_client == "curl"
        )
    finally:
        bench.close()
    result.loadavg_after = load_average()
    for lat in result.latencies.values():
        if lat.error:
            result.problems.append(f"{lat.key}: {lat.error}")
    if result.stream and result.stream.error:
        result.problems.append(f"study retrieval: {result.stream.error}")
    return result


# --- report ------------------------------------------------------------------------------

QIDO_KEYS = (
    "qido_patient_id",
    "qido_date_ct",
    "qido_name_kim",
    "qido_all",
    "qido_series",
    "qido_instances",
    "qido_instances_all",
)
LABELS = {
    "qido_patient_id": "QIDO /studies?PatientID={pid}",
    "qido_date_ct": "QIDO /studies?StudyDate={month}&ModalitiesInStudy=CT&limit=100",
    "qido_name_kim": "QIDO /studies?PatientName=KIM*&limit=100",
    "qido_all": "QIDO /studies?limit=100",
    "qido_series": "QIDO /studies/{ct}/series",
    "qido_instances": "QIDO /studies/{ct}/instances (250 stored; the server's default page)",
    "qido_instances_all": "QIDO /studies/{ct}/instances?limit=250",
    "metadata_first": "WADO study metadata, first call (250 instances)",
    "metadata_cached": "WADO study metadata, cached (250 instances)",
    "frame": "WADO one frame (/frames/1, transfer-syntax=*)",
    "instance": "WADO one instance (transfer-syntax=*)",
}
TARGETS_MS = {key: QIDO_TARGET_MS for key in QIDO_KEYS} | {
    "metadata_cached": METADATA_TARGET_MS,
    "frame": FRAME_TARGET_MS,
}


# --- horizontal scale (--backend production) -----------------------------------------------

SCALE_PARALLEL = 8  # requests in flight (curl --parallel-max)


def curl_parallel(urls: Sequence[str], accept: str, work: Path) -> tuple[float, int, int]:
    """GET every URL with one curl process, ``SCALE_PARALLEL`` at a time.

    Returns (wall seconds, bytes received, failed requests). curl (C) rather than a
    Python client, which would compete with the servers for the cores.
    """
    config = work / "curl-urls.cfg"
    config.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    argv = [
        CURL, "--parallel", "--parallel-max", str(SCALE_PARALLEL), "-s", "-H", f"Accept: {accept}", *curl_auth(),
        "-H", "Accept-Encoding: identity", "-w", "%{http_code} %{size_download}\n",
        "--config", str(config),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    lines = [x.split() for x in done.stdout.splitlines() if x.strip()]
    failed = len(urls) - sum(1 for code, _ in lines if code == "200")
    return seconds, sum(int(size) for _, size in lines), failed


def gateway_scale(
    procs: Processes, target: Studybridge, server: Server, probe: Probe, args: argparse.Namespace
) -> dict[str, Any]:
    """Throughput of one and of two HTTP gateways on the same index and bucket.

    The second gateway is another process on the same PostgreSQL database and S3
    prefix. Two loads, each sent with ``SCALE_PARALLEL`` requests in flight and split
    round-robin over the gateways: every instance of the CT study twice (WADO-RS,
    transfer-syntax=*: MB/s) and 400 QIDO-RS PatientID searches (requests/s).
    """
    work = server.log.parent
    proc2, port2, _ = target.start_http(procs, work, "server2")
    bases = [server.base, f"http://{LOOPBACK}:{port2}{PREFIX}"]
    instance = f"/studies/{probe.ct_study}/series/{probe.ct_series}/instances/"
    wado = [instance + sop for sop in probe.ct_instances] * 2
    qido = [f"/studies?PatientID={probe.patient_id}"] * 400
    figures: dict[str, Any] = {"parallel": SCALE_PARALLEL, "runs": []}
    print(f"  {server.name}: one vs two gateways ({SCALE_PARALLEL} requests in flight) ...")
    try:
        for rep in range(args.gateways_repeat):
            for gateways in (1, 2):
                for kind, paths, accept in (
                    ("wado", wado, ACCEPT_INSTANCE),
                    ("qido", qido, DICOM_JSON),
                ):
                    urls = [bases[i % gateways] + path for i, path in enumerate(paths)]
                    seconds, size, failed = curl_parallel(urls, accept, work)
                    figures["runs"].append(
                        {
                            "kind": kind,
                            "gateways": gateways,
                            "repeat": rep,
                            "requests": len(urls),
                            "seconds": seconds,
                            "bytes": size,
                            "failed": failed,
                            "loadavg": load_average(),
                        }
                    )
    finally:
        procs.stop(proc2)
    for kind in ("wado", "qido"):
        for gateways in (1, 2):
            runs = [
                r
                for r in figures["runs"]
                if r["kind"] == kind and r["gateways"] == gateways and not r["failed"]
            ]
            if runs:
                seconds = statistics.median(r["seconds"] for r in runs)
                figures[f"{kind}_{gateways}"] = {
                    "requests_per_s": runs[0]["requests"] / seconds,
                    "mb_per_s": runs[0]["bytes"] / MB / seconds,
                }
        one, two = figures.get(f"{kind}_1"), figures.get(f"{kind}_2")
        if one and two:
            figures[f"{kind}_ratio"] = two["requests_per_s"] / one["requests_per_s"]
    return figures


def scale_lines(name: str, scale: dict[str, Any]) -> list[str]:
    lines = [
        f"\nOne vs two gateway processes ({name}: shared PostgreSQL + S3, "
        f"{scale['parallel']} requests in flight, curl), median of {len(scale['runs']) // 4} runs",
        f"  {'load':<32} {'1 gateway':>14} {'2 gateways':>14} {'ratio 2/1':>10}",
    ]
    for kind, label, unit in (
        ("wado", "WADO-RS instance (transfer-syntax=*)", "mb_per_s"),
        ("qido", "QIDO-RS /studies?PatientID", "requests_per_s"),
    ):
        one, two = scale.get(f"{kind}_1"), scale.get(f"{kind}_2")
        shown = "MB/s" if unit == "mb_per_s" else "req/s"
        cells = [f"{d[unit]:>9.1f} {shown:<4}" if d else f"{'FAILED':>14}" for d in (one, two)]
        ratio = scale.get(f"{kind}_ratio")
        lines.append(f"  {label:<32} {cells[0]} {cells[1]} {fmt(ratio, '.2f'):>10}")
    failed = sum(r["failed"] for r in scale["runs"])
    if failed:
        lines.append(f"  ! {failed} requests failed")
    return lines


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def verdict_ms(key: str, lat: Latency) -> tuple[str, bool | None]:
    limit = TARGETS_MS.get(key)
    if limit is None or lat.p50 is None:
        return "", None
    worst = max(v for v in (lat.p50, lat.gzip_p50) if v is not None)
    ok = worst < limit
    return (f"ok (<{limit:.0f})" if ok else f"MISSED (<{limit:.0f})"), ok


def build_report(
    results: list[TargetResult], args: argparse.Namespace
) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    verdicts: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    orthanc = next((r for r in results if r.name == "orthanc"), None)
    ours = [r for r in results if r.name != "orthanc"]
    lines.append("")
    lines.append(
        f"Latency in ms: p50 / p95 over {args.repeat} requests (after {args.warmup} warm-up), "
        "one keep-alive connection, Accept-Encoding: identity;"
    )
    lines.append(
        "'gzip p50': studybridge again with Accept-Encoding: gzip (browsers); "
        "'x orthanc' = Orthanc p50 / ours (>1 = studybridge faster);"
    )
    lines.append(
        "'*': the two answers hold different numbers of results (Orthanc holds fewer "
        "studies, or a server's default page is smaller). KB: body size as sent."
    )
    head = (
        f"  {'target':<11} {'studies':>7} {'results':>7} {'p50':>8} {'p95':>8} "
        f"{'gzip p50':>9} {'KB':>8} {'x orthanc':>9}  verdict"
    )
    for key in (*QIDO_KEYS, "metadata_first", "metadata_cached", "frame", "instance"):
        lines.append("")
        lines.append(LABELS[key])
        lines.append(head)
        for r in results:
            lat = r.latencies.get(key)
            if lat is None:
                continue
            if lat.error:
                lines.append(f"  {r.name:<11} ! {lat.error.splitlines()[0][:110]}")
                continue
            ratio = None
            differs = False
            if r is not orthanc and orthanc and key in orthanc.latencies:
                theirs = orthanc.latencies[key]
                if theirs.p50 and lat.p50:
                    ratio = theirs.p50 / lat.p50
                    ratios[f"{r.name}:{key}"] = ratio
                    differs = theirs.results != lat.results
            text, ok = verdict_ms(key, lat) if r is not orthanc else ("", None)
            if ok is not None:
                verdicts[f"{r.name}:{key}"] = ok
            if key == "metadata_first" and r is not orthanc:
                text = "(builds the series cache)"
            lines.append(
                f"  {r.name:<11} {r.studies:>7} {fmt(lat.results, 'd') if lat.results is not None else '-':>7} "
                f"{fmt(lat.p50):>8} {fmt(lat.p95):>8} {fmt(lat.gzip_p50):>9} "
                f"{lat.body_bytes / 1000:>8.1f} {fmt(ratio, '.2f'):>9}{'*' if differs else ' '} {text}"
            )
            if lat.note:
                lines.append(f"  {'':<11} note: {lat.note}")
        ref = ISSUE_REFERENCE.get(key)
        if ref:
            lines.append(f"  {'issue':<11} Orthanc 1.10 + DICOMweb, 2 cores, 20,000 studies: {ref}")

    lines.append("")
    lines.append(
        f"WADO-RS whole CT study ({CT_SLICES} x 512x512x16 bit) as multipart, median of "
        f"{args.stream_repeat}; RSS growth of the server tree while streaming"
    )
    lines.append(
        f"  {'target':<11} {'MB':>7} {'parts':>5} {'seconds':>8} {'MB/s':>8} {'TTFB ms':>8} "
        f"{'srv CPU s':>9} {'RSS +MB':>8} {'base MB':>8} {'x orthanc':>9}  verdict"
    )
    orthanc_mbs = orthanc.stream.mb_per_s if orthanc and orthanc.stream else None
    for r in results:
        s = r.stream
        if s is None:
            continue
        if not s.seconds:
            lines.append(f"  {r.name:<11} ! {s.error[:110]}")
            continue
        mbs = s.mb_per_s
        ratio = mbs / orthanc_mbs if (r is not orthanc and mbs and orthanc_mbs) else None
        texts = []
        if r is not orthanc:
            if ratio is not None:
                ratios[f"{r.name}:study_mb_s"] = ratio
                ok = ratio >= 1.0
                verdicts[f"{r.name}:study_mb_s"] = ok
                texts.append("MB/s ok (>= Orthanc)" if ok else "MB/s MISSED (< Orthanc)")
            else:
                texts.append("MB/s: no Orthanc figure")
            flat = s.rss.get("growth_mb", 1e9) < args.rss_flat_mb
            verdicts[f"{r.name}:rss_flat"] = flat
            texts.append(f"RSS {'flat' if flat else 'NOT FLAT'} (<{args.rss_flat_mb:.0f} MB)")
        lines.append(
            f"  {r.name:<11} {s.bytes / MB:>7.1f} {s.parts:>5} {fmt(s.median_s, '.3f'):>8} "
            f"{fmt(mbs):>8} {statistics.median(s.ttfb) * 1000:>8.1f} {s.server_cpu_s:>9.2f} "
            f"{s.rss.get('growth_mb', 0):>8.1f} {s.rss.get('baseline_mb', 0):>8.1f} "
            f"{fmt(ratio, '.2f'):>9}  {'; '.join(texts)}"
        )
        if s.error:
            lines.append(f"  {'':<11} ! {s.error[:110]}")
        if s.accept != ACCEPT_STUDY:
            lines.append(f"  {'':<11} note: refused transfer-syntax=*; asked {s.accept!r}")
    lines.append(f"  {'issue':<11} Orthanc 1.10 + DICOMweb: {ISSUE_REFERENCE['study']}")

    bigs = [r for r in ours if r.big_stream]
    if bigs:
        lines.append("")
        lines.append(
            f"WADO-RS big study ({args.big_study_slices} slices) as stored, once with curl; "
            "peak RSS growth of the server tree while streaming"
        )
        lines.append(
            f"  {'target':<11} {'MB':>8} {'seconds':>8} {'MB/s':>8} {'RSS +MB':>8}  verdict"
        )
        for r in bigs:
            b = r.big_stream or {}
            flat = b["growth_mb"] < args.rss_flat_mb
            verdicts[f"{r.name}:big_rss_flat"] = flat
            lines.append(
                f"  {r.name:<11} {b['bytes'] / MB:>8.1f} {b['seconds']:>8.2f} "
                f"{b['mb_per_s']:>8.1f} {b['growth_mb']:>8.1f}  "
                f"RSS {'flat' if flat else 'NOT FLAT'} (<{args.rss_flat_mb:.0f} MB)"
            )

    lines.append("")
    lines.append("Targets (issue; QIDO target stated for 100,000 studies; ms targets on the slower")
    lines.append("of identity and gzip p50):")
    for r in ours:
        keys = [k for k in verdicts if k.startswith(r.name + ":")]
        missed = [k.split(":", 1)[1] for k in keys if verdicts[k] is False]
        lines.append(
            f"  {r.name:<11} {len(keys) - len(missed)}/{len(keys)} met"
            + (f"; missed: {', '.join(missed)}" if missed else "")
        )
    return lines, {"verdicts": verdicts, "ratios": ratios}


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="DICOMweb benchmark (QIDO-RS, WADO-RS): studybridge on SQLite and "
        "PostgreSQL against Orthanc's DICOMweb plugin.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--studies", type=int, default=10_000, help="synthetic studies in the index")
    p.add_argument(
        "--orthanc-studies", type=int, default=None,
        help="synthetic studies loaded into Orthanc (default min(--studies, 10000))",
    )  # fmt: skip
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated subset")
    p.add_argument(
        "--loader", choices=("auto", "ingest", "sql"), default="auto",
        help=f"how studybridge's index is loaded (auto: ingest up to {SQL_LOADER_ABOVE} studies)",
    )  # fmt: skip
    p.add_argument(
        "--scope", choices=("institution", "sender", "none"), default="institution",
        help="whose access scope studybridge's queries run in: institution (a client of an "
        f"institution that sent 1 in {SCOPE_SHARE} studies and holds consents of some other "
        "patients), sender (one that sent every study), none (no token: the demo principal, "
        "unscoped)",
    )  # fmt: skip
    p.add_argument("--load-threads", type=int, default=4, help="threads loading the index")
    p.add_argument("--repeat", type=int, default=50, help="timed requests per latency figure")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests before each figure")
    p.add_argument("--stream-repeat", type=int, default=5, help="timed whole-study retrievals")
    p.add_argument(
        "--stream-client", choices=("curl", "httpx"), default="curl" if os.access(CURL, os.X_OK) else "httpx",
        help="client of the timed whole-study retrievals",
    )  # fmt: skip
    p.add_argument("--rss-flat-mb", type=float, default=RSS_FLAT_MB, help="'flat RSS' threshold")
    p.add_argument(
        "--big-study-slices", type=int, default=0,
        help="also stream a study of this many 512 KB slices (2000: 1 GB) from studybridge "
        "and report its peak RSS growth (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL admin connection (a database sb_bench_<random> is created and dropped)",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=("embedded", "production"), default="embedded",
        help="production: one studybridge target on PostgreSQL + SeaweedFS S3 + a Celery "
        "worker, and one vs two gateway processes (replaces the sqlite/postgresql targets)",
    )  # fmt: skip
    p.add_argument("--broker-url", default=DEFAULT_BROKER, help="Redis of the production worker")
    p.add_argument(
        "--gateways-repeat", type=int, default=3, help="runs of one and of two gateways"
    )  # fmt: skip
    p.add_argument(
        "--install-orthanc", action="store_true",
        help="apt-get install orthanc orthanc-dicomweb when missing",
    )  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / "out", help="generated CT study")
    p.add_argument("--work-dir", type=Path, default=None, help="parent of the temp dir")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, server logs)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {ALL_TARGETS}")
    if args.backend == "production":
        args.targets = ["production"] + [t for t in args.targets if t == "orthanc"]
    if args.studies < 1 or args.repeat < 1 or args.stream_repeat < 1 or args.load_threads < 1:
        p.error("--studies, --repeat, --stream-repeat and --load-threads must be at least 1")
    if args.orthanc_studies is None:
        args.orthanc_studies = min(args.studies, 10_000)
    args.orthanc_studies = max(1, min(args.orthanc_studies, args.studies))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT, even if inherited as ignored) end the run like Ctrl-C, so
    # the finally blocks stop the servers and drop the database.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if (
        "orthanc" in args.targets
        and args.install_orthanc
        and (not os.access(ORTHANC, os.X_OK) or Orthanc.plugin() is None)
    ):
        print("installing Orthanc and its DICOMweb plugin with apt-get (--install-orthanc) ...")
        apt_install(["orthanc", "orthanc-dicomweb"])

    specs = make_specs(args.studies)
    ct_files = make_ct_corpus(args.cache_dir / f"ct-512-{CT_SLICES}", CT_SLICES)
    every: dict[str, Target] = {
        "sqlite": Studybridge("sqlite", args, specs, ct_files),
        "postgresql": Studybridge("postgresql", args, specs, ct_files),
        "production": Studybridge("production", args, specs, ct_files),
        "orthanc": Orthanc(args, specs, ct_files),
    }
    big_study = ""
    if args.big_study_slices:
        big = make_ct_corpus(
            args.cache_dir / f"ct-512-{args.big_study_slices}", args.big_study_slices
        )
        head = pydicom.dcmread(big[0], stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        big_study = str(head.StudyInstanceUID)
        for name in OURS:
            every[name].big = big  # type: ignore[attr-defined]
    targets, skipped = [], {}
    for name in (t for t in ALL_TARGETS if t in args.targets):
        reason = every[name].available()
        if reason:
            skipped[name] = reason
        else:
            targets.append(every[name])

    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
        "python": platform.python_version(),
        "versions": {t.name: t.version() for t in targets},
        "skipped": skipped,
        "studies": args.studies,
        "orthanc_studies": args.orthanc_studies,
        "scope": args.scope,
        "loadavg_start": load_average(),
        "studybridge_env": {k: v for k, v in os.environ.items() if k.startswith("STUDYBRIDGE_")},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"studybridge DICOMweb benchmark, {meta['date']}, {meta['machine']}")
    print(
        f"load average at start: {' '.join(f'{v:.2f}' for v in meta['loadavg_start'])} "
        "(other users of this machine may be running things)"
    )
    print(f"studybridge access scope: {SCOPE_NOTES[args.scope]}")
    for name, version in meta["versions"].items():
        print(f"  {name:<11} {version}")
    for name, reason in skipped.items():
        print(f"  {name:<11} SKIPPED: {reason}")
    if meta["studybridge_env"]:
        print(f"  inherited studybridge settings: {meta['studybridge_env']}")
    if not targets:
        print("no target can run")
        return 1

    probe = choose_probe(
        specs, args.orthanc_studies if "orthanc" in meta["versions"] else len(specs), ct_files
    )
    work = Path(tempfile.mkdtemp(prefix="sb-bench-dicomweb-", dir=args.work_dir))
    results: list[TargetResult] = []
    failed = False
    scale: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            production = every["production"]
            if production in targets:
                production.production = stack.enter_context(  # type: ignore[attr-defined]
                    ProductionBackend(_psycopg(args.pg_admin_url), args.work_dir, args.broker_url)
                )
            procs = stack.enter_context(Processes())
            for target in targets:
                run_dir = work / target.name
                run_dir.mkdir()
                print(f"\n{target.name}:", flush=True)
                result = TargetResult(target.name, version=meta["versions"][target.name])
                server = None
                try:
                    server = target.start(procs, run_dir)
                    AUTH.clear()
                    AUTH.update(server.auth)
                    measured = measure(server, probe, args, is_ours=target.name != "orthanc")
                    if big_study and target.name != "orthanc":
                        print(f"  {target.name}: the big study, once ...", flush=True)
                        measured.big_stream = stream_big(server, big_study)
                    if target.name == "production":
                        scale = gateway_scale(procs, target, server, probe, args)  # type: ignore[arg-type]
                        if any(r["failed"] for r in scale["runs"]):
                            measured.problems.append("requests failed in the gateway runs")
                    measured.version = result.version
                    measured.load = {
                        "loader": server.load.loader,
                        "studies": server.load.studies,
                        "seconds": server.load.seconds,
                        "studies_per_s": server.load.per_s,
                        "ct_seconds": server.load.ct_seconds,
                        "note": server.load.note,
                    }
                    result = measured
                    print(
                        f"  loaded {server.load.studies} studies in {server.load.seconds:.1f} s "
                        f"({server.load.per_s:.0f}/s, {server.load.note}); CT study "
                        f"{server.load.ct_seconds:.1f} s; load average "
                        f"{' '.join(f'{v:.2f}' for v in result.loadavg_after)}",
                        flush=True,
                    )
                except Exception as exc:
                    result.problems.append(f"failed: {exc}")
                    print(f"  FAILED: {str(exc)[:2000]}", flush=True)
                finally:
                    if server is not None:
                        code = procs.stop(server.proc)
                        if code not in (0, -signal.SIGTERM):
                            result.problems.append(f"exit code {code} after SIGTERM")
                        text = server.log.read_text(errors="replace") if server.log.exists() else ""
                        if "Traceback" in text:
                            last = [x for x in text.splitlines() if x and not x.startswith(" ")]
                            result.problems.append(f"traceback in server log: {last[-1][:150]}")
                    target.cleanup()
                    if not args.keep:
                        shutil.rmtree(run_dir / "data", ignore_errors=True)
                        shutil.rmtree(run_dir / "storage", ignore_errors=True)
                        shutil.rmtree(run_dir / "index", ignore_errors=True)
                results.append(result)
                failed = failed or bool(result.problems)
    finally:
        for target in targets:
            target.cleanup()
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print_header_lines(results, probe, args)
    lines, summary = build_report(results, args)
    if scale:
        lines += scale_lines("production", scale)
        summary["gateways"] = scale
    print("\n".join(lines))
    meta["loadavg_end"] = load_average()
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in meta['loadavg_end'])}")
    for r in results:
        for problem in r.problems:
            print(f"! {r.name}: {problem[:300]}")
    if args.json:
        write_json(args.json, meta, probe, results, summary)
    return 1 if failed else 0


def _psycopg(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def print_header_lines(results: list[TargetResult], probe: Probe, args: argparse.Namespace) -> None:
    print("\nData")
    print(
        f"  query values: PatientID={probe.patient_id}, StudyDate={probe.month[0]}-{probe.month[1]}, "
        f"CT study {probe.ct_study} ({len(probe.ct_instances)} instances)"
    )
    for r in results:
        if r.load:
            ld = r.load
            print(
                f"  {r.name:<11} {r.studies} studies ({ld['studies']} synthetic + CT); loader "
                f"{ld['loader']}: {ld['note']}; {ld['seconds']:.1f} s ({ld['studies_per_s']:.0f}/s); "
                f"load avg {' '.join(f'{v:.2f}' for v in r.loadavg_before)} -> "
                f"{' '.join(f'{v:.2f}' for v in r.loadavg_after)}"
            )


def write_json(
    path: Path, meta: dict, probe: Probe, results: list[TargetResult], summary: dict
) -> None:
    doc = {
        "meta": meta,
        "probe": {
            "patient_id": probe.patient_id,
            "month": list(probe.month),
            "ct_study": probe.ct_study,
            "ct_instances": len(probe.ct_instances),
        },
        "targets": {
            r.name: {
                "version": r.version,
                "studies": r.studies,
                "load": r.load,
                "note": r.note,
                "loadavg_before": r.loadavg_before,
                "loadavg_after": r.loadavg_after,
                "latency": {k: v.summary() for k, v in r.latencies.items()},
                "study_retrieval": None
                if r.stream is None
                else {
                    "bytes": r.stream.bytes,
                    "parts": r.stream.parts,
                    "seconds": r.stream.seconds,
                    "median_s": r.stream.median_s,
                    "mb_per_s": r.stream.mb_per_s,
                    "ttfb_s": r.stream.ttfb,
                    "accept": r.stream.accept,
                    "client": r.stream.client,
                    "server_cpu_s": r.stream.server_cpu_s,
                    "rss": r.stream.rss,
                    "error": r.stream.error,
                },
                "big_study_retrieval": r.big_stream,
                "problems": r.problems,
            }
            for r in results
        },
        "issue_reference_orthanc": ISSUE_REFERENCE,
        **summary,
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
