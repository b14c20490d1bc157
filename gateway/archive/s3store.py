"""Blobs in an S3-compatible object store (MinIO, AWS S3, SeaweedFS...) via ``minio``.

The same ``BlobStore`` contract as ``FileStore``: ``put_file`` (and ``place_file``)
returns only once the object store has answered that the whole object is stored, so
the index may then point at it (``sync`` has nothing left to do). What was stored
is checked against what was sent: every request body is checked by the server
(SHA-256 of the signed payload over HTTP, Content-MD5 over HTTPS), and the ETag the
store answers is compared with the MD5 (per part, for multipart uploads) of the
bytes read from the local file. Objects larger than the part size go up as
multipart uploads; frames are read with ranged GETs.

Every connection failure, timeout or 5xx answer becomes ``StorageUnavailable``
(retryable): a DICOM sender gets an out-of-resources status, an HTTP client a 503.
Messages name the endpoint and the S3 error code, never the credentials.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.sse import SseKMS, SseS3

from gateway.archive.blobstore import Placed, check_key
from gateway.archive.errors import NotFound, StorageUnavailable

log = logging.getLogger(__name__)

# S3 limits: parts are 5 MiB to 5 GiB (the last one may be smaller).
MIN_PART_SIZE = 5 * 1024 * 1024
_READ_BUFFER = 1024 * 1024
_MISSING_CODES = ("NoSuchKey", "NoSuchObject", "NotFound")
SseMode = Literal["", "s3", "kms"]


class S3Store:
    """Blobs as objects under an optional key prefix in one bucket."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "",
        secure: bool = True,
        prefix: str = "",
        sse: SseMode = "",
        kms_key_id: str = "",
        part_size: int = 16 * 1024 * 1024,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 2,
        create_bucket: bool = True,
        scratch_dir: Path | None = None,
    ) -> None:
        if not endpoint:
            raise ValueError("the S3 blob store needs an endpoint (host:port)")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        if sse == "kms" and not kms_key_id:
            raise ValueError("SSE-KMS needs a KMS key id")
        if sse == "kms" and not secure:
            # The S3 protocol (and the minio client) send KMS requests over TLS only:
            # refused here, at start, rather than on every upload.
            raise ValueError("SSE-KMS needs TLS to the object store (s3_secure = true)")
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.create_bucket = create_bucket
        self.scratch_dir = scratch_dir
        self._sse = SseS3() if sse == "s3" else SseKMS(kms_key_id, {}) if sse == "kms" else None
        # With SSE-KMS the ETag is not an MD5 of the content: nothing to compare it to.
        self._etag_is_md5 = sse != "kms"
        # Our own pool: minio's default waits minutes to connect and retries five
        # times, which would hold a C-STORE far longer than a sender waits for it.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=32,
            retries=urllib3.Retry(
                total=retries,
                backoff_factor=0.2,
                status_forcelist=[500, 502, 503, 504],
                # Let minio see the final 5xx answer (and so its S3 error code).
                raise_on_status=False,
            ),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region or None,
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    # -- bucket -----------------------------------------------------------------
    def prepare(self) -> None:
        """Check the bucket exists (creating it when allowed); StorageUnavailable if not."""
        with self._bucket_lock:
            if self._bucket_ready:
                return
            with self._errors("check the bucket"):
                if not self._client.bucket_exists(self.bucket):
                    if not self.create_bucket:
                        raise StorageUnavailable(
                            f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}"
                        )
                    with contextlib.suppress(S3Error):  # another gateway made it just now
                        self._client.make_bucket(self.bucket)
                    if not self._client.bucket_exists(self.bucket):
                        raise StorageUnavailable(
                            f"S3 bucket {self.bucket!r} could not be created at {self.endpoint}"
                        )
            self._bucket_ready = True

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    # -- writing ----------------------------------------------------------------
    def put_file(self, key: str, path: Path, *, move: bool) -> None:
        if not self._bucket_ready:
            self.prepare()
        name = self._name(key)
        try:
            size = os.stat(path).st_size
            src = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise StorageUnavailable(f"cannot read the file to store: {exc.strerror}") from exc
        with src:
            reader = _PartHasher(src, self.part_size)
            with self._errors("write"):
                result = self._client.put_object(
                    self.bucket,
                    name,
                    reader,  # type: ignore[arg-type]
                    size,
                    part_size=self.part_size,
                    sse=self._sse,
                )
        if reader.count != size:
            self._discard(name)
            raise StorageUnavailable("the file changed while it was being stored")
        expected = reader.etag()
        got = (result.etag or "").strip('"')
        if self._etag_is_md5 and got and got != expected:
            self._discard(name)
            raise StorageUnavailable(
                f"S3 store at {self.endpoint} holds other bytes than were sent "
                f"(ETag {got[:40]}, expected {expected})"
            )
        if move:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def place_file(self, key: str, path: Path, *, move: bool) -> Placed:
        # An object is durable once the store has answered: nothing left for ``sync``.
        self.put_file(key, path, move=move)
        return Placed(key)

    def sync(self, placed: Sequence[Placed]) -> None:
        """Nothing to do: ``place_file`` returned once each object was stored."""

    def _discard(self, name: str) -> None:
        with contextlib.suppress(MinioException, urllib3.exceptions.HTTPError, OSError):
            self._client.remove_object(self.bucket, name)

    # -- reading ----------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        raw = _ObjectReader(self, self._name(key))
        return io.BufferedReader(raw, buffer_size=_READ_BUFFER)  # type: ignore[return-value]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        name = self._name(key)
        with self._errors("read", key):
            resp = self._client.get_object(self.bucket, name, offset=start, length=length)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """A temporary local copy (streamed, never held in memory), removed afterwards."""
        if self.scratch_dir is not None:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=".dcm", prefix="s3-")
        except OSError as exc:
            raise StorageUnavailable(f"no room for a local copy: {exc.strerror}") from exc
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as src:
                while chunk := src.read(_READ_BUFFER):
                    out.write(chunk)
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._stat(key).size or 0)

    def modified(self, key: str) -> dt.datetime:
        last = self._stat(key).last_modified
        if last is None:
            raise StorageUnavailable(f"S3 store at {self.endpoint} gave no date for {key}")
        return last if last.tzinfo else last.replace(tzinfo=dt.UTC)

    def _stat(self, key: str) -> Any:
        with self._errors("read", key):
            return self._client.stat_object(self.bucket, self._name(key))

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.remove_object(self.bucket, self._name(key))

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        start = len(self.prefix)
        with self._errors("list"):
            for obj in self._client.list_objects(
                self.bucket, prefix=self.prefix + prefix, recursive=True
            ):
                key = obj.object_name[start:]
                if obj.is_dir or any(part.startswith(".") for part in key.split("/")):
                    continue  # our writability probes, not blobs
                yield key

    def check(self) -> None:
        """Write and remove a small probe object: proves the bucket takes writes now."""
        self.prepare()
        probe = f"{self.prefix}.probe/{socket.gethostname()}-{os.getpid()}"
        with self._errors("write"):
            self._client.put_object(self.bucket, probe, io.BytesIO(b"ok"), 2, sse=self._sse)
            self._client.remove_object(self.bucket, probe)

    # -- errors -----------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Translate minio/urllib3 failures into NotFound or StorageUnavailable."""
        try:
            yield
        except S3Error as exc:
            if key is not None and exc.code in _MISSING_CODES:
                raise NotFound(f"blob {key} is missing") from exc
            raise StorageUnavailable(
                f"S3 store at {self.endpoint} refused to {action}: {exc.code}"
            ) from exc
        except (ServerError, InvalidResponseError) as exc:
            raise StorageUnavailable(
                f"S3 store at {self.endpoint} failed to {action} (server error)"
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(
                f"S3 store at {self.endpoint} is unreachable: cannot {action}"
            ) from exc


class _PartHasher:
    """Reads a file for upload, computing the ETag S3 will give the object.

    S3's ETag is the MD5 of the content for a single PUT, and for a multipart upload
    the MD5 of the concatenated part MD5s followed by ``-<parts>``. minio cuts parts
    at exact multiples of the part size, so the same cuts are made here.
    """

    def __init__(self, src: BinaryIO, part_size: int) -> None:
        self._src = src
        self._part_size = part_size
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self._digests: list[bytes] = []
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.count += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_size - self._in_part)
            self._part.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == self._part_size:
                self._digests.append(self._part.digest())
                self._part = hashlib.md5(usedforsecurity=False)
                self._in_part = 0
        return data

    def etag(self) -> str:
        digests = list(self._digests)
        if self._in_part or not digests:
            digests.append(self._part.digest())
        if len(digests) == 1:
            return digests[0].hex()
        combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(digests)}"


