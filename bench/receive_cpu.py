"""CPU time one receiving process spends per received C-STORE instance.

Wall-clock throughput on a shared machine moves with everything else running on it;
the CPU time the receiving process itself consumes per instance moves much less,
and on a machine whose cores are all busy it is what decides the rate. This script
starts ONE receiving process (``gateway.dimse.server.run_worker``, binding its own
port, the index migrated first, the sender registered as a peer of an institution
as ``ingest.py`` does), pushes the CT corpus of ``ingest.py`` with dcmtk's
``storescu`` over ``--associations`` associations, and reads the process's CPU time
(user + system, all threads, ``/proc/PID/stat``) just before the first and just
after the last storescu exits. Printed per run: instances/s, CPU ms per instance
(user / system), load average, and the index writes against the transactions that
committed them (``db._GroupCommit``: fewer transactions than writes when
concurrent associations share a flush).

``--profile FILE`` also runs every storage association's thread (the data phase of
``receive.StorageReceiver``, where the receiving, checking, storing and indexing of
each instance happen) under cProfile with a CPU clock (``time.thread_time``) and
writes the merged statistics to FILE (read with ``python -m pstats FILE``). The
profiler inflates the absolute figures; compare its shares, not its totals, with
the unprofiled runs.

    python bench/receive_cpu.py [--count 300] [--associations 1] [--repeat 3]
                                [--profile out.prof] [--work-dir DIR] [--keep]

Run it from a checkout with ``PYTHONPATH=$PWD`` to measure that checkout's code.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LOOPBACK,
    Processes,
    drop_page_cache,
    free_port,
    remove_tree,
    wait_for_line,
    wait_out_deletions,
)
from ingest import (
    BENCH_INSTITUTION,
    CALLING_AET,
    MAX_PDU,
    echo,
    make_ct_corpus,
    push,
    warm_page_cache,
)

AET = "STUDYBRIDGE"
READY = "receive_cpu worker ready"
COUNTS = "receive_cpu index writes/transactions:"
LOCK = "receive_cpu writer lock wait/held ms:"
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads, live and ended)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def worker(data_dir: Path, port: int, profile: Path | None) -> None:
    """The receiving process: one ``run_worker`` on its own port until SIGTERM."""
    from gateway.archive.db import migrate
    from gateway.config import Settings
    from gateway.dimse import receive, server

    settings = Settings(
        data_dir=data_dir,
        dimse_host=LOOPBACK,
        dimse_port=port,
        ae_title=AET,
        max_pdu_size=MAX_PDU,
    )
    migrate(settings.resolved_database_url)
    if profile is not None:
        import pstats

        merged: list[pstats.Stats] = []
        lock = threading.Lock()
        original = receive.StorageReceiver.run

        def profiled_run(self: receive.StorageReceiver) -> None:
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            try:
                original(self)
            finally:
                prof.disable()
                with lock:
                    if merged:
                        merged[0].add(prof)
                    else:
                        merged.append(pstats.Stats(prof))

        receive.StorageReceiver.run = profiled_run  # type: ignore[method-assign]

    # Index transactions against writes: how well the group commit shares flushes.
    from gateway.archive import db

    counts = {"writes": 0, "commits": 0}
    counting = threading.Lock()
    run, commit = db._GroupCommit.run, db._GroupCommit._commit

    def counted_run(self: db._GroupCommit, work: Any, before: Any = None) -> Any:
        with counting:
            counts["writes"] += 1
        return run(self, work, before)

    def counted_commit(self: db._GroupCommit, mine: Any) -> Any:
        with counting:
            counts["commits"] += 1
        return commit(self, mine)

    db._GroupCommit.run = counted_run  # type: ignore[method-assign]
    db._GroupCommit._commit = counted_commit  # type: ignore[method-assign]

    # Rounds of blob flushes (``FileStore.sync`` calls with new blobs to flush).
    from gateway.archive import blobstore

    sync = blobstore.FileStore.sync

    def counted_sync(self: blobstore.FileStore, placed: Any) -> None:
        if any(p.file is not None for p in placed):
            with counting:
                counts["flushes"] += 1
        sync(self, placed)

    counts["flushes"] = 0
    blobstore.FileStore.sync = counted_sync  # type: ignore[method-assign]

    # Time spent waiting for the SQLite writer lock and holding it (all processes'
    # index writers queue for it: a bound on commits per second).
    hold = db._WriterLock.hold
    lock_times = {"wait": 0.0, "held": 0.0}

    @contextlib.contextmanager
    def timed_hold(self: db._WriterLock) -> Any:
        asked = time.perf_counter()
        with hold(self):
            got = time.perf_counter()
            try:
                yield
            finally:
                with counting:
                    lock_times["wait"] += got - asked
                    lock_times["held"] += time.perf_counter() - got

    db._WriterLock.hold = timed_hold  # type: ignore[method-assign]

    class Ready:
        def set(self) -> None:
            print(READY, flush=True)

    server.run_worker(settings, 0, Ready())
    print(f"{COUNTS} {counts['writes']} {counts['commits']} {counts['flushes']}", flush=True)
    print(f"{LOCK} {lock_times['wait'] * 1000:.0f} {lock_times['held'] * 1000:.0f}", flush=True)
    if profile is not None and merged:
        merged[0].dump_stats(str(profile))


def run_once(
    procs: Processes, files: list[Path], associations: int, run_dir: Path, profile: Path | None
) -> tuple[float, float, float, int]:
    data, port = run_dir / "data", free_port()
    exe = shutil.which("studybridge")
    assert exe, "the studybridge command is not installed"
    for cli in (
        ["institutions", "add", BENCH_INSTITUTION],
        ["peers", "add", CALLING_AET, "--host", LOOPBACK, "--port", "104",
         "--institution", BENCH_INSTITUTION],
    ):  # fmt: skip
        subprocess.run(
            [exe, *cli, "--data-dir", str(data)], check=True, capture_output=True, timeout=120
        )
    argv = [sys.executable, __file__, "--worker", str(data), str(port)]
    if profile is not None:
        argv += ["--profile", str(profile)]
    log = run_dir / "worker.log"
    proc = procs.start(argv, log=log, env=dict(os.environ), cwd=run_dir)
    wait_for_line(READY, proc, log, 90.0)
    echo(port, AET)
    time.sleep(1.0)
    subprocess.run(["sync"], check=False)
    user0, sys0 = cpu_seconds(proc.pid)
    elapsed = push(port, AET, files, associations, run_dir)
    user1, sys1 = cpu_seconds(proc.pid)
    stored = sum(1 for _ in (data / "blobs" / "studies").rglob("*.dcm"))
    procs.stop(proc)
    counted = [line for line in log.read_text().splitlines() if line.startswith(COUNTS)]
    writes, commits, flushes = (int(n) for n in counted[-1].split()[-3:]) if counted else (0, 0, 0)
    locked = [line for line in log.read_text().splitlines() if line.startswith(LOCK)]
    if locked:
        wait, held = locked[-1].split()[-2:]
        print(
            f"     writer lock: {wait} ms waited, {held} ms held, in {elapsed:.1f} s; "
            f"{flushes} rounds of blob flushes"
        )
    return elapsed, user1 - user0, sys1 - sys0, stored, writes, commits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("DATA_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), int(args.worker[1]), args.profile)
        return 0
    files = make_ct_corpus(args.cache_dir / f"ct-512-{args.count}", args.count)
    warm_page_cache(files)
    failed = 0
    print(f"{len(files)} instances, {args.associations} association(s), one receiving process")
    print(
        "run  load   instances/s  CPU ms/instance (user + sys)  stored   index writes/transactions"
    )
    wait_out_deletions()
    # Every run's files stay until the last run ends: a deletion slows the file
    # creations after it (see _common.remove_tree).
    run_dirs: list[Path] = []
    with contextlib.ExitStack() as cleanup, Processes() as procs:
        if not args.keep:
            cleanup.callback(lambda: [remove_tree(d) for d in run_dirs])
        for n in range(args.repeat):
            run_dir = Path(tempfile.mkdtemp(prefix="receive-cpu-", dir=args.work_dir))
            run_dirs.append(run_dir)
            load = os.getloadavg()[0]
            profile = args.profile if n == args.repeat - 1 else None
            elapsed, user, system, stored, writes, commits = run_once(
                procs, files, args.associations, run_dir, profile
            )
            per = 1000 / len(files)
            print(
                f"{n + 1:>3}  {load:4.1f}  {len(files) / elapsed:>11.1f}  "
                f"{(user + system) * per:>6.2f} ({user * per:.2f} + {system * per:.2f})"
                f"{'':>12}{stored}/{len(files)}  {writes}/{commits}",
                flush=True,
            )
            failed += stored != len(files)
            if drop_page_cache():  # the next run in memory a run freed (_common.py)
                warm_page_cache(files)
    if args.profile:
        print(f"profile of the last run's association threads: {args.profile}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
