"""Repairing a damaged version: `softprompt registry repair TASK MODEL VERSION --from RUN_FOLDER`.

A version's files never change, so publish refuses to overwrite a stored file that differs from
the run folder, and pull refuses a file that differs from the manifest. This is the one command
that may overwrite them: it takes the run folder that published the version, proves it is that
version (its files hash to the version id), and rewrites every stored file that is missing or
differs (bytes are downloaded and hashed, not taken from the store's recorded checksum) and the
manifest when it is missing or damaged. It then checks the version again, end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from softprompt.errors import IntegrityError, StoreError
from softprompt.registry.integrity import MANIFEST, METRICS, stored_damage
from softprompt.registry.publishing import read_run, version_manifest
from softprompt.registry.store import ArtifactStore, NotFoundError
from softprompt.registry.versions import check_version, load_manifest, slug


@dataclass(frozen=True)
class RepairResult:
    """What `repair` did to one version."""

    task: str
    base_model: str
    version: str
    uri: str
    """Where the version lives (path or s3:// URI)."""
    restored: tuple[str, ...]
    """The files rewritten from the run folder (MANIFEST.json included when it was rewritten)."""
    message: str
    """One human line."""


def repair(store: ArtifactStore, task: str, base_model: str, version: str, run_dir: Path) -> RepairResult:
    """Restore a stored version from the run folder that published it.

    Args:
        store: where the registry lives.
        task: task name or key segment.
        base_model: base-model name or key segment.
        version: the damaged version's id.
        run_dir: the run folder it was published from; its files must hash to `version`.

    Returns:
        Which files were rewritten (none when the version was intact).

    Raises:
        StoreError: the run folder is not that version (or is incomplete), or the store fails.
        IntegrityError: the version is still damaged after the repair.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    check_version(version)
    run = read_run(Path(run_dir))
    if (run.task, run.base_model, run.version) != (task, model, version):
        raise StoreError(
            f"{run.path} publishes {run.task}/{run.base_model} version {run.version}, not {task}/{model} "
            f"{version}; a version can only be repaired from the run folder whose files hash to its id"
        )
    prefix = f"{task}/{model}/{version}"
    restored = []
    for name in stored_damage(store, prefix, run.files):
        store.put_file(f"{prefix}/{name}", run.path / name)  # the only overwrite of a version's file
        restored.append(name)
    try:
        stored = load_manifest(store, task, model, version)
        # A manifest whose figures disagree with the (hashed) metrics.json is damaged too.
        damaged = MANIFEST in stored_damage(store, prefix, [f for f in stored["files"] if f["name"] == METRICS], stored)
    except (NotFoundError, IntegrityError):
        damaged = True
    if damaged:
        body = json.dumps(version_manifest(run), indent=2, sort_keys=True).encode()
        store.put_bytes(f"{prefix}/{MANIFEST}", body)
        restored.append(MANIFEST)
    manifest = load_manifest(store, task, model, version)
    still = stored_damage(store, prefix, manifest["files"], manifest)
    if still:
        raise IntegrityError(
            f"{store.uri(prefix)} is still damaged after repairing it ({'; '.join(still.values())}); "
            "check the store (another writer, or a failing disk or bucket) and run the repair again"
        )
    message = (
        f"repaired {task}/{model} version {version} at {store.uri(prefix)}: rewrote {', '.join(restored)} "
        f"from {run.path}"
        if restored
        else f"{task}/{model} version {version} at {store.uri(prefix)} is intact; nothing to repair"
    )
    return RepairResult(task, model, version, store.uri(prefix), tuple(restored), message)
