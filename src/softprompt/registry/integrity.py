"""What the registry checks before it trusts what it stored: a version's manifest (its shape, and its
id re-derived from the file hashes), the champion pointer and history records (their shape), and a
version's files, in a local folder or in a store, against the manifest.

A version id is the first 16 hex digits of a SHA-256 over the sorted (file name, file SHA-256)
pairs, computed at publish. A manifest whose files do not hash to its own id was changed after
publishing, however consistent it looks: rewriting a file and the manifest together keeps the old
id, and that is exactly what this module refuses. Versions published by earlier releases use the
same rule, so they verify unchanged.

Every refusal is an `IntegrityError` that names the file or key, what is wrong, and the fix: for a
stored version, `softprompt registry repair` (see `repair.py`); for the pointer, `rollback --to`
or `promote --force`, the two commands that may replace an unreadable pointer.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from softprompt.errors import IntegrityError
from softprompt.registry.objects import NotFoundError, sha256_file
from softprompt.registry.store import ArtifactStore

MANIFEST = "MANIFEST.json"
METRICS = "metrics.json"
MANIFEST_FORMAT = "softprompt.registry.version/1"
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def compute_version(files: list[tuple[str, str]]) -> str:
    """First 16 hex digits of SHA-256 over the sorted (file name, file SHA-256) pairs."""
    digest = hashlib.sha256()
    for name, sha in sorted(files):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()[:16]


def repair_command(task: str, model: str, version: str) -> str:
    """The command that restores a damaged stored version from the run folder that published it."""
    return f"softprompt registry repair {task} {model} {version} --from RUN_FOLDER"


def pointer_fix(task: str, model: str) -> str:
    """How to replace a damaged champion pointer: the two commands allowed to overwrite it."""
    return (
        f"point it at a good version with `softprompt rollback {task} {model} --to VERSION` or "
        f"`softprompt promote {task} {model} VERSION --force --reason '...'` (versions: `softprompt registry list`)"
    )


def parse_manifest(data: bytes, where: str, fix: str) -> dict[str, Any]:
    """A version's MANIFEST.json, checked: its shape, and that its files hash to its own id.

    Args:
        data: the manifest's bytes.
        where: its path or URI, for messages.
        fix: what the reader should do when it is damaged.

    Raises:
        IntegrityError: not a valid manifest, or its id is not the hash of its files.
    """
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{where} is not a valid {MANIFEST_FORMAT} manifest (not JSON: {e}); {fix}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise IntegrityError(f"{where} is not a valid {MANIFEST_FORMAT} manifest ({problem}); {fix}")
    derived = compute_version([(f["name"], f["sha256"]) for f in manifest["files"]])
    if derived != manifest["version"]:
        raise IntegrityError(
            f"{where} claims version {manifest['version']} but the files it lists hash to version {derived}: "
            f"a file and the manifest were changed after publishing, and a version's content never changes; {fix}"
        )
    return dict(manifest)


def parse_pointer(data: bytes, where: str, fix: str) -> dict[str, Any]:
    """A champion pointer (`champion.json`), checked; IntegrityError names the key and `fix`."""
    return _parse_record(data, where, "champion pointer", fix)


def parse_history(data: bytes, where: str, fix: str) -> dict[str, Any]:
    """A champion history record (`history/<time>-<version>.json`), checked like a pointer."""
    return _parse_record(data, where, "champion history record", fix)


def verify_folder(folder: Path, version: str | None = None) -> dict[str, Any]:
    """Check a local version folder (in a local registry, or pulled) against its MANIFEST.json.

    Args:
        folder: the folder holding the files and MANIFEST.json.
        version: the version it must hold; by default its folder name when that is a version id
            (a registry's or the artifact cache's layout), else whatever its manifest says.

    Returns:
        The manifest.

    Raises:
        IntegrityError: the manifest is missing or invalid, does not hash to its id, names another
            version than the folder's, or a file is missing or differs from what it records.
    """
    root = Path(folder).absolute()
    path = root / MANIFEST
    expected = version or (root.name if VERSION_RE.match(root.name) else None)
    fix = "pull the version into a fresh folder" + (
        f", or repair the registry's copy with `softprompt registry repair TASK MODEL {expected} --from RUN_FOLDER`"
        if expected
        else ""
    )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IntegrityError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    manifest = parse_manifest(data, str(path), fix)
    if expected and manifest["version"] != expected:
        raise IntegrityError(
            f"{path} describes version {manifest['version']}, but {root} holds version {expected}; {fix}"
        )
    for entry in manifest["files"]:
        target = inside(root, entry["name"])
        if not target.is_file():
            raise IntegrityError(f"{target} is missing; {MANIFEST} lists it; {fix}")
        digest, size = sha256_file(target), target.stat().st_size
        if (digest, size) != (entry["sha256"], entry["size"]):
            raise IntegrityError(
                f"{target} does not match {MANIFEST}: sha256 {digest} ({size} bytes), recorded "
                f"{entry['sha256']} ({entry['size']} bytes); {fix}"
            )
        if entry["name"] == METRICS:
            problem = metrics_problem(manifest, target.read_bytes())
            if problem:
                raise IntegrityError(f"{path}: {problem}; {fix}")
    return manifest


def metrics_problem(manifest: dict[str, Any], metrics_json: bytes) -> str | None:
    """What in a manifest disagrees with the version's own metrics.json, or None.

    The id covers the files, not the manifest's other fields; the figures the gate and `list` read
    from the manifest (the metric, the tuned and baseline metrics, the eval fingerprint) are copies
    of metrics.json's, which is hashed, so they are checked against it.
    """
    try:
        metrics = json.loads(metrics_json)
        name = manifest["metric"]["name"]
        expected = {
            "metric.value": float(metrics["tuned"][name]),
            "metrics": metric_numbers(metrics["tuned"]),
            "baselines": {k: metric_numbers(metrics[k]) for k in ("zero_shot", "few_shot") if k in metrics},
            "eval_fingerprint": metrics["eval_fingerprint"],
        }
        recorded = {
            "metric.value": manifest["metric"]["value"], "metrics": manifest.get("metrics"),
            "baselines": manifest.get("baselines"), "eval_fingerprint": manifest.get("eval_fingerprint"),
        }
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"metrics.json cannot be compared with it ({type(e).__name__}: {e})"
    wrong = [key for key in expected if recorded[key] != expected[key]]
    return f"its {', '.join(wrong)} differ from metrics.json's" if wrong else None


def metric_numbers(block: Any) -> dict[str, float]:
    """The numeric fields of a metrics block, as publish copies them into the manifest (and verify compares)."""
    items = block.items() if isinstance(block, dict) else []
    return {k: float(v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stored_damage(
    store: ArtifactStore, prefix: str, files: list[dict[str, Any]], manifest: dict[str, Any] | None = None
) -> dict[str, str]:
    """Download and hash each of a version's stored files; what is wrong with each damaged one.

    The bytes are hashed here rather than trusting the store's recorded checksum, which can be
    stale (an object rewritten with its old metadata).

    Args:
        store: the registry.
        prefix: the version's key, `task/model/version`.
        files: the manifest's `files` entries (name, sha256, size).
        manifest: the whole manifest, to check its figures against the stored metrics.json too
            (a disagreement is reported under MANIFEST.json).

    Returns:
        File name -> problem, for the files that are missing or differ; empty when all are intact.
    """
    damage: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=".softprompt-verify-") as tmp:
        for entry in files:
            key, local = f"{prefix}/{entry['name']}", Path(tmp) / "file"
            try:
                store.get_file(key, local)
            except NotFoundError:
                damage[entry["name"]] = f"{store.uri(key)} is missing"
                continue
            except IntegrityError as e:
                damage[entry["name"]] = str(e)
                continue
            digest, size = sha256_file(local), local.stat().st_size
            if (digest, size) != (entry["sha256"], entry["size"]):
                damage[entry["name"]] = (
                    f"{store.uri(key)} has sha256 {digest} ({size} bytes), {MANIFEST} records "
                    f"{entry['sha256']} ({entry['size']} bytes)"
                )
            elif manifest is not None and entry["name"] == METRICS:
                problem = metrics_problem(manifest, local.read_bytes())
                if problem:
                    damage[MANIFEST] = f"{store.uri(prefix + '/' + MANIFEST)}: {problem}"
    return damage


def inside(root: Path, name: str) -> Path:
    """`root/name`, refusing names (or existing symlinks) that would land outside `root`."""
    problem = _file_name_problem(name)
    target = root / name
    if problem or not target.resolve().is_relative_to(root.resolve()):
        raise IntegrityError(f"refusing to write {name!r} outside {root}: {problem or 'it resolves elsewhere'}")
    return target


# ------------------------------------------------------------------------------------------- helpers


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format is {manifest.get('format')!r}"
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        return "'files' is not a non-empty list"
    names = []
    for i, f in enumerate(files):
        if not isinstance(f, dict):
            return f"files[{i}] is not an object"
        problem = _file_name_problem(f.get("name"))
        if problem:
            return f"files[{i}]: {problem}"
        if not isinstance(f.get("sha256"), str) or not _SHA_RE.match(f["sha256"]):
            return f"files[{i}].sha256 is {f.get('sha256')!r}, not 64 lowercase hex digits"
        if not isinstance(f.get("size"), int) or isinstance(f["size"], bool) or f["size"] < 0:
            return f"files[{i}].size is {f.get('size')!r}, not a byte count"
        names.append(f["name"])
    if len(set(names)) != len(names):
        return f"'files' lists a name twice ({sorted(n for n in set(names) if names.count(n) > 1)})"
    if not isinstance(manifest.get("version"), str) or not VERSION_RE.match(manifest["version"]):
        return f"version is {manifest.get('version')!r}, not 16 hex digits"
    base, metric = manifest.get("base_model"), manifest.get("metric")
    if not isinstance(manifest.get("task"), str) or not isinstance(base, dict) or not isinstance(base.get("key"), str):
        return "'task' or 'base_model.key' is missing"
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not _is_number(metric.get("value")):
        return f"metric is {metric!r}, not {{'name': ..., 'value': number}}"
    if not isinstance(manifest.get("metrics", {}), dict) or not isinstance(manifest.get("eval_fingerprint"), str):
        return "'metrics' or 'eval_fingerprint' is missing or malformed"
    return None


def _parse_record(data: bytes, where: str, what: str, fix: str) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{where} is not a valid {what} (not JSON: {e}); {fix}") from None
    if not isinstance(record, dict):
        problem: str | None = f"it holds a JSON {type(record).__name__}, not an object"
    elif not isinstance(record.get("version"), str) or not VERSION_RE.match(record["version"]):
        problem = f"key 'version' is {record.get('version')!r}, not a version id (16 hex digits)"
    elif record.get("previous") is not None and not (
        isinstance(record["previous"], str) and VERSION_RE.match(record["previous"])
    ):
        problem = f"key 'previous' is {record['previous']!r}, not a version id or null"
    else:
        problem = None
    if problem:
        raise IntegrityError(f"{where} is not a valid {what}: {problem}; {fix}")
    return dict(record)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _file_name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        return f"unsafe file name {name!r}"
    return None
