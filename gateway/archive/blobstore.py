"""Where instance bytes live: the ``BlobStore`` interface and its filesystem implementation.

A blob is written once under a key built from validated UIDs and never changed.
``put_file`` returns only when the bytes are durable (for files: written, fsynced,
linked or renamed into place, directory fsynced), so the index may then point at them.

``place_file`` + ``sync`` split that in two for callers that store many blobs at
once (the ingest of concurrent receivers): ``place_file`` puts the blob in place and
may return before it is durable (a ``Placed`` saying what is still to flush), and
``sync`` makes a whole list of them durable in one pass (every pending file fsynced
and every distinct directory fsynced, all at once), so a batch of instances waits for
one round of flushes instead of one each. Until ``sync`` returned for it, nothing may
point at a placed blob; one that never becomes durable is an unindexed orphan (a
retry replaces it, the orphan sweep removes it).

Callers see only this interface; an S3 implementation slots in beside ``FileStore``
(its objects are durable when stored: its ``place_file`` stores, its ``sync`` has
nothing to do).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from gateway.archive.errors import NotFound, StorageUnavailable

_COPY_CHUNK = 1024 * 1024
_KEY_SAFE = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._-/")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (absolute, '..', odd characters)."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or not set(key) <= _KEY_SAFE
    ):
        raise ValueError(f"unsafe blob key {key[:100]!r}")
    return key


@dataclass(frozen=True)
class Placed:
    """A blob put in place under ``key`` by ``place_file``, and what is still to be
    flushed before it is durable (None: nothing)."""

    key: str
    file: Path | None = None
    directory: Path | None = None

    @property
    def durable(self) -> bool:
        return self.file is None and self.directory is None


class BlobStore(Protocol):
    """Durable, immutable storage of blobs by key."""

    def put_file(self, key: str, path: Path, *, move: bool) -> None:
        """Store the file at ``path`` under ``key``; durable on return.

        With ``move`` the store may take the file (rename) instead of copying it.
        Raises StorageUnavailable when the backend cannot take it.
        """

    def place_file(self, key: str, path: Path, *, move: bool) -> Placed:
        """Like ``put_file``, but the blob may not be durable yet on return: it is once
        ``sync`` of a list holding the result returned. Raises StorageUnavailable."""

    def sync(self, placed: Sequence[Placed]) -> None:
        """Make every blob of ``placed`` durable, in one pass for all of them; raises
        StorageUnavailable if any may not be (none of them then counts as durable)."""

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the blob (NotFound if absent)."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``."""

    def local_path(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A context giving a local file path holding the blob (a temp copy if needed)."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None: ...

    def iter_keys(self, prefix: str = "") -> Iterator[str]: ...

    def modified(self, key: str) -> dt.datetime:
        """When the blob was written (UTC); NotFound if absent. Sweeps judge age by it."""

    def check(self) -> None:
        """Raise StorageUnavailable unless the store can be written now."""


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting.

    A staged file is fsynced when it becomes a blob, a few milliseconds after its last
    byte arrived (the header is parsed and checked in between): started here, the
    writeback runs during that work and the fsync then waits less. Only a hint:
    durability still comes from that fsync, which also reports any write error (this
    call neither waits for the writes nor consumes their errors). Linux only; a no-op
    elsewhere or when it fails.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What ``_link_new`` found.
_LINKED, _EXISTS, _NO_LINK, _OTHER_DEVICE = range(4)


def _link_new(path: Path, target: Path) -> int:
    """Give ``path`` the new name ``target``: ``_LINKED``, or why not: ``_EXISTS``
    (``target`` exists), ``_NO_LINK`` (the filesystem has no hard links),
    ``_OTHER_DEVICE`` (``path`` is on another filesystem than ``target``)."""
    try:
        os.link(path, target)
    except FileExistsError:
        return _EXISTS
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return _OTHER_DEVICE
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            return _NO_LINK
        raise
    return _LINKED


_syncer: ThreadPoolExecutor | None = None
_syncer_lock = threading.Lock()
# fsyncs of one pass that run at once (a batch holds a few instances per receiver
# thread of the process; fsync waits on the disk, not on a core).
_SYNC_THREADS = 8


def sync_all(files: Sequence[Path], directories: Sequence[Path]) -> None:
    """fsync every file and directory given, all at once (the filesystem commits the
    concurrent ones together), and wait for all of them; raises the first OSError.

    One file and its directory (the usual round of a receiver) are flushed one after
    the other in this thread, the file first: on a journaling filesystem (ext4, XFS)
    its fsync commits the journal that holds the new directory entry too, so the
    directory's then returns at once; handing one of them to a pool thread costs CPU
    (thread wake-ups, the GIL passed back and forth) for no time saved."""
    unique_files, unique_dirs = list(dict.fromkeys(files)), list(dict.fromkeys(directories))
    if len(unique_files) <= 1 and len(unique_dirs) <= 1:
        for path in unique_files:
            _fsync_path(path)
        for path in unique_dirs:
            fsync_dir(path)
        return
    global _syncer
    if _syncer is None:
        with _syncer_lock:
            if _syncer is None:
                _syncer = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="fsync")
    jobs: list[tuple[Callable[[Path], None], Path]] = [
        *((fsync_dir, d) for d in unique_dirs),
        *((_fsync_path, f) for f in unique_files),
    ]
    # The last one in this thread, the others in the pool's.
    futures: list[Future[None]] = [_syncer.submit(call, path) for call, path in jobs[:-1]]
    error: OSError | None = None
    try:
        jobs[-1][0](jobs[-1][1])
    except OSError as exc:
        error = exc
    for future in futures:
        try:
            future.result()
        except OSError as exc:
            error = error or exc
    if error is not None:
        raise error


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Blobs as files below a root folder (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(_describe_os_error(exc, "create its folder")) from exc
        # Directories known to exist and be durable in this process: saves a
        # mkdir and a parent fsync per instance of a series.
        self._known_dirs: set[Path] = set()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        directory.mkdir(parents=True, exist_ok=True)
        # A new directory entry is durable only once its parent is fsynced.
        for created in reversed(missing):
            fsync_dir(created.parent)
        self._known_dirs.add(directory)

    def put_file(self, key: str, path: Path, *, move: bool) -> None:
        placed = self.place_file(key, path, move=move)
        try:
            self.sync([placed])
        except StorageUnavailable:
            # Nothing points at it, and it may not hold its bytes: not left behind.
            if placed.file is not None:
                with contextlib.suppress(OSError):
                    placed.file.unlink()
            raise

    def sync(self, placed: Sequence[Placed]) -> None:
        files = [p.file for p in placed if p.file is not None]
        directories = [p.directory for p in placed if p.directory is not None]
        try:
            sync_all(files, directories)
        except OSError as exc:
            for directory in directories:
                self._known_dirs.discard(directory)
            raise StorageUnavailable(_describe_os_error(exc, "write")) from exc

    def place_file(self, key: str, path: Path, *, move: bool) -> Placed:
        target = self._path(key)
        staged: Path | None = None
        try:
            self._ensure_dir(target.parent)
            # Whether ``path`` is on the store's filesystem is the link's answer (EXDEV),
            # not asked beforehand: the staging folder nearly always is.
            linked = _link_new(path, target) if move else _OTHER_DEVICE
            if linked != _OTHER_DEVICE:
                if linked == _LINKED:
                    # A new name for the staged file: its bytes and the new directory
                    # entry become durable by the fsyncs of ``sync`` (of the file and
                    # of its directory, run at once with those of the other blobs of
                    # the batch: the filesystem commits them together). Until they
                    # return nothing points at the blob; a crash before leaves an
                    # unindexed file that a retry replaces (below) or the orphan sweep
                    # removes. The staging name needs no durability.
                    os.unlink(path)
                    return Placed(key, file=target, directory=target.parent)
                # The key exists already (a concurrent or earlier copy of the same
                # bytes): replace it only with a file whose bytes are durable.
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # (Were it only placed, a crash could leave the copy the index already
                # points at without its bytes.)
                os.replace(path, target)
            else:
                # A unique temporary name: several threads of one process may store
                # the same key at once (a sender retrying), and must not share a file.
                fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
                staged = Path(name)
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    _copy(src, out)
                    os.fsync(out.fileno())
                os.replace(staged, target)
                staged = None
                if move:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            # The bytes under the key are durable already (they replaced a name that
            # may be indexed): only the directory entry is left for ``sync``.
            return Placed(key, directory=target.parent)
        except OSError as exc:
            self._known_dirs.discard(target.parent)
            if staged is not None:
                # A partial copy must not stay behind (and fill the disk further).
                with contextlib.suppress(OSError):
                    staged.unlink()
            raise StorageUnavailable(_describe_os_error(exc, "write")) from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is missing") from exc
        except OSError as exc:
            raise StorageUnavailable(_describe_os_error(exc, "read")) from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.open(key) as fh:
            fh.seek(start)
            return fh.read(length)

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.exists():
            raise NotFound(f"blob {key} is missing")
        yield path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is missing") from exc

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def modified(self, key: str) -> dt.datetime:
        try:
            mtime = self._path(key).stat().st_mtime
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is missing") from exc
        return dt.datetime.fromtimestamp(mtime, dt.UTC)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue  # an interrupted copy, not a blob
                yield str(Path(dirpath, name).relative_to(self.root))

    def check(self) -> None:
        probe = self.root / f".probe.{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailable(_describe_os_error(exc, "write")) from exc


def _copy(src: BinaryIO, out: BinaryIO) -> None:
    """Copy a whole file in the kernel where it can (sendfile), else through a buffer."""
    try:
        offset, size = 0, os.fstat(src.fileno()).st_size
        while offset < size:
            sent = os.sendfile(out.fileno(), src.fileno(), offset, size - offset)
            if sent == 0:
                break
            offset += sent
        if offset == size:
            return
        src.seek(offset)
        out.seek(offset)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise
        src.seek(0)
        out.seek(0)
        out.truncate()
    shutil.copyfileobj(src, out, _COPY_CHUNK)
    out.flush()


def _describe_os_error(exc: OSError, action: str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"blob store is full: cannot {action}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"blob store is not writable: cannot {action}"
    return f"blob store cannot {action}: {exc.strerror or exc.__class__.__name__}"