class _ObjectReader(io.RawIOBase):
    """A seekable read-only view of one object: a streaming GET from the current
    position, reopened with a range whenever the reader seeks elsewhere."""

    def __init__(self, store: S3Store, name: str) -> None:
        super().__init__()
        self._store = store
        self._name = name
        self._key = name[len(store.prefix) :]
        self._pos = 0
        self._resp: Any = None
        self._resp_pos = -1
        # The first GET fetches the whole object and tells its size; a missing
        # object is reported here, as FileStore.open does.
        self._open_at(0)
        self._size = int(self._resp.headers.get("Content-Length", "0"))

    def _open_at(self, pos: int) -> None:
        self._drop()
        with self._store._errors("read", self._key):
            self._resp = self._store._client.get_object(self._store.bucket, self._name, offset=pos)
        self._resp_pos = pos

    def _drop(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
                self._resp.release_conn()
            self._resp = None

    @property
    def name(self) -> str:  # what pydicom records as the data set's filename
        return f"s3://{self._store.bucket}/{self._name}"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:
            pos = self._size + offset
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        if self._resp is None or self._resp_pos != self._pos:
            self._open_at(self._pos)
        with self._store._errors("read", self._key):
            count = self._resp.readinto(buffer)
        if not count:
            raise StorageUnavailable(f"S3 object {self._key} ended early")
        self._pos += count
        self._resp_pos += count
        return int(count)

    def close(self) -> None:
        self._drop()
        super().close()
