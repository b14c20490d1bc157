"""Horizontal scale: C-STORE throughput of one vs two `studybridge serve` processes.

Both configurations run on the production backend (PostgreSQL on ``--pg-admin-url``
and a SeaweedFS S3 server, as ``bench/ingest.py --backend production``) and share
one index database and one bucket prefix, as gateways behind a load balancer do.
The same corpus (``--count`` CT slices of 512x512, bench/ingest.py's) is pushed
with ``--associations`` storescu processes: all to the one gateway, or split
evenly over the two. Each configuration runs ``--repeat`` times from an empty
index; the table gives the median instances/s and the ratio two/one.

On one machine both gateways share its cores, so the ratio shows what a second
process adds there (and that nothing is lost or duplicated: every run is counted
in the index); on separate machines each gateway brings its own.

Usage:
    python bench/gateways.py [--count 400] [--associations 4] [--repeat 3]
                             [--dimse-workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Processes, free_port, load_average, wait_for_port
from ingest import (
    BENCH_DIR,
    DEFAULT_BROKER,
    MAX_PDU,
    ProductionBackend,
    child_env,
    make_ct_corpus,
    push,
    split,
    warm_page_cache,
)

AET = "STUDYBRIDGE"


def start_gateway(procs: Processes, run_dir: Path, env: dict[str, str], workers: int) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    port, http = free_port(), free_port()
    argv = [
        sys.executable, "-m", "gateway.cli", "serve", "--data-dir", str(run_dir / "data"),
        "--dimse-port", str(port), "--http-port", str(http), "--dimse-workers", str(workers),
    ]  # fmt: skip
    log = run_dir / "server.log"
    proc = procs.start(argv, log=log, env=env, cwd=run_dir)
    wait_for_port(port, proc, 120, log)
    wait_for_port(http, proc, 120, log)
    return port


def run(
    backend: ProductionBackend,
    files: list[Path],
    gateways: int,
    associations: int,
    workers: int,
    work: Path,
    name: str,
) -> float:
    """Push the corpus through ``gateways`` gateways; instances/s (0 if any was lost)."""
    env = child_env(
        {
            "STUDYBRIDGE_ACCEPT_UNKNOWN_PEERS": "true",
            "STUDYBRIDGE_AE_TITLE": AET,
            "STUDYBRIDGE_DIMSE_HOST": "127.0.0.1",
            "STUDYBRIDGE_HTTP_HOST": "127.0.0.1",
            "STUDYBRIDGE_MAX_PDU_SIZE": str(MAX_PDU),
            **backend.start_run(name),
        }
    )
    with Processes() as procs:
        (work / name).mkdir(parents=True, exist_ok=True)
        backend.start_worker(procs, work / name, env)
        ports = [
            start_gateway(procs, work / name / f"gw{i}", env, workers) for i in range(gateways)
        ]
        groups = split([str(f) for f in files], gateways)
        per_gateway = max(1, associations // gateways)
        seconds: list[float] = [0.0] * gateways
        errors: list[BaseException] = []

        def send(i: int) -> None:
            try:
                log_dir = work / name / f"push{i}"
                log_dir.mkdir(parents=True, exist_ok=True)
                seconds[i] = push(ports[i], AET, [Path(f) for f in groups[i]], per_gateway, log_dir)
            except BaseException as exc:
                errors.append(exc)

        started = time.perf_counter()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(gateways)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        if errors:
            raise errors[0]
    stored = backend.count_instances()
    if stored != len(files):
        print(f"  {name}: FAILED, {stored} of {len(files)} instances in the index")
        return 0.0
    return len(files) / wall


def compare(
    backend: ProductionBackend,
    files: list[Path],
    associations: int,
    workers: int,
    repeat: int,
    work_dir: Path | None = None,
) -> dict[str, object]:
    """One, then two gateways, ``repeat`` times each; prints and returns the medians."""
    work = Path(tempfile.mkdtemp(prefix="sb-bench-gateways-", dir=work_dir))
    results: dict[int, list[float]] = {1: [], 2: []}
    print(f"\ngateways: {len(files)} CT slices; {associations} storescu associations; "
          f"{workers} receiving processes per gateway; one Celery worker; "
          f"load {load_average()}")  # fmt: skip
    try:
        for r in range(repeat):
            for gateways in (1, 2):
                name = f"g{gateways}-r{r}"
                rate = run(backend, files, gateways, associations, workers, work, name)
                results[gateways].append(rate)
                print(f"  {name}: {rate:.1f} instances/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(results[1])
    two = statistics.median(results[2])
    ratio = two / one if one else 0.0
    print(f"{'gateways':>9} {'instances/s (median)':>22}")
    print(f"{1:>9} {one:>22.1f}")
    print(f"{2:>9} {two:>22.1f}")
    print(f"ratio two/one: {ratio:.2f} (load {load_average()})")
    return {"one": results[1], "two": results[2], "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=400, help="CT slices in the corpus")
    p.add_argument("--associations", type=int, default=4, help="storescu processes in all")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dimse-workers", type=int, default=2, help="receiving processes per gateway")
    p.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--broker-url", default=DEFAULT_BROKER, help="Redis of the Celery worker")
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / "out")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    files = make_ct_corpus(args.cache_dir / f"ct-{args.count}", args.count)
    warm_page_cache(files)
    with ProductionBackend(args.pg_admin_url, None, args.broker_url) as backend:
        figures = compare(backend, files, args.associations, args.dimse_workers, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
