"""FileStore: durable, immutable blobs by key."""

from __future__ import annotations

import errno
import os
import resource
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.archive.blobstore import FileStore, check_key
from gateway.archive.errors import NotFound, StorageUnavailable

pytestmark = pytest.mark.fast


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "blobs")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def source(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_put_copy_and_read_back(store: FileStore, tmp_path: Path):
    data = os.urandom(3000)
    src = source(tmp_path, "a", data)
    store.put_file("studies/1.2/1.3/1.4.abc.dcm", src, move=False)
    assert src.read_bytes() == data  # copied, not taken
    assert store.exists("studies/1.2/1.3/1.4.abc.dcm")
    assert store.size("studies/1.2/1.3/1.4.abc.dcm") == 3000
    with store.open("studies/1.2/1.3/1.4.abc.dcm") as fh:
        assert fh.read() == data
    assert store.read_range("studies/1.2/1.3/1.4.abc.dcm", 100, 50) == data[100:150]
    with store.local_path("studies/1.2/1.3/1.4.abc.dcm") as path:
        assert path.read_bytes() == data
    assert list(store.iter_keys()) == ["studies/1.2/1.3/1.4.abc.dcm"]
    assert files_under(store.root) == ["studies/1.2/1.3/1.4.abc.dcm"]


def test_put_move_takes_the_file(store: FileStore, tmp_path: Path):
    data = os.urandom(1000)
    src = source(tmp_path, "a", data)
    store.put_file("k/a.dcm", src, move=True)
    assert not src.exists()
    with store.open("k/a.dcm") as fh:
        assert fh.read() == data


@pytest.mark.parametrize(("errno_", "how"), [(errno.EXDEV, "copied"), (errno.EPERM, "renamed")])
def test_move_without_a_hard_link_still_takes_the_file(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, how: str
):
    """A staged file on another filesystem is copied (EXDEV); on a filesystem without
    hard links it is renamed into place: either way the key holds it and it is gone."""
    from gateway.archive import blobstore

    def no_link(_src: object, _dst: object) -> None:
        raise OSError(errno_, os.strerror(errno_))

    copies: list[object] = []
    copy = blobstore._copy
    monkeypatch.setattr(blobstore.os, "link", no_link)
    monkeypatch.setattr(blobstore, "_copy", lambda src, out: (copies.append(src), copy(src, out)))
    data = os.urandom(1000)
    src = source(tmp_path, "a", data)
    placed = store.place_file("k/a.dcm", src, move=True)
    store.sync([placed])
    assert not src.exists()
    assert (len(copies) == 1) == (how == "copied")
    with store.open("k/a.dcm") as fh:
        assert fh.read() == data
    assert files_under(store.root) == ["k/a.dcm"]


def test_move_of_a_missing_file_is_storage_unavailable(store: FileStore, tmp_path: Path):
    with pytest.raises(StorageUnavailable):
        store.place_file("k/a.dcm", tmp_path / "nope", move=True)
    assert files_under(store.root) == []


def test_replacing_a_key_and_deleting(store: FileStore, tmp_path: Path):
    store.put_file("k/a", source(tmp_path, "1", b"one"), move=False)
    store.put_file("k/a", source(tmp_path, "2", b"two"), move=False)
    assert store.read_range("k/a", 0, 10) == b"two"
    store.delete("k/a")
    store.delete("k/a")  # deleting a missing blob is fine
    assert not store.exists("k/a")
    assert list(store.iter_keys()) == []


def test_missing_blobs_are_not_found(store: FileStore):
    with pytest.raises(NotFound):
        store.open("k/none")
    with pytest.raises(NotFound):
        store.size("k/none")
    with pytest.raises(NotFound), store.local_path("k/none"):
        pass
    assert not store.exists("k/none")


def test_iter_keys_by_prefix_skips_temporary_files(store: FileStore, tmp_path: Path):
    store.put_file("studies/1/a", source(tmp_path, "1", b"1"), move=False)
    store.put_file("quarantine/b", source(tmp_path, "2", b"2"), move=False)
    (store.root / "studies" / "1" / ".a.123.tmp").write_bytes(b"partial")
    assert sorted(store.iter_keys()) == ["quarantine/b", "studies/1/a"]
    assert list(store.iter_keys("quarantine")) == ["quarantine/b"]


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../b",
        "a//b",
        "./a",
        "a/./b",
        "a/..",
        "a b",
        "a\\b",
        "ü",
        "a/b\x00",
        "a;rm",
    ],
)
def test_unsafe_keys_are_refused(store: FileStore, tmp_path: Path, key: str):
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        store.put_file(key, source(tmp_path, "x", b"x"), move=False)
    with pytest.raises(ValueError):
        store.open(key)
    assert files_under(store.root) == []


