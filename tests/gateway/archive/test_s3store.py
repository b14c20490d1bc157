"""S3Store against a real S3-compatible server (SeaweedFS started by the tests)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from gateway.archive import make_blob_store
from gateway.archive.errors import NotFound, StorageUnavailable
from gateway.archive.s3store import S3Store, _PartHasher
from gateway.config import Settings
from tests.s3server import ACCESS_KEY, SECRET_KEY, SeaweedFS

pytestmark = pytest.mark.integration
PART = 5 * 1024 * 1024


def make_store(server: SeaweedFS, **extra: object) -> S3Store:
    options: dict = {
        "endpoint": server.endpoint,
        "bucket": "studybridge",
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "secure": False,
        "prefix": f"t-{uuid.uuid4().hex[:10]}",
        "part_size": PART,
        "connect_timeout": 1.0,
        "read_timeout": 10.0,
        "retries": 0,
        **extra,
    }
    return S3Store(**options)


@pytest.fixture
def store(s3_server: SeaweedFS, tmp_path: Path) -> S3Store:
    return make_store(s3_server, scratch_dir=tmp_path / "scratch")


def source(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_put_read_range_list_delete(store: S3Store, tmp_path: Path):
    data = os.urandom(300_000)
    key = "studies/1.2/1.3/1.4.abc.dcm"
    src = source(tmp_path, "a", data)
    store.put_file(key, src, move=False)
    assert src.read_bytes() == data  # copied, not taken
    assert store.exists(key)
    assert store.size(key) == len(data)
    age = dt.datetime.now(dt.UTC) - store.modified(key)
    assert dt.timedelta(seconds=-5) < age < dt.timedelta(minutes=1)
    with store.open(key) as fh:
        assert fh.read() == data
    assert store.read_range(key, 1000, 50) == data[1000:1050]
    assert store.read_range(key, len(data) - 10, 100) == data[-10:]
    with store.local_path(key) as path:
        assert path.read_bytes() == data
        assert path.parent == tmp_path / "scratch"
    assert not path.exists()  # the temporary copy is gone
    store.put_file("studies/1.2/1.3/other.dcm", source(tmp_path, "b", b"x" * 10), move=True)
    assert not (tmp_path / "src" / "b").exists()  # moved: the local file is taken
    assert sorted(store.iter_keys()) == ["studies/1.2/1.3/1.4.abc.dcm", "studies/1.2/1.3/other.dcm"]
    assert list(store.iter_keys("studies/1.2/1.3/1.4")) == [key]
    store.delete(key)
    store.delete(key)  # idempotent, like FileStore
    assert not store.exists(key)
    assert list(store.iter_keys()) == ["studies/1.2/1.3/other.dcm"]


def test_open_is_seekable_like_a_file(store: S3Store, tmp_path: Path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.put_file("k/a.dcm", source(tmp_path, "a", data), move=False)
    with store.open("k/a.dcm") as fh:
        assert fh.read(10) == data[:10]
        fh.seek(2 * 1024 * 1024)
        assert fh.read(100) == data[2 * 1024 * 1024 : 2 * 1024 * 1024 + 100]
        fh.seek(5)
        assert fh.read(5) == data[5:10]
        fh.seek(-7, os.SEEK_END)
        assert fh.read() == data[-7:]
        assert fh.tell() == len(data)


def test_missing_blob_is_not_found(store: S3Store):
    store.prepare()
    assert not store.exists("k/none.dcm")
    with pytest.raises(NotFound):
        store.open("k/none.dcm")
    with pytest.raises(NotFound):
        store.size("k/none.dcm")
    with pytest.raises(NotFound):
        store.modified("k/none.dcm")
    with pytest.raises(NotFound):
        store.read_range("k/none.dcm", 0, 10)
    with pytest.raises(NotFound), store.local_path("k/none.dcm"):
        pass


def test_large_object_goes_up_in_parts(store: S3Store, tmp_path: Path):
    data = os.urandom(2 * PART + 12345)
    store.put_file("k/big.dcm", source(tmp_path, "big", data), move=True)
    stat = store._client.stat_object(store.bucket, store.prefix + "k/big.dcm")
    assert stat.etag.strip('"').endswith("-3")  # three parts
    with store.open("k/big.dcm") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()
    assert store.read_range("k/big.dcm", PART - 5, 10) == data[PART - 5 : PART + 5]


def test_part_hasher_matches_s3_etags(tmp_path: Path):
    data = os.urandom(2 * PART + 3)
    path = source(tmp_path, "a", data)
    with open(path, "rb") as fh:
        hasher = _PartHasher(fh, PART)
        while hasher.read(1_000_003):
            pass
    parts = [hashlib.md5(data[i : i + PART]).digest() for i in range(0, len(data), PART)]
    assert hasher.etag() == hashlib.md5(b"".join(parts)).hexdigest() + "-3"
    single = source(tmp_path, "b", b"abc")
    with open(single, "rb") as fh:
        hasher = _PartHasher(fh, PART)
        hasher.read(PART)
    assert hasher.etag() == hashlib.md5(b"abc").hexdigest()


def test_a_changed_etag_is_refused(store: S3Store, tmp_path: Path, monkeypatch):
    """What the server holds must be what was read: a wrong ETag fails the write."""
    monkeypatch.setattr(_PartHasher, "etag", lambda self: "0" * 32)
    with pytest.raises(StorageUnavailable, match="other bytes"):
        store.put_file("k/a.dcm", source(tmp_path, "a", b"data"), move=True)
    assert (tmp_path / "src" / "a").exists()  # not taken: the sender's copy stays
    assert not store.exists("k/a.dcm")


def test_keys_are_checked(store: S3Store, tmp_path: Path):
    with pytest.raises(ValueError):
        store.put_file("../x", source(tmp_path, "a", b"x"), move=False)


def test_check_and_the_bucket_is_created(s3_server: SeaweedFS):
    bucket = f"sb-{uuid.uuid4().hex[:10]}"
    store = make_store(s3_server, bucket=bucket)
    store.check()
    assert store._client.bucket_exists(bucket)
    assert list(store.iter_keys()) == []  # the probe is gone and never listed


def test_missing_bucket_without_create(s3_server: SeaweedFS):
    store = make_store(s3_server, bucket=f"sb-{uuid.uuid4().hex[:10]}", create_bucket=False)
    with pytest.raises(StorageUnavailable, match="does not exist"):
        store.check()


def test_wrong_credentials_are_unavailable_without_the_secret(s3_server: SeaweedFS, tmp_path):
    store = make_store(s3_server, secret_key="not-the-secret-xyz")
    with pytest.raises(StorageUnavailable) as info:
        store.put_file("k/a.dcm", source(tmp_path, "a", b"x"), move=False)
    assert "not-the-secret-xyz" not in str(info.value)


def test_server_down_is_storage_unavailable(tmp_path: Path):
    """A stopped server: every operation is a quick, retryable StorageUnavailable."""
    from tests.servers import free_port

    store = S3Store(
        endpoint=f"127.0.0.1:{free_port()}",
        bucket="studybridge",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        secure=False,
        connect_timeout=1.0,
        retries=0,
    )
    src = source(tmp_path, "a", b"data")
    for call in (
        lambda: store.put_file("k/a.dcm", src, move=True),
        lambda: store.open("k/a.dcm"),
        lambda: store.read_range("k/a.dcm", 0, 1),
        lambda: store.exists("k/a.dcm"),
        lambda: store.check(),
        lambda: list(store.iter_keys()),
    ):
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert info.value.retryable
    assert src.exists()  # a failed write never takes the sender's file


def test_make_blob_store_from_settings(s3_server: SeaweedFS, tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", **s3_server.settings(prefix="from-settings"))
    store = make_blob_store(settings)
    assert isinstance(store, S3Store)
    store.check()
    assert "secret" not in repr(settings.s3_secret_key)


def test_settings_validation():
    with pytest.raises(ValueError):
        S3Store(endpoint="", bucket="b", access_key="a", secret_key="s")
    with pytest.raises(ValueError):
        S3Store(endpoint="h:1", bucket="b", access_key="a", secret_key="s", part_size=1024)
    with pytest.raises(ValueError):
        S3Store(endpoint="h:1", bucket="b", access_key="a", secret_key="s", sse="kms")
    with pytest.raises(ValueError, match="TLS"):
        S3Store(
            endpoint="h:1", bucket="b", access_key="a", secret_key="s", secure=False,
            sse="kms", kms_key_id="k",
        )  # fmt: skip


def _volume_bytes(server: SeaweedFS) -> bytes:
    """Everything SeaweedFS's volume servers wrote to disk (needles are stored whole)."""
    return b"".join(p.read_bytes() for p in (server.root / "data").rglob("*.dat"))


