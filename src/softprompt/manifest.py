"""Provenance: what every published artifact records about how it was made."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from softprompt import __version__
from softprompt.config import JobConfig, to_dict

PACKAGES = ("torch", "transformers", "peft", "safetensors", "pyarrow", "numpy", "tokenizers", "ray", "kfp", "boto3")


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """The git commit and dirty flag of the working tree (None values outside a checkout)."""
    where = str(cwd) if cwd else None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape results."""
    out: dict[str, str | None] = {"softprompt": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_manifest(
    cfg: JobConfig,
    *,
    dataset: dict[str, Any],
    base_model: dict[str, Any],
    train: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `run_manifest.json` record.

    Args:
        cfg: The resolved job configuration (recorded whole; it holds no credentials by design:
            S3 credentials come from the AWS chain, never from config).
        dataset: Dataset identity: fingerprint, counts, sources (from `ingest_result.json`).
        base_model: Base-model identity: name, source, weights sha256, dtype.
        train: Training summary (steps, best step, throughput, peak memory).
        extra: Anything else worth recording.
    """
    return {
        "format_version": 1,
        "task": cfg.task.name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(Path(__file__).parent),
        "packages": package_versions(),
        "platform": {"machine": platform.machine(), "system": platform.system(), "processor": platform.processor()},
        "config": to_dict(cfg),
        "dataset": dataset,
        "base_model": base_model,
        "train": train or {},
        **(extra or {}),
    }
