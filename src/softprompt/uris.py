"""What a URI names: a local path or an `s3://bucket/key` object, read with the job's one S3 setting.

Every place that accepts "a path or an s3:// URI" (configs, data files, pipeline inputs) reads it
here, so the rules and the error messages are the same everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from softprompt.errors import StoreError

ARTIFACT_CACHE = "~/.cache/softprompt/artifacts"
"""Where registry versions named by `s3://` URIs or aliases are downloaded (verified) for predict
and serve; `$SOFTPROMPT_ARTIFACT_CACHE` overrides it."""


def is_s3(uri: str | Path | None) -> bool:
    """True for an `s3://` URI."""
    return bool(uri) and str(uri).startswith("s3://")


def artifact_cache() -> Path:
    """The local cache of downloaded registry versions (absolute)."""
    return Path(os.environ.get("SOFTPROMPT_ARTIFACT_CACHE") or ARTIFACT_CACHE).expanduser().absolute()


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/key` -> (`s3://bucket/a/b`, `key`).

    Raises:
        StoreError: the URI names no object (no bucket or no key).
    """
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent in ("s3:", "s3:/"):
        raise StoreError(f"{uri} names no object; write it as s3://BUCKET/path/to/file")
    return parent, name


def read_bytes(uri: str | Path, *, endpoint: str | None = None, region: str | None = None) -> bytes:
    """The bytes of a local file or an S3 object.

    Args:
        uri: A path (`file://` allowed) or `s3://bucket/key`.
        endpoint: Custom S3 endpoint (`s3.endpoint`); None uses AWS or $AWS_ENDPOINT_URL.
        region: S3 region (`s3.region`).

    Raises:
        StoreError: the file or object cannot be read; the message names it and says why.
    """
    text = str(uri)
    if is_s3(text):
        from softprompt.registry.store import open_store

        parent, name = split_s3(text)
        return open_store(parent, endpoint_url=endpoint or _env_endpoint(), region=region).get_bytes(name)
    path = local_path(text)
    if path.is_dir():
        raise StoreError(f"{path} is a folder; name a file")
    if path.exists() and not path.is_file():
        raise StoreError(f"{path} is not a regular file (a FIFO or device?); name a regular file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist") from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc


def fetch(uri: str | Path, dest: Path, *, endpoint: str | None = None, region: str | None = None) -> Path:
    """A local copy of `uri` at `dest` (folders created); returns `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(read_bytes(uri, endpoint=endpoint, region=region))
    return dest


def local_path(uri: str) -> Path:
    """A local path from a path or `file://` URI."""
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()


def _env_endpoint() -> str | None:
    # boto3 reads it by itself; passing it on keeps one behaviour for boto3 and pyarrow callers.
    return os.environ.get("AWS_ENDPOINT_URL") or None
