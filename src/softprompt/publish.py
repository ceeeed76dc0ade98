"""Publish (`softprompt publish`): push an evaluated artifact folder to the prompt registry.

The registry (local folder or S3) does the safe part: content-addressed versions, files first and
manifest last, conditional writes. This stage checks the folder is complete and carries provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompt.config import JobConfig
from softprompt.errors import DataError
from softprompt.registry import PublishResult, publish
from softprompt.registry.store import open_store

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_manifest.json", "report.html")


def run(cfg: JobConfig, artifact_dir: str | Path, *, store_uri: str | None = None) -> PublishResult:
    """Publish `artifact_dir` to `store_uri` (default `cfg.publish.store`).

    Raises:
        DataError: when a required file is missing or the manifest lacks provenance.
    """
    folder = Path(artifact_dir)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {missing}; run `softprompt evaluate` to produce a complete artifact folder")
    manifest = json.loads((folder / "run_manifest.json").read_text(encoding="utf-8"))
    gaps = [key for key in ("git", "packages", "config", "dataset", "base_model") if not manifest.get(key)]
    if gaps:
        raise DataError(f"{folder / 'run_manifest.json'} lacks provenance fields {gaps}; nothing is published without them")
    store = open_store(store_uri or cfg.publish.store, endpoint_url=cfg.publish.s3_endpoint_url, region=cfg.publish.region)
    return publish(store, folder)