def test_sse_s3_setting_encrypts_at_rest(s3_server: SeaweedFS, tmp_path: Path):
    """s3_sse = "s3" sends x-amz-server-side-encryption: AES256 on every upload (single
    and multipart); the server confirms it, stores no plaintext, and reads decrypt."""
    settings = Settings(
        data_dir=tmp_path / "var", s3_sse="s3", **s3_server.settings(prefix="sse-on")
    )
    encrypted = make_blob_store(settings)
    plain = make_store(s3_server)
    # Random bytes around a marker: SeaweedFS would store compressible data gzipped.
    marker = f"sb-sse-{uuid.uuid4().hex}".encode()
    small = os.urandom(100_000) + marker + os.urandom(100_000)
    large = os.urandom(PART + 100) + marker + os.urandom(PART + 677)
    encrypted.put_file("k/small.dcm", source(tmp_path, "s", small), move=False)
    encrypted.put_file("k/large.dcm", source(tmp_path, "l", large), move=False)
    plain_marker = f"sb-plain-{uuid.uuid4().hex}".encode()
    clear = os.urandom(50_000) + plain_marker + os.urandom(50_000)
    plain.put_file("k/plain.dcm", source(tmp_path, "p", clear), move=False)

    for key in ("k/small.dcm", "k/large.dcm"):
        stat = encrypted._client.stat_object(encrypted.bucket, encrypted.prefix + key)
        assert stat.metadata.get("x-amz-server-side-encryption") == "AES256", stat.metadata
    stat = plain._client.stat_object(plain.bucket, plain.prefix + "k/plain.dcm")
    assert "x-amz-server-side-encryption" not in stat.metadata
    with encrypted.open("k/large.dcm") as fh:
        assert fh.read() == large
    assert encrypted.read_range("k/small.dcm", 5, 100) == small[5:105]
    on_disk = _volume_bytes(s3_server)
    assert plain_marker in on_disk  # the look at the disk sees plaintext where it is
    assert marker not in on_disk
