"""Artifact stores: the same contract on a local folder and on a real S3 endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from softprompt.errors import ConflictError, IntegrityError, StoreError
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import (
    ArtifactStore,
    LocalStore,
    NotFoundError,
    open_store,
    validate_key,
)

SECRET = "wJalrSECRETdoNotPrintMe0123456789"
ACCESS = "AKIASENTINEL0000XYZ"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(bucket, "some/prefix", endpoint_url=endpoint, max_attempts=2)


@contextmanager
def moto_auth(endpoint: str) -> Iterator[None]:
    """Make moto's server check signatures and keys (it accepts anything by default)."""

    def post(value: bytes) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=value,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=5).read()

    post(b"0")
    try:
        yield
    finally:
        post(b"inf")


def test_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    etag = store.put_bytes("a/b/c.json", b'{"x": 1}')
    assert store.get_bytes("a/b/c.json") == b'{"x": 1}'
    info = store.head("a/b/c.json")
    assert info is not None
    assert (info.size, info.etag, info.sha256) == (8, etag, hashlib.sha256(b'{"x": 1}').hexdigest())
    store.put_bytes("a/d.txt", b"d")
    assert store.list() == ["a/b/c.json", "a/d.txt"]
    assert store.list("a/b/") == ["a/b/c.json"]
    assert store.head("a/missing") is None
    store.delete("a/d.txt")
    store.delete("a/d.txt")  # deleting twice is fine
    assert store.list("a/") == ["a/b/c.json"]
    assert store.uri("a/b/c.json").endswith("a/b/c.json")


def test_files_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    store.put_file("f/src.bin", src)
    dest = store.get_file("f/src.bin", tmp_path / "out" / "deep" / "copy.bin")
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no temp files left behind


