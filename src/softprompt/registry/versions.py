"""The prompt registry: immutable, content-addressed versions and a champion pointer moved by CAS.

Layout inside any `ArtifactStore`::

    <task>/<base_model>/<version>/<run files...>    adapter, metrics, run manifest, report, extras
    <task>/<base_model>/<version>/MANIFEST.json     written last: the version's commit point
    <task>/<base_model>/champion.json               the serving pointer, moved by compare-and-swap
    <task>/<base_model>/history/<time>-<version>.json   append-only log of promotions and rollbacks

`version` is the first 16 hex digits of a SHA-256 over the sorted (file name, file SHA-256) list,
so the same run folder always publishes to the same version and a version's bytes never change.
Every write is create-only (`if_none_match`) except the pointer, which uses `if_match` on its
etag: a crash leaves either no visible version or a complete one, and two racing promotions
cannot both win.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from softprompt.errors import ConfigError, ConflictError, IntegrityError, StoreError
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import ArtifactStore, LocalStore, NotFoundError, sha256_file

REQUIRED_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.json",
    "run_manifest.json",
    "report.html",
)
PROVENANCE_FIELDS = ("git", "packages", "config", "dataset", "base_model", "train")
"""What `run_manifest.json` must record (non-empty) before anything is published."""
MANIFEST = "MANIFEST.json"
CHAMPION = "champion.json"
CHAMPION_ALIAS = "champion"
MANIFEST_FORMAT = "softprompt.registry.version/1"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


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


@dataclass(frozen=True)
class Gate:
    """When a challenger may replace the champion."""

    metric: str = "accuracy"
    """Metric compared (from the tuned metrics in metrics.json); higher is better."""
    min_delta: float = 0.0
    """The challenger must beat the champion by strictly more than this (same eval set only)."""

    def __post_init__(self) -> None:
        if not self.metric:
            raise ConfigError("gate metric is empty; pass --metric accuracy (or another tuned metric)")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ConfigError(f"gate min_delta={self.min_delta}; use a number >= 0 (e.g. --min-delta 0.005)")


@dataclass(frozen=True)
class PromotionResult:
    """What `promote` or `rollback` did to the champion pointer."""

    action: str
    """'promote' or 'rollback'."""
    status: str
    """'promoted' or 'rolled_back' (pointer moved), 'refused' (gate said no), 'unchanged' (already champion)."""
    task: str
    base_model: str
    version: str
    """The version asked for."""
    promoted: bool
    """True when the pointer now names `version` because of this call."""
    previous: str | None
    """The champion before this call (None when there was none)."""
    forced: bool
    """True when --force overrode a gate refusal."""
    metric: str
    value: float | None
    """The version's value of `metric`."""
    champion_value: float | None
    """The previous champion's value of `metric`, when there was one."""
    message: str


@dataclass(frozen=True)
class VersionInfo:
    """One published version as the registry sees it."""

    task: str
    base_model: str
    version: str
    uri: str
    created_at: str
    metric: str
    value: float
    eval_fingerprint: str
    is_champion: bool
    manifest: dict[str, Any] = field(repr=False, compare=False)
    """The full MANIFEST.json."""


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
    run = _read_run(Path(run_dir))
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
        body = json.dumps(_manifest(run), indent=2, sort_keys=True).encode()
        try:
            store.put_bytes(f"{base}/{MANIFEST}", body, if_none_match=True)
            message = (
                f"published {run.task}/{run.base_model} version {run.version} "
                f"({len(run.files)} files, {run.metric_name}={run.metric_value:.4f}) to {store.uri(base)}"
            )
            return PublishResult(run.task, run.base_model, run.version, store.uri(base), True, message)
        except ConflictError:
            existing = _load_manifest(store, run.task, run.base_model, run.version)
    if {(f["name"], f["sha256"]) for f in existing["files"]} != {(f["name"], f["sha256"]) for f in run.files}:
        raise IntegrityError(
            f"{store.uri(base)}/{MANIFEST} lists other files than {run.path}; the version is damaged. "
            "Inspect it with `softprompt registry show` and restore it from a good copy"
        )
    note = f" (restored {restored} missing files)" if restored else ""
    message = f"{run.task}/{run.base_model} version {run.version} already exists at {store.uri(base)}; nothing to do"
    return PublishResult(run.task, run.base_model, run.version, store.uri(base), False, message + note)