def test_concurrent_writers_of_one_key_never_corrupt_it(store: FileStore, tmp_path: Path):
    """Threads of one process storing the same key (a sender retrying on another
    association) each use their own temporary file."""
    data = os.urandom(4 * 1024 * 1024)
    sources = [source(tmp_path, str(i), data) for i in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sources))

    def put(src: Path) -> None:
        barrier.wait()
        try:
            store.put_file("studies/1/x.dcm", src, move=False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.open("studies/1/x.dcm") as fh:
        assert fh.read() == data
    assert files_under(store.root) == ["studies/1/x.dcm"]


def test_root_that_is_a_file_is_storage_unavailable(tmp_path: Path):
    """Root ignores permissions, so an unwritable store is made of a file in the way."""
    blocker = tmp_path / "blobs"
    blocker.write_bytes(b"")
    with pytest.raises(StorageUnavailable):
        FileStore(blocker)
    with pytest.raises(StorageUnavailable):
        FileStore(blocker / "below")


def test_store_broken_after_start_is_storage_unavailable(store: FileStore, tmp_path: Path):
    store.put_file("studies/1/a", source(tmp_path, "1", b"1"), move=False)
    store.check()
    for path in sorted(store.root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    store.root.rmdir()
    store.root.write_bytes(b"in the way")
    with pytest.raises(StorageUnavailable):
        store.check()
    # Even for a folder the store knew to exist already.
    with pytest.raises(StorageUnavailable):
        store.put_file("studies/1/b", source(tmp_path, "2", b"2"), move=False)
    with pytest.raises(StorageUnavailable):
        store.put_file("studies/2/c", source(tmp_path, "3", b"3"), move=True)


def test_full_disk_leaves_no_partial_file(store: FileStore, tmp_path: Path):
    """RLIMIT_FSIZE gives EFBIG past the limit, for root too: a stand-in for ENOSPC."""
    src = source(tmp_path, "big", os.urandom(256 * 1024))
    store.put_file("warm/up", source(tmp_path, "small", b"s"), move=False)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(StorageUnavailable, match="full"):
            store.put_file("studies/1/big", src, move=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert files_under(store.root) == ["warm/up"]
    assert src.stat().st_size == 256 * 1024
    store.put_file("studies/1/big", src, move=False)
    assert store.size("studies/1/big") == 256 * 1024


def test_missing_source_is_storage_unavailable(store: FileStore, tmp_path: Path):
    with pytest.raises(StorageUnavailable):
        store.put_file("k/a", tmp_path / "nope", move=False)
    assert files_under(store.root) == []


def test_a_placed_blob_is_flushed_by_sync_each_file_and_each_directory_once(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from gateway.archive import blobstore

    synced: list[tuple[str, str]] = []
    file_sync, dir_sync = blobstore._fsync_path, blobstore.fsync_dir
    monkeypatch.setattr(
        blobstore, "_fsync_path", lambda p: (synced.append(("file", str(p))), file_sync(p))
    )
    monkeypatch.setattr(
        blobstore, "fsync_dir", lambda p: (synced.append(("dir", str(p))), dir_sync(p))
    )
    store.put_file("warm/up", source(tmp_path, "w", b"w"), move=False)  # folders exist now
    (store.root / "studies" / "1").mkdir(parents=True)
    store._known_dirs.add(store.root / "studies" / "1")
    synced.clear()

    placed = [
        store.place_file(f"studies/1/{name}", source(tmp_path, name, name.encode()), move=True)
        for name in ("a", "b", "c")
    ]
    # In place but not flushed yet: nothing may point at them before sync returns.
    assert synced == []
    assert [p.durable for p in placed] == [False, False, False]
    assert store.exists("studies/1/a")

    store.sync(placed)
    assert sorted(synced) == [
        ("dir", str(store.root / "studies" / "1")),
        *(("file", str(store.root / "studies" / "1" / n)) for n in ("a", "b", "c")),
    ]


def test_a_round_of_one_blob_is_flushed_in_the_calling_thread_file_first(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The file's fsync commits its new directory entry too (journaling filesystems):
    then the directory's returns at once, with no pool thread woken for it."""
    from gateway.archive import blobstore

    synced: list[tuple[str, str, str]] = []
    file_sync, dir_sync = blobstore._fsync_path, blobstore.fsync_dir
    here = threading.current_thread().name

    def record(kind: str, real: Callable[[Path], None]) -> Callable[[Path], None]:
        def call(path: Path) -> None:
            synced.append((kind, path.name, threading.current_thread().name))
            real(path)

        return call

    monkeypatch.setattr(blobstore, "_fsync_path", record("file", file_sync))
    monkeypatch.setattr(blobstore, "fsync_dir", record("dir", dir_sync))
    store.put_file("warm/up", source(tmp_path, "w", b"w"), move=False)  # folders exist now
    store._known_dirs.add(store.root / "warm")
    synced.clear()
    store.sync([store.place_file("warm/a", source(tmp_path, "a", b"a"), move=True)])
    assert synced == [("file", "a", here), ("dir", "warm", here)]


def test_a_failed_sync_is_storage_unavailable_and_put_file_leaves_nothing(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from gateway.archive import blobstore

    def failing(_path: Path) -> None:
        raise OSError(5, "Input/output error")

    placed = store.place_file("k/a", source(tmp_path, "a", b"a"), move=True)
    monkeypatch.setattr(blobstore, "_fsync_path", failing)
    with pytest.raises(StorageUnavailable):
        store.sync([placed])
    with pytest.raises(StorageUnavailable):
        store.put_file("k/b", source(tmp_path, "b", b"b"), move=True)
    assert not store.exists("k/b")  # not flushed: not left under its key
