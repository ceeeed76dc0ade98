"""What every artifact store shares: the object description, the not-found error, the key rules and
file hashing.

`store.py` (the protocol, `open_store`, `LocalStore`) and `s3.py` (`S3Store`) both build on this
module, which imports neither, so `open_store` can import `S3Store` without an import cycle.
`store.py` re-exports the public names here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from softprompt.errors import StoreError

MiB = 1024 * 1024
CHUNK = 1 * MiB
# LocalStore keeps its temp and lock files next to the target; keys may not use this prefix.
INTERNAL_PREFIX = ".softprompt-"


class NotFoundError(StoreError):
    """The key does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one stored object without downloading it."""

    key: str
    """The key, relative to the store's root."""
    size: int
    """Size in bytes."""
    etag: str
    """Opaque version tag (no quotes) to pass back as `if_match` for compare-and-swap."""
    sha256: str | None
    """Hex SHA-256 of the content when the store recorded one (always for softprompt writes)."""


def validate_key(key: str, *, what: str = "key") -> str:
    """Return `key` if it is a safe relative '/'-separated key, else raise StoreError saying why.

    Rejected: empty keys, absolute paths, backslashes, NUL or control characters, empty, '.' and
    '..' segments, and segments starting with '.softprompt-' (LocalStore's temp files).
    """
    problem = _key_problem(key)
    if problem:
        raise StoreError(
            f"invalid {what} {key!r}: {problem}; use a relative path like 'task/model/file.json'"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` (a key prefix for `list`, possibly ending in '/') if its key part is valid."""
    if prefix:
        validate_key(prefix.rstrip("/") or "/", what="prefix")
    return prefix


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: the mode `open()` gives a new file (0644 under umask 022).

    Files made with `tempfile.mkstemp` are 0600; what a store writes or downloads gets this instead.
    The umask is read from /proc where it can be: setting and restoring it would briefly change it
    for every thread of the process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return mode & ~umask


def _key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "it is empty"
    if len(key.encode("utf-8")) > 1024:
        return "it is longer than 1024 bytes"
    if "\\" in key:
        return "it contains a backslash"
    if any(ord(c) < 32 for c in key):
        return "it contains NUL or a control character"
    if key.startswith("/"):
        return "it is absolute"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return f"it has an empty, '.' or '..' segment ({segment!r})"
        if segment.startswith(INTERNAL_PREFIX):
            return f"segments starting with {INTERNAL_PREFIX!r} are reserved"
    return None
