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

This module reads: list, show, pull, verify and resolve versions, including the `champion` alias,
so it reads the pointer too. Writing lives in `publishing.py` (a new version) and `champion.py`
(moving the pointer); both import from here, never the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.errors import IntegrityError, StoreError
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import ArtifactStore, LocalStore, NotFoundError, sha256_file

MANIFEST = "MANIFEST.json"
CHAMPION = "champion.json"
CHAMPION_ALIAS = "champion"
MANIFEST_FORMAT = "softprompt.registry.version/1"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


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


def list_versions(store: ArtifactStore, task: str, base_model: str) -> list[VersionInfo]:
    """Every visible (MANIFEST.json present) version of a task/model, oldest first."""
    task, model = slug(task, "task"), slug(base_model, "base model")
    pointer, _ = read_pointer(store, task, model)
    versions = []
    for key in store.list(f"{task}/{model}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and _VERSION_RE.match(parts[2]):
            versions.append(_info(store, task, model, load_manifest(store, task, model, parts[2]), pointer))
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
    pointer, _ = read_pointer(store, task, model)
    return _info(store, task, model, load_manifest(store, task, model, resolved), pointer)


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
    manifest = load_manifest(store, task, model, resolved)
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


def load_manifest(store: ArtifactStore, task: str, model: str, version: str) -> dict[str, Any]:
    """A version's MANIFEST.json, checked; NotFoundError lists the published versions."""
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


def read_pointer(store: ArtifactStore, task: str, model: str) -> tuple[dict[str, Any] | None, str | None]:
    """The champion pointer of a task/model and its etag (for a compare-and-swap), or (None, None)."""
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


def check_version(version: str) -> str:
    """Return `version` if it is a version id (16 hex digits), else raise StoreError."""
    if not _VERSION_RE.match(version):
        raise StoreError(f"version {version!r} is not a registry version id (16 hex digits, or 'champion')")
    return version


# ------------------------------------------------------------------------------------------- helpers


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
