"""Starting real servers for integration tests: studybridge itself and dcmtk peers.

Everything listens on 127.0.0.1 only and is stopped by the fixture that started it.
dcmtk tools are called by absolute path (/usr/bin/...) because pynetdicom installs
console scripts with the same names on PATH.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DCMTK = Path("/usr/bin")


def missing(message: str) -> NoReturn:
    """A service or tool a test needs is absent: skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


REDIS_URL = "redis://127.0.0.1:6379/0"


def require_redis() -> None:
    """Redis at 127.0.0.1:6379 (the production broker): skip locally, fail in CI."""
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", 6379)) != 0:
            missing("Redis at 127.0.0.1:6379 is not running")


def production_env(pg_url: str, s3_env: dict[str, str]) -> dict[str, str]:
    """Settings (as STUDYBRIDGE_* variables) of gateways and a worker on the production
    combination: PostgreSQL at ``pg_url``, the S3 store of ``s3_env``, and Celery over
    Redis on a queue of their own (a worker must run: see ``running_worker``)."""
    import uuid

    require_redis()
    return {
        "STUDYBRIDGE_DATABASE_URL": pg_url,
        **s3_env,
        "STUDYBRIDGE_TASK_BROKER_URL": REDIS_URL,
        "STUDYBRIDGE_TASK_QUEUE": f"sbtest-{uuid.uuid4().hex[:10]}",
        "STUDYBRIDGE_TASK_SERIES_PAUSE": "1",
    }


def require_tool(name: str) -> str:
    """Absolute path of a dcmtk tool; a missing tool skips locally and fails in CI."""
    path = DCMTK / name
    if not path.exists():
        missing(f"dcmtk's {name} is not installed (apt-get install dcmtk)")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def dcmtk_env() -> dict[str, str]:
    # Debian's dcmtk leaves Nagle's algorithm on unless told otherwise.
    return {**os.environ, "TCP_NODELAY": "1"}


def run_tool(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False
    )


