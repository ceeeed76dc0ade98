"""The prompt registry's versions: their layout, their manifest, and reading them.

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

This module reads: list, show, pull and resolve versions, including the `champion` alias, so it
reads the pointer too; what makes a manifest, a pointer or a folder trustworthy is `integrity.py`'s.
Writing lives in `publishing.py` (a new version), `champion.py` (moving the pointer) and
`repair.py` (restoring a damaged version); they import from here, never the other way round.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.errors import IntegrityError, StoreError
from softprompt.registry.integrity import (
    MANIFEST,
    VERSION_RE,
    inside,
    parse_manifest,
    parse_pointer,
    pointer_fix,
    repair_command,
    verify_folder,
)
from softprompt.registry.objects import file_mode
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import ArtifactStore, LocalStore, NotFoundError, sha256_file

CHAMPION = "champion.json"
CHAMPION_ALIAS = "champion"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


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


def list_versions(
    store: ArtifactStore, task: str, base_model: str, *, on_damage: Callable[[IntegrityError], None] | None = None
) -> list[VersionInfo]:
    """Every visible (MANIFEST.json present) version of a task/model, oldest first.

    Args:
        store: the registry.
        task: task name or key segment.
        base_model: base-model name or key segment.
        on_damage: when given, a damaged manifest or champion pointer is passed to it and skipped
            (so one bad version does not hide the others); when None, it is raised.

    Raises:
        IntegrityError: a damaged manifest or pointer, when `on_damage` is None.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    try:
        pointer, _ = read_pointer(store, task, model)
    except IntegrityError as e:
        if on_damage is None:
            raise
        on_damage(e)
        pointer = None
    versions = []
    for key in store.list(f"{task}/{model}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and VERSION_RE.match(parts[2]):
            try:
                manifest = load_manifest(store, task, model, parts[2])
            except IntegrityError as e:
                if on_damage is None:
                    raise
                on_damage(e)
                continue
            versions.append(_info(store, task, model, manifest, pointer))
    return sorted(versions, key=lambda v: (v.created_at, v.version))


def list_models(store: ArtifactStore) -> list[tuple[str, str]]:
    """Every (task, base_model) pair with at least one visible version."""
    pairs = set()
    for key in store.list():
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and VERSION_RE.match(parts[2]):
            pairs.add((parts[0], parts[1]))
    return sorted(pairs)


def show(store: ArtifactStore, task: str, base_model: str, version: str = CHAMPION_ALIAS) -> VersionInfo:
    """Describe one version, or the champion when `version` is 'champion'."""
    task, model = slug(task, "task"), slug(base_model, "base model")
    resolved = _resolve_version(store, task, model, version)  # the alias needs a readable pointer
    pointer = pointer_state(store, task, model).record  # a named version does not
    return _info(store, task, model, load_manifest(store, task, model, resolved), pointer)


def pull(store: ArtifactStore, task: str, base_model: str, version: str, dest_dir: Path) -> Path:
    """Download a version into `dest_dir`, verifying every file against MANIFEST.json.

    Everything is downloaded and verified in a temporary folder next to `dest_dir` first, so a
    failed pull leaves `dest_dir` as it was: a new `dest_dir` appears in one rename; in an existing
    one, files already there with the right hash are kept, the others are replaced, and
    MANIFEST.json goes last. Only bytes are written (nothing is unpickled or executed); file names
    come from the manifest and must stay directly inside `dest_dir`. Files get the usual modes
    (0644 under umask 022).

    Returns:
        `dest_dir`, holding the version's files and its MANIFEST.json.

    Raises:
        IntegrityError: the manifest does not hash to its version id, or a downloaded file does not
            match its recorded SHA-256 or size; the message names `softprompt registry repair`.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    resolved = _resolve_version(store, task, model, version)
    manifest = load_manifest(store, task, model, resolved)
    root = Path(dest_dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise StoreError(f"cannot pull into {root}: it is a file; name a folder with --dest")
    root.parent.mkdir(parents=True, exist_ok=True)
    existed = root.is_dir()
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".softprompt-pull-{root.name}-"))
    try:
        fetched = []
        for entry in manifest["files"]:
            kept = inside(root, entry["name"]) if existed else None
            if kept and kept.is_file() and not kept.is_symlink() and sha256_file(kept) == entry["sha256"]:
                continue
            _fetch(store, f"{task}/{model}/{resolved}", entry, staging)
            fetched.append(entry["name"])
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        staging.chmod(file_mode(0o777))  # mkdtemp's 0700 would make the folder private
        try:
            if existed:
                raise FileExistsError(root)
            os.rename(staging, root)
        except OSError as e:  # it existed, or another pull created it meanwhile: move the files in
            if not root.is_dir():
                raise StoreError(f"cannot create {root} ({e.strerror or e}); check --dest and its permissions") from e
            _replace_files(root, staging, fetched, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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

    Accepted: a run folder; a registry version folder, local or pulled (any folder holding
    MANIFEST.json: verified, its id re-derived from its files); `<registry>/<task>/<model>/champion`;
    `s3://bucket/prefix/<task>/<model>/<version|champion>` (downloaded into `cache_dir`, re-using
    files already there with the right hash). In URIs the base model is its key segment, e.g.
    `huggingfacetb--smollm2-135m-instruct` (see `slug`).

    Raises:
        IntegrityError: a registry folder that fails verification.
        StoreError: a reference that names nothing usable.
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
        if VERSION_RE.match(path.name):
            raise IntegrityError(
                f"{path} is named like a registry version but has no {MANIFEST}: an unfinished publish or a "
                "damaged copy, so it cannot be verified; publish the run again, or pull the version into a fresh folder"
            )
        if (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file():
            return path
        raise StoreError(
            f"{path} is not an artifact folder: it has neither {MANIFEST} (a registry version) nor "
            "adapter_config.json (a run folder)"
        )
    if path.name == CHAMPION_ALIAS and (path.parent / CHAMPION).is_file():
        model_dir = path.parent
        local = LocalStore(model_dir.parent.parent)
        version = _resolve_version(local, model_dir.parent.name, model_dir.name, CHAMPION_ALIAS)
        verify_folder(model_dir / version, version)
        return model_dir / version
    raise StoreError(
        f"artifact {uri!r} not found; pass a run folder, a registry version folder, "
        "<registry>/<task>/<base_model>/champion, or s3://BUCKET/PREFIX/TASK/BASE_MODEL/VERSION|champion"
    )


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


def load_manifest(store: ArtifactStore, task: str, model: str, version: str) -> dict[str, Any]:
    """A version's MANIFEST.json, checked (shape, id re-derived from its files, location).

    Raises:
        NotFoundError: no such version; the message lists the published ones.
        IntegrityError: the manifest is damaged; the message names `softprompt registry repair`.
    """
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
    fix = f"repair it from the run folder that published it: `{repair_command(task, model, version)}`"
    manifest = parse_manifest(data, store.uri(key), fix)
    found = (manifest["task"], manifest["base_model"]["key"], manifest["version"])
    if found != (task, model, version):
        raise IntegrityError(
            f"{store.uri(key)} describes {'/'.join(found)}, not {task}/{model}/{version}: the registry was "
            f"edited by hand; {fix}"
        )
    return manifest


@dataclass(frozen=True)
class PointerState:
    """The champion pointer as stored, readable or not (the commands that repair it need its etag)."""

    record: dict[str, Any] | None
    """The checked pointer, or None when there is none or it is damaged."""
    etag: str | None
    """The stored object's etag, damaged or not, for a compare-and-swap; None when there is none."""
    damage: str | None
    """Why the stored pointer cannot be used (names the key and the fix), or None."""


def pointer_state(store: ArtifactStore, task: str, model: str) -> PointerState:
    """The champion pointer of a task/model, its etag, and what is wrong with it, without raising."""
    # Head first, then get. If the pointer moves in between, we hold the older etag and our
    # compare-and-swap fails safely. Get-then-head could pair old content with the new etag:
    # the swap would then succeed against a champion we never compared with (a lost update).
    key = f"{task}/{model}/{CHAMPION}"
    info = store.head(key)
    if info is None:
        return PointerState(None, None, None)
    try:
        data = store.get_bytes(key)
    except NotFoundError:
        return PointerState(None, None, None)
    except IntegrityError as e:  # the object fails its own checksum
        return PointerState(None, info.etag, f"{e}; {pointer_fix(task, model)}")
    try:
        return PointerState(parse_pointer(data, store.uri(key), pointer_fix(task, model)), info.etag, None)
    except IntegrityError as e:
        return PointerState(None, info.etag, str(e))


def read_pointer(store: ArtifactStore, task: str, model: str) -> tuple[dict[str, Any] | None, str | None]:
    """The champion pointer of a task/model and its etag (for a compare-and-swap), or (None, None).

    Raises:
        IntegrityError: the pointer is not valid JSON or lacks a version id; names the fix.
    """
    state = pointer_state(store, task, model)
    if state.damage:
        raise IntegrityError(state.damage)
    return state.record, state.etag


def check_version(version: str) -> str:
    """Return `version` if it is a version id (16 hex digits), else raise StoreError."""
    if not VERSION_RE.match(version):
        raise StoreError(f"version {version!r} is not a registry version id (16 hex digits, or 'champion')")
    return version


# ------------------------------------------------------------------------------------------- helpers


def _fetch(store: ArtifactStore, prefix: str, entry: dict[str, Any], staging: Path) -> None:
    """Download one listed file into `staging` and check it against the manifest."""
    task, model, version = prefix.split("/")
    key, target = f"{prefix}/{entry['name']}", inside(staging, entry["name"])
    fix = f"the stored copy is damaged — repair it with `{repair_command(task, model, version)}`, then pull again"
    try:
        store.get_file(key, target)
    except IntegrityError as e:
        raise IntegrityError(f"{e}; {fix}") from None
    digest, size = sha256_file(target), target.stat().st_size
    if digest != entry["sha256"] or size != entry["size"]:
        raise IntegrityError(
            f"{store.uri(key)} does not match {MANIFEST}: sha256 {digest} ({size} bytes), recorded "
            f"{entry['sha256']} ({entry['size']} bytes); {fix}"
        )


def _replace_files(root: Path, staging: Path, fetched: list[str], manifest: dict[str, Any]) -> None:
    """Move verified files from `staging` into an existing `root`; its MANIFEST.json goes last.

    Until then an interrupted move leaves the old manifest, which the new files fail, so the folder
    is refused rather than trusted half-updated. Files the old manifest listed and the new one does
    not are removed.
    """
    try:
        old = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        stale = {f["name"] for f in old["files"]} - {f["name"] for f in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        stale = set()
    for name in fetched:
        os.replace(staging / name, inside(root, name))
    for name in sorted(stale):
        with contextlib.suppress(IntegrityError):  # an unsafe name in the old manifest: leave it
            inside(root, name).unlink(missing_ok=True)
    os.replace(staging / MANIFEST, inside(root, MANIFEST))


def _resolve_version(store: ArtifactStore, task: str, model: str, ref: str) -> str:
    if ref == CHAMPION_ALIAS:
        pointer, _ = read_pointer(store, slug(task, "task"), slug(model, "base model"))
        if pointer is None:
            raise NotFoundError(
                f"{task}/{model} has no champion yet in {store.uri()}; promote a version first "
                "(`softprompt promote`) or name a version"
            )
        return check_version(str(pointer["version"]))
    return check_version(ref)


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