def promote(
    store: ArtifactStore,
    task: str,
    base_model: str,
    version: str,
    *,
    gate: Gate = Gate(),  # a frozen dataclass, so a shared default is safe
    force: bool = False,
    reason: str = "",
) -> PromotionResult:
    """Make `version` the champion if it beats the current one on the same eval set.

    Args:
        store: where the registry lives.
        task: task name (sanitized like at publish).
        base_model: base-model name, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct' or its key segment.
        version: a published version id.
        gate: the metric and the margin the challenger must beat the champion by.
        force: promote even when the gate refuses (recorded as forced in the pointer and history).
        reason: free text recorded with the promotion.

    Returns:
        `promoted=False` with a message saying why when the gate refused.

    Raises:
        ConflictError: another promotion moved the pointer meanwhile; re-run to compare again.
        StoreError: unknown version or metric, or the store fails.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    challenger = _load_manifest(store, task, model, _check_version(version))
    value = _metric_value(challenger, gate.metric, store.uri(f"{task}/{model}/{version}/{MANIFEST}"))
    pointer, etag = _read_pointer(store, task, model)
    current = pointer["version"] if pointer else None

    def result(status: str, forced: bool, champion_value: float | None, message: str) -> PromotionResult:
        return PromotionResult(
            action="promote",
            status=status,
            task=task,
            base_model=model,
            version=version,
            promoted=status == "promoted",
            previous=current,
            forced=forced,
            metric=gate.metric,
            value=value,
            champion_value=champion_value,
            message=message,
        )

    if current == version:
        return result(
            "unchanged", False, value, f"{version} is already the champion of {task}/{model}; nothing to do"
        )
    refusal, champion_value = None, None
    if current is not None:
        refusal, champion_value = _gate_refusal(store, task, model, current, challenger, value, gate)
        if refusal and not force:
            return result("refused", False, champion_value, f"not promoted: {refusal}")
    forced = refusal is not None
    record = _pointer_record(task, model, challenger, gate.metric, value, "promote", forced, reason, current)
    _move_pointer(store, task, model, record, etag, current)
    how = f" (forced past: {refusal})" if refusal else ""
    beaten = f" over {current} ({champion_value})" if current else " (first champion)"
    message = f"promoted {version} to champion of {task}/{model}: {gate.metric}={value:.4f}{beaten}{how}"
    return result("promoted", forced, champion_value, message)


def rollback(
    store: ArtifactStore, task: str, base_model: str, to_version: str | None = None, *, reason: str = ""
) -> PromotionResult:
    """Move the champion pointer back, without a gate, and record it in the history.

    Args:
        store: where the registry lives.
        task: task name.
        base_model: base-model name or key segment.
        to_version: the version to serve again; None means the champion before the current one
            (repeated rollbacks walk further back, like an undo stack).
        reason: free text recorded with the rollback.

    Raises:
        ConflictError: another promotion moved the pointer meanwhile.
        StoreError: no champion, no previous champion, or unknown version.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    pointer, etag = _read_pointer(store, task, model)
    if pointer is None:
        raise StoreError(f"{task}/{model} has no champion in {store.uri()}; nothing to roll back")
    current = str(pointer["version"])
    target = to_version or pointer.get("previous")
    if not target:
        raise StoreError(
            f"champion {current} of {task}/{model} has no previous champion; pass --to VERSION "
            "(see `softprompt registry list`)"
        )
    manifest = _load_manifest(store, task, model, _check_version(str(target)))
    metric = str(manifest["metric"]["name"])
    value = float(manifest["metric"]["value"])
    moved = target != current
    if moved:
        previous = _previous_of(store, task, model, target)
        record = _pointer_record(task, model, manifest, metric, value, "rollback", False, reason, previous)
        _move_pointer(store, task, model, record, etag, current)
    message = (
        f"rolled back champion of {task}/{model} from {current} to {target}"
        if moved
        else f"{target} is already the champion of {task}/{model}; nothing to do"
    )
    return PromotionResult(
        action="rollback",
        status="rolled_back" if moved else "unchanged",
        task=task,
        base_model=model,
        version=target,
        promoted=moved,
        previous=current,
        forced=False,
        metric=metric,
        value=value,
        champion_value=None,
        message=message,
    )


