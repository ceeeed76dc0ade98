"""Where Ray Train and Tune keep their state: the storage path (a run-folder default, a shared
folder, or `s3://` through pyarrow with the job's one S3 endpoint) and its checkpoints."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from softprompt.config import JobConfig, RayConfig, S3Config
from softprompt.errors import DataError, SoftpromptError
from softprompt.uris import is_s3

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)


def storage_location(cfg: JobConfig, run_dir: str | Path) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Storage path and filesystem for Ray Train/Tune's RunConfig.

    `null` storage is `<run_dir>/ray` (absolute). A configured storage path gets the run folder's
    name appended, so runs sharing a bucket do not mix. For `s3://` the path is returned without its
    scheme together with a pyarrow S3 filesystem carrying the custom endpoint.
    """
    rc = cfg.ray
    if rc.storage_path is None or not is_s3(rc.storage_path):
        _warn_if_not_shared(rc)
    if rc.storage_path is None:
        return str((Path(run_dir) / "ray").resolve()), None
    base = f"{rc.storage_path.rstrip('/')}/{Path(run_dir).name}"
    if is_s3(base):
        return base[len("s3://") :], s3_filesystem(cfg.s3)
    return str(Path(base).resolve()), None


def _warn_if_not_shared(rc: RayConfig) -> None:
    import ray

    if ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        log.warning(
            "ray.storage_path=%s is a local path on a multi-node cluster: every node must see it at the same "
            "path (NFS); otherwise set ray.storage_path=s3://bucket/prefix", rc.storage_path or "<run folder>/ray",
        )


def checkpoint_uri(path: str, rc: RayConfig) -> str:
    """A checkpoint path as Ray reports it (scheme stripped on S3) turned back into a URI."""
    return f"s3://{path.lstrip('/')}" if is_s3(rc.storage_path) and not is_s3(path) else path


def s3_filesystem(s3: S3Config) -> pyarrow.fs.FileSystem:
    """A pyarrow S3 filesystem; `s3.endpoint` (e.g. `http://127.0.0.1:9000`) becomes its
    `endpoint_override` and scheme, since pyarrow ignores AWS_ENDPOINT_URL. Credentials come from
    the standard AWS chain of each process that uses it."""
    import pyarrow.fs

    endpoint_url = s3.endpoint or os.environ.get("AWS_ENDPOINT_URL")
    region = s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {"region": region}
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pyarrow.fs.S3FileSystem(**kwargs)


def download_checkpoint(uri: str, dest: str | Path, s3: S3Config) -> Path:
    """Copy a checkpoint folder (local or `s3://`) to `dest`, replacing what is there."""
    from ray.train import Checkpoint

    target = Path(dest)
    if target.exists():
        shutil.rmtree(target)
    if is_s3(uri):
        ckpt = Checkpoint(uri[len("s3://") :], filesystem=s3_filesystem(s3))
    else:
        ckpt = Checkpoint.from_directory(uri)
    try:
        ckpt.to_directory(str(target))
    except OSError as exc:
        raise SoftpromptError(f"cannot download checkpoint {uri} to {target}: {exc}") from exc
    return target


def file_exists(fs: pyarrow.fs.FileSystem | None, path: str) -> bool:
    if fs is None:
        return Path(path).is_file()
    import pyarrow.fs

    try:
        return bool(fs.get_file_info(path).type == pyarrow.fs.FileType.File)
    except OSError as exc:
        raise DataError(f"cannot read s3://{path}: {exc}") from exc
