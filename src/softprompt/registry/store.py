"""Artifact stores: one small Protocol with a local-disk and an S3 implementation.

Stages and the registry only ever talk to an `ArtifactStore`. This module holds the protocol,
`open_store` and `LocalStore`, and re-exports what every store shares (`ObjectInfo`,
`NotFoundError`, `validate_key`, `sha256_file`, from `objects.py`); `S3Store` lives in `s3.py`.
boto3 is imported lazily inside `S3Store`, so the core runs (and its tests pass) without touching
AWS.

Both stores give the same guarantees, which is what makes safe publishing possible:

- writes are atomic (a reader sees the old bytes or the new bytes, never a torn file);
- `if_none_match=True` creates a key only if it does not exist, `if_match=etag` replaces it only if
  it still has that etag; a failed condition raises `ConflictError`;
- every object written by softprompt records its SHA-256, and downloads are checked against it
  (`IntegrityError` names the key and both hashes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from softprompt.errors import ConflictError, StoreError
from softprompt.registry.objects import (
    CHUNK,
    INTERNAL_PREFIX,
    MiB,
    NotFoundError,
    ObjectInfo,
    file_mode,
    sha256_file,
    validate_key,
    validate_prefix,
)
from softprompt.registry.s3 import S3Store

__all__ = [
    "ArtifactStore",
    "LocalStore",
    "MiB",
    "NotFoundError",
    "ObjectInfo",
    "S3Store",
    "open_store",
    "sha256_file",
    "validate_key",
]


@runtime_checkable
class ArtifactStore(Protocol):
    """Where artifacts live: a folder on disk or an S3 bucket/prefix. Keys use '/' separators."""

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write `data` at `key` atomically; returns the new etag. Failed condition: ConflictError."""
        ...

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """Upload the file at `path` to `key` atomically; returns the new etag."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Read a key, verified against its recorded SHA-256. Missing key: NotFoundError."""
        ...

    def get_file(self, key: str, dest: Path) -> Path:
        """Download a key to `dest` (atomically, verified); returns `dest`."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Describe a key, or None when it does not exist."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove a key; removing a missing key is not an error."""
        ...

    def uri(self, key: str = "") -> str:
        """A human-readable address for a key (a path or an s3:// URI)."""
        ...


def open_store(
    uri: str, *, endpoint_url: str | None = None, region: str | None = None, profile: str | None = None
) -> ArtifactStore:
    """Open the store a URI names.

    Args:
        uri: `s3://bucket/prefix` for S3; a plain path or `file://` path for a local folder.
        endpoint_url: custom S3 endpoint (MinIO, Ceph, moto); path-style addressing is used then.
        region: S3 region; None takes it from the standard AWS configuration.
        profile: AWS profile name; None uses the standard credential chain.

    Returns:
        An `S3Store` or a `LocalStore`.
    """
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} has no bucket; write it as s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region, profile=profile)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported store URI {uri!r}; use s3://BUCKET/PREFIX or a local folder path")
    return LocalStore(Path(uri[len("file://") :] if uri.startswith("file://") else uri))



# --------------------------------------------------------------------------------------------- local


class LocalStore:
    """Objects as files under `root`; the etag is the SHA-256 of the content.

    Atomicity comes from writing a temp file in the target folder and then `os.replace` (plain
    writes), `os.link` (create-only: the link fails if the name exists, so of two concurrent
    writers exactly one wins) or an flock-guarded compare-and-replace (`if_match`).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """See `ArtifactStore.put_bytes`."""
        return self._put(key, io.BytesIO(data), if_none_match=if_none_match, if_match=if_match)

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """See `ArtifactStore.put_file`."""
        try:
            with Path(path).open("rb") as src:
                return self._put(key, src, if_none_match=if_none_match, if_match=None)
        except FileNotFoundError as e:
            raise StoreError(f"cannot upload {path} to {self.uri(key)}: the file does not exist") from e

    def get_bytes(self, key: str) -> bytes:
        """See `ArtifactStore.get_bytes`."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFoundError(f"key {key!r} not found in {self.uri()} (no file {self._path(key)})") from e

    def get_file(self, key: str, dest: Path) -> Path:
        """See `ArtifactStore.get_file`."""
        try:
            src = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFoundError(f"key {key!r} not found in {self.uri()} (no file {self._path(key)})") from e
        with src:
            _atomic_write(Path(dest), src)
        return Path(dest)

    def head(self, key: str) -> ObjectInfo | None:
        """See `ArtifactStore.head`."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            digest = sha256_file(path)
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=size, etag=digest, sha256=digest)

    def list(self, prefix: str = "") -> list[str]:
        """See `ArtifactStore.list`."""
        validate_prefix(prefix)
        if not self.root.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(INTERNAL_PREFIX)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(INTERNAL_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """See `ArtifactStore.delete`."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def uri(self, key: str = "") -> str:
        """See `ArtifactStore.uri`."""
        return str(self._path(key)) if key else str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _put(self, key: str, src: IO[bytes], *, if_none_match: bool, if_match: str | None) -> str:
        if if_none_match and if_match is not None:
            raise StoreError(f"put of {key!r}: pass if_none_match or if_match, not both")
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp, digest = _write_temp(dest.parent, src)
        try:
            if if_none_match:
                try:
                    os.link(tmp, dest)
                except FileExistsError as e:
                    raise ConflictError(f"{self.uri(key)} already exists (create-only write refused)") from e
            elif if_match is not None:
                with _flock(dest.parent / f"{INTERNAL_PREFIX}lock-{dest.name}"):
                    current = sha256_file(dest) if dest.is_file() else None
                    if current != if_match.strip('"'):
                        raise ConflictError(
                            f"{self.uri(key)} changed: expected etag {if_match}, found {current or 'no object'}"
                        )
                    os.replace(tmp, dest)
            else:
                os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return digest


def _write_temp(folder: Path, src: IO[bytes]) -> tuple[Path, str]:
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(dir=folder, prefix=f"{INTERNAL_PREFIX}tmp-")
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would make stored and pulled files private
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name), digest.hexdigest()


def _atomic_write(dest: Path, src: IO[bytes]) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = _write_temp(dest.parent, src)
    os.replace(tmp, dest)
    return digest


@contextlib.contextmanager
def _flock(lock_path: Path) -> Iterator[None]:
    import fcntl  # POSIX only; imported here so the module still imports elsewhere

    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