def list_versions(store: ArtifactStore, task: str, base_model: str) -> list[VersionInfo]:
    """Every visible (MANIFEST.json present) version of a task/model, oldest first."""
    task, model = slug(task, "task"), slug(base_model, "base model")
    pointer, _ = _read_pointer(store, task, model)
    versions = []
    for key in store.list(f"{task}/{model}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and _VERSION_RE.match(parts[2]):
            versions.append(_info(store, task, model, _load_manifest(store, task, model, parts[2]), pointer))
    return sorted(versions, key=lambda v: (v.created_at, v.version))


def list_models(store: ArtifactStore) -> list[tuple[str, str]]:
    """Every (task, base_model) pair with at least one visible version."""
    pairs = set()
    for key in store.list():
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and _VERSION_RE.match(parts[2]):
            pairs.add((parts[0], parts[1]))
    return sorted(pairs)


def show(store: ArtifactStore, task: str, base_model: str, version: str = CHAMPION_ALIAS) -> VersionInfo:
    """Describe one version, or the champion when `version` is 'champion'."""
    task, model = slug(task, "task"), slug(base_model, "base model")
    resolved = _resolve_version(store, task, model, version)
    pointer, _ = _read_pointer(store, task, model)
    return _info(store, task, model, _load_manifest(store, task, model, resolved), pointer)


def pull(store: ArtifactStore, task: str, base_model: str, version: str, dest_dir: Path) -> Path:
    """Download a version into `dest_dir`, verifying every file against MANIFEST.json.

    Only bytes are written (nothing is unpickled or executed). File names come from the manifest
    and must stay directly inside `dest_dir`. Files already there with the right hash are kept.

    Returns:
        `dest_dir`, holding the version's files and its MANIFEST.json.

    Raises:
        IntegrityError: a downloaded file does not match its recorded SHA-256 or size.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    resolved = _resolve_version(store, task, model, version)
    manifest = _load_manifest(store, task, model, resolved)
    root = Path(dest_dir).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    for entry in manifest["files"]:
        target = _inside(root, entry["name"])
        if target.is_file() and not target.is_symlink() and sha256_file(target) == entry["sha256"]:
            continue
        key = f"{task}/{model}/{resolved}/{entry['name']}"
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".softprompt-pull-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            store.get_file(key, tmp)
            digest, size = sha256_file(tmp), tmp.stat().st_size
            if digest != entry["sha256"] or size != entry["size"]:
                raise IntegrityError(
                    f"{store.uri(key)} does not match {MANIFEST}: sha256 {digest} ({size} bytes), recorded "
                    f"{entry['sha256']} ({entry['size']} bytes); the stored copy is damaged — re-publish the run"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    # Written last and via rename, so it replaces (never follows) a symlink planted at that name.
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".softprompt-pull-")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp_name, _inside(root, MANIFEST))
    return Path(dest_dir)


def resolve_artifact(
    uri: str,
    cache_dir: Path,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
) -> Path:
    """Turn an artifact reference into a local, verified folder.

    Accepted: a run folder; a local registry version folder (verified against its MANIFEST.json);
    `<registry>/<task>/<model>/champion`; `s3://bucket/prefix/<task>/<model>/<version|champion>`
    (downloaded into `cache_dir`, re-using files already there with the right hash). In URIs the
    base model is its key segment, e.g. `huggingfacetb--smollm2-135m-instruct` (see `slug`).
    """
    if uri.startswith("s3://"):
        bucket, _, rest = uri[len("s3://") :].partition("/")
        parts = rest.strip("/").split("/")
        if not bucket or len(parts) < 3 or "" in parts:
            raise StoreError(
                f"artifact URI {uri!r} is incomplete; write s3://BUCKET/PREFIX/TASK/BASE_MODEL/VERSION"
            )
        *prefix, task, model, ref = parts
        store = S3Store(bucket, "/".join(prefix), endpoint_url=endpoint_url, region=region, profile=profile)
        task, model = slug(task, "task"), slug(model, "base model")
        version = _resolve_version(store, task, model, ref)
        cache_root = Path(cache_dir).expanduser().absolute()
        dest = cache_root.joinpath("s3", bucket, *prefix, task, model, version)
        if not dest.resolve().is_relative_to(cache_root.resolve()):
            raise StoreError(
                f"artifact URI {uri!r} would download outside the cache {cache_root}; fix the URI"
            )
        return pull(store, task, model, version, dest)
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file():
            verify_folder(path)
            return path
        if (path / "adapter_config.json").is_file():
            return path
        raise StoreError(
            f"{path} is not an artifact folder: it has neither {MANIFEST} (a registry version) nor "
            "adapter_config.json (a run folder)"
        )
    if path.name == CHAMPION_ALIAS and (path.parent / CHAMPION).is_file():
        model_dir = path.parent
        local = LocalStore(model_dir.parent.parent)
        version = _resolve_version(local, model_dir.parent.name, model_dir.name, CHAMPION_ALIAS)
        verify_folder(model_dir / version)
        return model_dir / version
    raise StoreError(
        f"artifact {uri!r} not found; pass a run folder, a registry version folder, "
        "<registry>/<task>/<base_model>/champion, or s3://BUCKET/PREFIX/TASK/BASE_MODEL/VERSION|champion"
    )


def verify_folder(folder: Path) -> dict[str, Any]:
    """Check every file a local version folder's MANIFEST.json lists; returns the manifest."""
    manifest = _parse_manifest((folder / MANIFEST).read_bytes(), str(folder / MANIFEST))
    root = folder.absolute()
    for entry in manifest["files"]:
        path = _inside(root, entry["name"])
        digest = sha256_file(path) if path.is_file() else "missing"
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"{path} does not match {MANIFEST}: sha256 {digest}, recorded {entry['sha256']}; "
                "pull the version again"
            )
    return manifest