def test_missing_key_names_the_key(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"nope/here\.json"):
        store.get_bytes("nope/here.json")
    with pytest.raises(NotFoundError, match=r"nope/here\.json"):
        store.get_file("nope/here.json", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_create_only_write(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"first", if_none_match=True)
    with pytest.raises(ConflictError, match="k"):
        store.put_bytes("k", b"second", if_none_match=True)
    src = tmp_path / "f"
    src.write_bytes(b"third")
    with pytest.raises(ConflictError):
        store.put_file("k", src, if_none_match=True)
    assert store.get_bytes("k") == b"first"


def test_compare_and_swap(store: ArtifactStore) -> None:
    etag = store.put_bytes("ptr", b"v1")
    new = store.put_bytes("ptr", b"v2", if_match=etag)
    with pytest.raises(ConflictError):
        store.put_bytes("ptr", b"v3", if_match=etag)  # stale etag
    assert store.get_bytes("ptr") == b"v2"
    store.put_bytes("ptr", b"v3", if_match=new)
    with pytest.raises(ConflictError):
        store.put_bytes("gone", b"x", if_match=new)  # nothing to replace


def test_concurrent_creates_have_one_winner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    barrier = threading.Barrier(8)
    results: list[str] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("once", f"writer {i}".encode(), if_none_match=True)
            results.append("won")
        except ConflictError:
            results.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
    assert store.list() == ["once"]


@pytest.mark.parametrize(
    "key",
    ["", "/abs/key", "a/../b", "..", "a\\b", "a\x00b", "a//b", "a/./b", "trailing/", ".softprompt-tmp-x"],
)
def test_bad_keys_are_rejected(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="invalid key"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="invalid key"):
        store.get_bytes(key)
    with pytest.raises(StoreError, match="invalid key"):
        store.head(key)
    assert not list(tmp_path.parent.glob("b"))  # nothing escaped


def test_validate_key_accepts_normal_keys() -> None:
    assert validate_key("task/model/0123abcd/adapter_model.safetensors")


def test_open_store_dispatch(tmp_path: Path) -> None:
    s3 = open_store("s3://bkt/a/b", endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri("k")) == ("bkt", "a/b", "s3://bkt/a/b/k")
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(f"file://{tmp_path}")
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3:///x")
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bkt/x")


def test_core_import_does_not_load_boto3() -> None:
    code = "import sys, softprompt.registry.store, softprompt.registry.s3, softprompt.registry; assert 'boto3' not in sys.modules, 'boto3 loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2] / "src")


# ---------------------------------------------------------------------------------------- S3 only


def test_s3_records_sha256_and_detects_corruption(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    store = S3Store(s3_bucket, "p", endpoint_url=s3_endpoint)
    store.put_bytes("obj.bin", b"good bytes")
    raw = boto3.client("s3", endpoint_url=s3_endpoint)
    meta = raw.head_object(Bucket=s3_bucket, Key="p/obj.bin")["Metadata"]
    assert meta["sha256"] == hashlib.sha256(b"good bytes").hexdigest()
    # Overwrite the bytes behind the store's back, keeping the (now stale) recorded hash.
    raw.put_object(Bucket=s3_bucket, Key="p/obj.bin", Body=b"evil bytes", Metadata=meta)
    with pytest.raises(IntegrityError, match=r"obj\.bin") as info:
        store.get_bytes("obj.bin")
    assert meta["sha256"] in str(info.value)
    assert hashlib.sha256(b"evil bytes").hexdigest() in str(info.value)
    with pytest.raises(IntegrityError):
        store.get_file("obj.bin", tmp_path / "obj.bin")
    assert not list(tmp_path.iterdir())  # a corrupt download never lands at its destination


def test_s3_multipart_upload(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (6 * 1024 * 4))  # 6 MiB: two parts of 5 MiB and 1 MiB
    store = S3Store(
        s3_bucket,
        "",
        endpoint_url=s3_endpoint,
        multipart_threshold=1024 * 1024,
        multipart_chunksize=5 * 1024 * 1024,
    )
    etag = store.put_file("big.bin", big, if_none_match=True)
    assert etag.endswith("-2")  # S3's multipart etag: hash of part hashes, then the part count
    info = store.head("big.bin")
    assert info is not None and info.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    assert store.get_file("big.bin", tmp_path / "back.bin").read_bytes() == big.read_bytes()
    with pytest.raises(ConflictError):
        store.put_file("big.bin", big, if_none_match=True)
    uploads = boto3.client("s3", endpoint_url=s3_endpoint).list_multipart_uploads(Bucket=s3_bucket)
    assert not uploads.get("Uploads")  # the refused upload was aborted, not left to bill


def test_s3_missing_bucket(s3_endpoint: str) -> None:
    store = S3Store("no-such-bucket-here", "p", endpoint_url=s3_endpoint)
    for op in (lambda: store.put_bytes("k", b"x"), lambda: store.get_bytes("k"), lambda: store.head("k")):
        with pytest.raises(
            StoreError, match=r"bucket 'no-such-bucket-here' does not exist at endpoint http://127"
        ):
            op()


def test_s3_unreachable_endpoint_fails_fast() -> None:
    store = S3Store("bkt", "p", endpoint_url="http://127.0.0.1:1", max_attempts=1, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"cannot reach the S3 endpoint http://127.0.0.1:1"):
        store.get_bytes("k")
    assert time.monotonic() - start < 10


def test_s3_bad_credentials_are_named_not_printed(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    store = S3Store(s3_bucket, "p", endpoint_url=s3_endpoint, max_attempts=1)
    with moto_auth(s3_endpoint):
        for op in (lambda: store.put_bytes("k", b"x"), lambda: store.get_bytes("k"), lambda: store.head("k")):
            with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID") as info:
                op()
            message = str(info.value)
            assert s3_bucket in message
            assert SECRET not in message and ACCESS not in message
    assert SECRET not in repr(store) and SECRET.encode() not in pickle.dumps(store)


def test_s3_store_pickles_without_its_client(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "p", endpoint_url=s3_endpoint)
    store.put_bytes("k", b"x")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_bytes("k") == b"x"
