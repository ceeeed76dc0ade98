"""Publishing: a finished run folder becomes an immutable registry version.

Nothing is published without provenance: `run_manifest.json` must record every field in
`PROVENANCE_FIELDS`. Files go up create-only, MANIFEST.json last (the commit point), so an
interrupted publish leaves no visible version and re-running it completes it. The layout, the
manifest's format and reading versions back are `versions.py`'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from softprompt.errors import ConflictError, IntegrityError, StoreError
from softprompt.registry.integrity import (
    MANIFEST,
    MANIFEST_FORMAT,
    compute_version,
    metric_numbers,
    repair_command,
)
from softprompt.registry.store import ArtifactStore, NotFoundError, sha256_file
from softprompt.registry.versions import load_manifest, slug

REQUIRED_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.json",
    "run_manifest.json",
    "report.html",
)
PROVENANCE_FIELDS = ("git", "packages", "config", "dataset", "base_model", "train")
"""What `run_manifest.json` must record (non-empty) before anything is published."""


@dataclass(frozen=True)
class PublishResult:
    """What `publish` did."""

    task: str
    """Task key segment (sanitized)."""
    base_model: str
    """Base-model key segment (sanitized: lowercased, '/' -> '--')."""
    version: str
    """Content-addressed version id (16 hex digits)."""
    uri: str
    """Where the version lives (path or s3:// URI)."""
    created: bool
    """False when this exact version already existed (a no-op)."""
    message: str
    """One human line."""


def publish(store: ArtifactStore, run_dir: Path) -> PublishResult:
    """Publish every regular file of a run folder as an immutable registry version.

    Files go up first, each create-only; MANIFEST.json goes last, so an interrupted publish leaves
    no visible version and re-running completes it. Re-publishing identical content is a no-op.

    Args:
        store: where the registry lives.
        run_dir: a finished run folder (adapter, metrics.json, run_manifest.json, report.html).

    Returns:
        The version's identity and whether this call created it.

    Raises:
        StoreError: the run folder is incomplete or malformed, or the store fails.
        IntegrityError: the store holds different bytes under this version.
    """
    run = read_run(Path(run_dir))
    base = f"{run.task}/{run.base_model}/{run.version}"
    restored = 0
    for entry in run.files:
        key = f"{base}/{entry['name']}"
        if _stored_matches(store, key, entry["sha256"]):
            continue
        try:
            store.put_file(key, run.path / entry["name"], if_none_match=True)
            restored += 1
        except ConflictError:  # a concurrent publisher of the same version won; same bytes are fine
            if not _stored_matches(store, key, entry["sha256"]):
                raise IntegrityError(f"{store.uri(key)} changed while publishing it; publish again") from None
    existing = _try_manifest(store, run.task, run.base_model, run.version)
    if existing is None:
        body = json.dumps(version_manifest(run), indent=2, sort_keys=True).encode()
        try:
            store.put_bytes(f"{base}/{MANIFEST}", body, if_none_match=True)
            message = (
                f"published {run.task}/{run.base_model} version {run.version} "
                f"({len(run.files)} files, {run.metric_name}={run.metric_value:.4f}) to {store.uri(base)}"
            )
            return PublishResult(run.task, run.base_model, run.version, store.uri(base), True, message)
        except ConflictError:
            existing = load_manifest(store, run.task, run.base_model, run.version)
    if {(f["name"], f["sha256"]) for f in existing["files"]} != {(f["name"], f["sha256"]) for f in run.files}:
        raise IntegrityError(
            f"{store.uri(base)}/{MANIFEST} lists other files than {run.path}; the version is damaged. "
            f"Repair it from this run folder: `{repair_command(run.task, run.base_model, run.version)}`"
        )
    note = f" (restored {restored} missing files)" if restored else ""
    message = f"{run.task}/{run.base_model} version {run.version} already exists at {store.uri(base)}; nothing to do"
    return PublishResult(run.task, run.base_model, run.version, store.uri(base), False, message + note)


@dataclass(frozen=True)
class RunFolder:
    """A checked run folder: what publish uploads, and what repair restores a version from."""

    path: Path
    task: str
    """Task key segment (`task_name` sanitized)."""
    task_name: str
    base_model: str
    """Base-model key segment (`base_model_name` sanitized)."""
    base_model_name: str
    weights_sha256: str
    files: list[dict[str, Any]]
    """Every file's name, sha256 and size, sorted by name: the manifest's `files`."""
    version: str
    """The version id these files hash to (`compute_version`)."""
    metric_name: str
    metric_value: float
    metrics: dict[str, Any]
    """metrics.json as read."""
    eval_fingerprint: str


def read_run(run_dir: Path) -> RunFolder:
    """Check a run folder (files, provenance, metrics) and compute the version it publishes as.

    Raises:
        StoreError: naming every problem with the folder's files, or the first malformed field.
    """
    if not run_dir.is_dir():
        raise StoreError(
            f"run folder {run_dir} does not exist or is not a folder; pass the folder train wrote"
        )
    files: list[dict[str, Any]] = []
    problems: list[str] = []
    for path in sorted(run_dir.iterdir()):
        if path.is_symlink() or not path.is_file():
            kind = "a symlink" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            problems.append(f"{path.name} is {kind}")
        elif path.name == MANIFEST:
            problems.append(f"{MANIFEST} is reserved for the registry")
        else:
            files.append({"name": path.name, "sha256": sha256_file(path), "size": path.stat().st_size})
    missing = sorted(set(REQUIRED_FILES) - {f["name"] for f in files})
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if problems:
        raise StoreError(
            f"cannot publish {run_dir}: {'; '.join(problems)}. A run folder holds only regular files, "
            f"including {', '.join(REQUIRED_FILES)}"
        )
    run_manifest = _read_json(run_dir / "run_manifest.json")
    gaps = [key for key in PROVENANCE_FIELDS if not run_manifest.get(key)]
    if gaps:
        raise StoreError(
            f"cannot publish {run_dir}: {run_dir / 'run_manifest.json'} lacks provenance {gaps}; nothing is "
            "published without it. Evaluate the train stage's output (`softprompt evaluate --train DIR`) to write it"
        )
    metrics = _read_json(run_dir / "metrics.json")
    _read_json(run_dir / "adapter_config.json")
    base = _field(run_manifest, "base_model", dict, run_dir / "run_manifest.json")
    primary = _field(metrics, "primary_metric", str, run_dir / "metrics.json")
    tuned = _field(metrics, "tuned", dict, run_dir / "metrics.json")
    task_name = _field(run_manifest, "task", str, run_dir / "run_manifest.json")
    model_name = _field(base, "name", str, run_dir / "run_manifest.json", "base_model.name")
    return RunFolder(
        path=run_dir,
        task=slug(task_name, "task"),
        task_name=task_name,
        base_model=slug(model_name, "base model"),
        base_model_name=model_name,
        weights_sha256=_field(
            base, "weights_sha256", str, run_dir / "run_manifest.json", "base_model.weights_sha256"
        ),
        files=files,
        version=compute_version([(f["name"], f["sha256"]) for f in files]),
        metric_name=primary,
        metric_value=float(
            _field(tuned, primary, (int, float), run_dir / "metrics.json", f"tuned.{primary}")
        ),
        metrics=metrics,
        eval_fingerprint=_field(metrics, "eval_fingerprint", str, run_dir / "metrics.json"),
    )


def version_manifest(run: RunFolder) -> dict[str, Any]:
    """The MANIFEST.json a run folder publishes (its files, metrics and identity; now as created_at)."""
    from softprompt import __version__

    return {
        "format": MANIFEST_FORMAT,
        "task": run.task,
        "task_name": run.task_name,
        "base_model": {
            "name": run.base_model_name,
            "key": run.base_model,
            "weights_sha256": run.weights_sha256,
        },
        "version": run.version,
        "files": run.files,
        "metric": {"name": run.metric_name, "value": run.metric_value, "split": run.metrics.get("split")},
        "metrics": metric_numbers(run.metrics["tuned"]),
        "baselines": {k: metric_numbers(run.metrics.get(k)) for k in ("zero_shot", "few_shot") if k in run.metrics},
        "eval_fingerprint": run.eval_fingerprint,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "softprompt_version": __version__,
    }


# ------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"cannot read {path} as JSON ({e}); re-run the stage that writes it") from e
    if not isinstance(data, dict):
        raise StoreError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _field(data: dict[str, Any], name: str, kind: Any, path: Path, label: str | None = None) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or value == "":
        raise StoreError(f"{path}: field {label or name!r} is missing or invalid (got {value!r})")
    return value


def _stored_matches(store: ArtifactStore, key: str, sha256: str) -> bool:
    """True if `key` holds these bytes, False if absent; IntegrityError if it holds others."""
    info = store.head(key)
    if info is None:
        return False
    stored = info.sha256 or hashlib.sha256(store.get_bytes(key)).hexdigest()
    if stored != sha256:
        task, model, version = key.split("/")[:3]
        raise IntegrityError(
            f"{store.uri(key)} already exists with sha256 {stored}, but this version needs {sha256}; a "
            "version's files never change, so the store is damaged or was edited by hand — restore it "
            f"from the run folder: `{repair_command(task, model, version)}`"
        )
    return True


def _try_manifest(store: ArtifactStore, task: str, model: str, version: str) -> dict[str, Any] | None:
    try:
        return load_manifest(store, task, model, version)
    except NotFoundError:
        return None
