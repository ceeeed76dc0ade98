"""The scratch store between the tune step and a Ray cluster: the step pushes the resolved config
and the prepared data there, the Ray driver (`remote.py`) pushes the winners back.

The scratch prefix defaults to the registry bucket's `tmp/`, which a lifecycle rule expires.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from softprompt.errors import SoftpromptError
from softprompt.registry.store import open_store


def default_scratch(registry: str, name: str) -> str:
    """`s3://<bucket>/tmp/softprompt/<name>` for an S3 registry (the bucket's `tmp/` expires by
    lifecycle rule); a local temp folder otherwise (one machine only)."""
    if registry.startswith("s3://"):
        bucket = registry[len("s3://"):].split("/", 1)[0]
        return f"s3://{bucket}/tmp/softprompt/{name}"
    return str(Path(tempfile.gettempdir()) / "softprompt-scratch" / name)


def push_tree(src: Path, uri: str, endpoint: str | None) -> None:
    """Upload every file under `src` to the store at `uri`, keyed by its relative path."""
    store = open_store(uri, endpoint_url=endpoint)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        store.put_file(path.relative_to(src).as_posix(), path)


def pull_tree(uri: str, dest: Path, endpoint: str | None) -> None:
    """Download every key under the store at `uri` into `dest`."""
    store = open_store(uri, endpoint_url=endpoint)
    keys = store.list("")
    if not keys:
        raise SoftpromptError(f"{uri} is empty: the Ray job wrote no results there; see its log above")
    for key in keys:
        store.get_file(key, dest / key)


def copy_tree(src: Path, dest: Path, *, ignore: Sequence[str] = ()) -> None:
    """Copy a folder's contents into `dest` (created; existing files are replaced)."""
    if not src.is_dir():
        raise SoftpromptError(f"expected output folder {src} was not written")
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