def slug(name: str, what: str = "name") -> str:
    """The registry key segment for a task or base-model name: lowercase, '/' becomes '--'.

    Raises:
        StoreError: characters outside [a-z0-9._-] remain, naming the value and the fix.
    """
    value = str(name).strip().lower().replace("/", "--")
    if not _NAME_RE.match(value):
        raise StoreError(
            f"{what} {name!r} cannot be a registry key: after lowercasing and '/' -> '--' it is {value!r}; "
            "use 1-128 characters from [a-z0-9._-], starting with a letter or digit"
        )
    return value


def compute_version(files: list[tuple[str, str]]) -> str:
    """First 16 hex digits of SHA-256 over the sorted (file name, file SHA-256) pairs."""
    digest = hashlib.sha256()
    for name, sha in sorted(files):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Run:
    path: Path
    task: str
    task_name: str
    base_model: str
    base_model_name: str
    weights_sha256: str
    files: list[dict[str, Any]]
    version: str
    metric_name: str
    metric_value: float
    metrics: dict[str, Any]
    eval_fingerprint: str


def _read_run(run_dir: Path) -> _Run:
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
    return _Run(
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


def _manifest(run: _Run) -> dict[str, Any]:
    from softprompt import __version__

    def numbers(block: Any) -> dict[str, float]:
        items = block.items() if isinstance(block, dict) else []
        return {k: float(v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}

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
        "metrics": numbers(run.metrics["tuned"]),
        "baselines": {k: numbers(run.metrics.get(k)) for k in ("zero_shot", "few_shot") if k in run.metrics},
        "eval_fingerprint": run.eval_fingerprint,
        "created_at": _now().isoformat(timespec="seconds"),
        "softprompt_version": __version__,
    }


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
        raise IntegrityError(
            f"{store.uri(key)} already exists with sha256 {stored}, but this version needs {sha256}; a "
            "version's files never change, so the store is damaged or was edited by hand — delete that "
            "version folder (if it has no MANIFEST.json nothing uses it) and publish again"
        )
    return True


def _try_manifest(store: ArtifactStore, task: str, model: str, version: str) -> dict[str, Any] | None:
    try:
        return _load_manifest(store, task, model, version)
    except NotFoundError:
        return None


def _load_manifest(store: ArtifactStore, task: str, model: str, version: str) -> dict[str, Any]:
    key = f"{task}/{model}/{version}/{MANIFEST}"
    try:
        data = store.get_bytes(key)
    except NotFoundError:
        known = sorted(
            {k.split("/")[2] for k in store.list(f"{task}/{model}/") if k.endswith(f"/{MANIFEST}")}
        )
        raise NotFoundError(
            f"version {version} of {task}/{model} not found in {store.uri()}; published versions: "
            f"{', '.join(known) or 'none'} (see `softprompt registry list`)"
        ) from None
    manifest = _parse_manifest(data, store.uri(key))
    if (manifest["task"], manifest["base_model"].get("key"), manifest["version"]) != (task, model, version):
        raise IntegrityError(f"{store.uri(key)} describes another version; the registry was edited by hand")
    return manifest


def _parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        ok = manifest.get("format") == MANIFEST_FORMAT and all(
            _file_name_problem(f["name"]) is None
            and _SHA_RE.match(f["sha256"])
            and isinstance(f["size"], int)
            for f in manifest["files"]
        )
    except (ValueError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise IntegrityError(f"{where} is not a valid {MANIFEST_FORMAT} manifest; re-publish the version")
    return dict(manifest)


def _file_name_problem(name: Any) -> str | None:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        return f"unsafe file name {name!r}"
    return None


def _inside(root: Path, name: str) -> Path:
    """`root/name`, refusing names (or existing symlinks) that would land outside `root`."""
    problem = _file_name_problem(name)
    target = root / name
    if problem or not target.resolve().is_relative_to(root.resolve()):
        raise IntegrityError(
            f"refusing to write {name!r} outside {root}: {problem or 'it resolves elsewhere'}"
        )
    return target


def _check_version(version: str) -> str:
    if not _VERSION_RE.match(version):
        raise StoreError(f"version {version!r} is not a registry version id (16 hex digits, or 'champion')")
    return version


def _resolve_version(store: ArtifactStore, task: str, model: str, ref: str) -> str:
    if ref == CHAMPION_ALIAS:
        pointer, _ = _read_pointer(store, slug(task, "task"), slug(model, "base model"))
        if pointer is None:
            raise NotFoundError(
                f"{task}/{model} has no champion yet in {store.uri()}; promote a version first "
                "(`softprompt promote`) or name a version"
            )
        return _check_version(str(pointer["version"]))
    return _check_version(ref)


def _read_pointer(store: ArtifactStore, task: str, model: str) -> tuple[dict[str, Any] | None, str | None]:
    # Head first, then get. If the pointer moves in between, we hold the older etag and our
    # compare-and-swap fails safely. Get-then-head could pair old content with the new etag:
    # the swap would then succeed against a champion we never compared with (a lost update).
    key = f"{task}/{model}/{CHAMPION}"
    info = store.head(key)
    if info is None:
        return None, None
    try:
        pointer = json.loads(store.get_bytes(key))
    except NotFoundError:
        return None, None
    except ValueError as e:
        raise IntegrityError(f"{store.uri(key)} is not valid JSON ({e}); roll back with --to VERSION") from e
    return pointer, info.etag


def _metric_value(manifest: dict[str, Any], metric: str, where: str) -> float:
    value = manifest.get("metrics", {}).get(metric)
    if value is None:
        raise StoreError(
            f"{where} has no tuned metric {metric!r}; choose one of {sorted(manifest.get('metrics', {}))}"
        )
    return float(value)


def _gate_refusal(
    store: ArtifactStore,
    task: str,
    model: str,
    current: str,
    challenger: dict[str, Any],
    value: float,
    gate: Gate,
) -> tuple[str | None, float | None]:
    try:
        champion = _load_manifest(store, task, model, current)
    except NotFoundError:
        return f"the current champion {current} has no {MANIFEST}; nothing to compare against", None
    champion_value = champion.get("metrics", {}).get(gate.metric)
    if champion_value is None:
        return f"champion {current} has no {gate.metric!r} to compare against", None
    if champion["eval_fingerprint"] != challenger["eval_fingerprint"]:
        return (
            f"champion {current} was evaluated on eval set {champion['eval_fingerprint']!r} but "
            f"{challenger['version']} on {challenger['eval_fingerprint']!r}; scores on different eval sets are "
            "not comparable — evaluate both on the same split, or pass --force --reason '...'",
            float(champion_value),
        )
    delta = value - float(champion_value)
    if delta <= gate.min_delta:
        return (
            f"{challenger['version']} {gate.metric}={value:.4f} does not beat champion {current} "
            f"({float(champion_value):.4f}) by more than {gate.min_delta} (delta {delta:+.4f})",
            float(champion_value),
        )
    return None, float(champion_value)


def _pointer_record(
    task: str,
    model: str,
    manifest: dict[str, Any],
    metric: str,
    value: float,
    action: str,
    forced: bool,
    reason: str,
    previous: str | None,
) -> dict[str, Any]:
    return {
        "task": task,
        "base_model": model,
        "version": manifest["version"],
        "metric": {"name": metric, "value": value},
        "eval_fingerprint": manifest["eval_fingerprint"],
        "promoted_at": _now().isoformat(timespec="microseconds"),
        "action": action,
        "forced": forced,
        "reason": reason,
        "previous": previous,
    }


def _move_pointer(
    store: ArtifactStore, task: str, model: str, record: dict[str, Any], etag: str | None, current: str | None
) -> None:
    key = f"{task}/{model}/{CHAMPION}"
    body = json.dumps(record, indent=2, sort_keys=True).encode()
    try:
        if etag is None:
            store.put_bytes(key, body, if_none_match=True)
        else:
            store.put_bytes(key, body, if_match=etag)
    except ConflictError:
        now, _ = _read_pointer(store, task, model)
        raise ConflictError(
            f"another promotion moved champion of {task}/{model} from {current or 'none'} to "
            f"{now['version'] if now else 'none'} while you were promoting {record['version']}; "
            "re-run to compare against the new champion"
        ) from None
    # History goes after the pointer: a crash in between loses a log line but never records a
    # move that did not happen; rollback reads `previous` from the pointer itself.
    history = {**record, "from_version": current}
    stamp = _now().strftime("%Y%m%dT%H%M%S%fZ")
    for attempt in range(3):  # only collides if two moves share a microsecond
        try:
            store.put_bytes(
                f"{task}/{model}/history/{stamp}{'-' * attempt}-{record['version']}.json",
                json.dumps(history, indent=2, sort_keys=True).encode(),
                if_none_match=True,
            )
            return
        except ConflictError:
            continue


def _previous_of(store: ArtifactStore, task: str, model: str, version: str) -> str | None:
    """What a rollback from `version` should go to: its `previous` when it last became champion."""
    keys = [k for k in store.list(f"{task}/{model}/history/") if k.endswith(f"-{version}.json")]
    if not keys:
        return None
    record = json.loads(store.get_bytes(max(keys)))
    previous = record.get("previous")
    return str(previous) if previous else None


def _info(
    store: ArtifactStore, task: str, model: str, manifest: dict[str, Any], pointer: dict[str, Any] | None
) -> VersionInfo:
    version = str(manifest["version"])
    return VersionInfo(
        task=task,
        base_model=model,
        version=version,
        uri=store.uri(f"{task}/{model}/{version}"),
        created_at=str(manifest.get("created_at", "")),
        metric=str(manifest["metric"]["name"]),
        value=float(manifest["metric"]["value"]),
        eval_fingerprint=str(manifest.get("eval_fingerprint", "")),
        is_champion=bool(pointer and pointer.get("version") == version),
        manifest=manifest,
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)