@dataclass
class Gateway:
    """A running ``studybridge serve`` in a subprocess."""

    data_dir: Path
    dimse_port: int
    http_port: int
    ae_title: str = "STUDYBRIDGE"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"studybridge {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self, *extra: str) -> None:
        assert self.log_path is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--dimse-port",
                str(self.dimse_port),
                "--http-port",
                str(self.http_port),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        wait_port(self.dimse_port, 60, self.proc)
        wait_port(self.http_port, 60, self.proc)
        # The supervisor listens on the DIMSE port before its receiving processes run.
        deadline = time.monotonic() + 60
        while "studybridge ready" not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve not ready: {self.log_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise
        return int(self.proc.returncode)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def staff(self, username: str = "clerk", institution: str = "Test Hospital") -> list[str]:
        """A staff account of ``institution`` (registered too if new), for commands that
        act as someone (``forward --as``): returns the ``--as`` arguments."""
        self.cli("institutions", "add", institution, check=False)  # may exist already
        self.cli("users", "add", username, "--kind", "staff", "--institution", institution,
                 "--role", "clerk")  # fmt: skip
        return ["--as", username]

    def access_token(self, institution: str, client_id: str = "test-client") -> str:
        """A real access token of a DICOMweb client of ``institution``: registered with
        the CLI (``institutions add``, ``add-client``), then OAuth 2 client credentials
        at ``/api/token`` of the running server."""
        import httpx

        self.cli("institutions", "add", institution, check=False)  # may exist already
        created = self.cli("institutions", "add-client", institution, client_id).stdout
        # The console may wrap the long secret: read it with whitespace removed.
        secret = re.search(r"shownonce\):(\S+)", "".join(created.split()))
        assert secret, created
        answer = httpx.post(
            f"http://127.0.0.1:{self.http_port}/api/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret.group(1),
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token


def process_group_alive(pgid: int, wait: float = 5.0) -> bool:
    """Whether any process of the group still runs after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


@contextlib.contextmanager
def running_gateway(tmp: Path, env_extra: dict[str, str] | None = None) -> Iterator[Gateway]:
    env = {**os.environ, **(env_extra or {})}
    env.pop("STUDYBRIDGE_CONFIG", None)
    gw = Gateway(
        data_dir=tmp / "var",
        dimse_port=free_port(),
        http_port=free_port(),
        env=env,
        log_path=tmp / "serve.log",
    )
    try:
        yield gw
    finally:  # also when the test fails: a leaked gateway keeps its ports and a core busy
        if gw.proc is not None and gw.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                gw.stop()
        if gw.proc is not None and process_group_alive(gw.proc.pid):
            os.killpg(gw.proc.pid, signal.SIGKILL)


class Worker:
    """A running ``studybridge worker`` (Celery) in a subprocess of its own group."""

    def __init__(self, data_dir: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - kept for the process lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--data-dir", str(data_dir),
             "--concurrency", "1", "--no-beat"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "ready." not in self.log() and self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"worker not ready after 60 s: {self.log()[-2000:]}")
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def succeeded(self, name: str) -> int:
        """How many runs of the task ``name`` finished successfully (from its log)."""
        return sum(1 for line in self.log().splitlines() if name in line and "succeeded" in line)

    def wait_succeeded(self, name: str, at_least: int = 1, timeout: float = 60.0) -> None:
        """Until the task ``name`` has succeeded ``at_least`` times (a deadline for a
        task queued by another process, not a speed check)."""
        deadline = time.monotonic() + timeout
        while self.succeeded(name) < at_least:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker ran {name} fewer than {at_least} times: "
                                     f"{self.log()[-3000:]}")  # fmt: skip
            time.sleep(0.1)

    def failures(self) -> list[str]:
        """Log lines of task runs that failed (Celery's 'raised unexpected')."""
        return [line for line in self.log().splitlines() if "raised unexpected" in line]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def running_worker(data_dir: Path, env: dict[str, str], log_path: Path) -> Iterator[Worker]:
    worker = Worker(data_dir, env, log_path)
    try:
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def storescp(
    tmp: Path,
    ae_title: str = "DEST",
    *,
    accept_all: bool = True,
    tls: tuple[Path, Path, Path] | None = None,
) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp writing into a folder; accepting every transfer syntax, or
    (``accept_all=False``) only the uncompressed ones, as dcmtk does by default.
    ``tls`` = (key, certificate, CA): DICOM TLS only, with the BCP 195 profile, and a
    client certificate of that CA required (dcmtk's defaults for ``+tls``)."""
    exe = require_tool("storescp")
    port = free_port()
    out = tmp / f"storescp-{ae_title}"
    out.mkdir(parents=True, exist_ok=True)
    syntaxes = ["+xa"] if accept_all else []
    if tls is not None:
        key, cert, ca = tls
        syntaxes += ["+tls", str(key), str(cert), "+cf", str(ca)]
    proc = subprocess.Popen(
        [exe, "-aet", ae_title, *syntaxes, "+uf", "-od", str(out), "--fork", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
        start_new_session=True,
    )
    try:
        wait_port(port, 20, proc)
        yield port, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information of a Part 10 file."""
    from gateway.archive.part10 import read_meta

    with open(path, "rb") as fh:
        _meta, offset = read_meta(fh)
        fh.seek(offset)
        return fh.read()


def which(name: str) -> str | None:
    return shutil.which(name)


@contextlib.contextmanager
def dcmqrscp(
    tmp: Path, ae_title: str = "CLINIC", move_destinations: dict[str, int] | None = None
) -> Iterator[tuple[int, Path]]:
    """dcmtk's dcmqrscp: a small PACS (C-STORE into it, C-FIND, C-MOVE out of it).

    ``move_destinations`` maps AE titles on 127.0.0.1 to their ports (C-MOVE targets).
    Runs in its default fork mode: single-process mode crashes after a release.
    """
    exe = require_tool("dcmqrscp")
    port = free_port()
    store = tmp / f"dcmqrscp-{ae_title}"
    store.mkdir(parents=True, exist_ok=True)
    hosts = "\n".join(
        f"dest{i} = ({ae}, 127.0.0.1, {p})"
        for i, (ae, p) in enumerate((move_destinations or {}).items())
    )
    cfg = tmp / f"dcmqrscp-{ae_title}.cfg"
    cfg.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\n{hosts}\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\n{ae_title} {store} RW (1000, 1024mb) ANY\nAETable END\n"
    )
    proc = subprocess.Popen(
        [exe, "-c", str(cfg), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
        start_new_session=True,
        cwd=tmp,
    )
    try:
        wait_port(port, 20, proc)
        yield port, store
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
