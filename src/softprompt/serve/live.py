"""The prompts a replica serves, with the registry version each one is, refreshed while it serves.

An alias (`<registry>/<task>/<model>/champion`, local or `s3://`) is re-read every `serve.refresh_s`;
when the pointer has moved, the new version is downloaded, verified and loaded beside the old one,
then swapped in with one assignment. A batch takes a `snapshot` when it starts, so every row of it
runs, and is answered as, one version: a promotion under load fails no request, and each response
names the version that answered. A refresh that fails (store down, a damaged version) keeps the
version being served and says so in the log; it never fails a request.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.errors import SoftpromptError
from softprompt.predict import PromptRef, PromptTable, TunedPrompt, load_prompts, resolve_prompts, split_spec

log = logging.getLogger("softprompt.serve")


@dataclass(frozen=True)
class Served:
    """One prompt as served now: its loaded embeddings, registry version and where it came from."""

    prompt: TunedPrompt
    version: str | None
    """The registry version id (16 hex digits), or None for a run's artifact folder."""
    ref: str
    """The reference as given (`[NAME=]` stripped): an alias here is what refresh re-reads."""
    manifest: dict[str, Any]
    """The version's MANIFEST.json ({} for a run folder)."""


class LivePrompts:
    """Named prompts on one loaded base model, their versions, and the refresh that moves aliases."""

    def __init__(self, specs: Sequence[str], *, model: str | None = None, s3_endpoint: str | None = None) -> None:
        """Resolve and load every `[NAME=]DIR_OR_URI` spec (see `predict.resolve_prompts`)."""
        self.s3_endpoint = s3_endpoint
        self.refs: list[PromptRef] = resolve_prompts(specs, s3_endpoint=s3_endpoint)
        self.table = load_prompts(self.refs, model=model, s3_endpoint=s3_endpoint)
        self._lock = threading.Lock()  # one refresh at a time; readers never wait
        self._served = {r.name: _served(self.table.prompts[r.name], r.folder, r.ref) for r in self.refs}

    def snapshot(self) -> tuple[PromptTable, dict[str, Served]]:
        """A table and versions that stay consistent for one batch, whatever refresh does meanwhile."""
        served = self._served  # one read of the reference: the swap in `refresh` is atomic
        table = PromptTable(self.table.loaded)
        table.prompts = {name: s.prompt for name, s in served.items()}
        return table, served

    @property
    def served(self) -> dict[str, Served]:
        """The prompts served now, by name."""
        return self._served

    def refresh(self) -> list[str]:
        """Re-read every alias; load and swap in each moved one. Returns one line per change.

        Errors are logged, not raised: the version being served stays until a refresh succeeds.
        """
        from softprompt.registry import resolve_artifact
        from softprompt.uris import artifact_cache

        changes = []
        with self._lock:
            for ref in self.refs:
                if not is_alias(ref.ref):
                    continue
                current = self._served[ref.name]
                try:
                    folder = resolve_artifact(ref.ref, artifact_cache(), endpoint_url=self.s3_endpoint)
                    version = _manifest(folder).get("version")
                    if version == current.version:
                        continue
                    scratch = PromptTable(self.table.loaded)
                    prompt = scratch.add(ref.name, folder)
                except (SoftpromptError, OSError, ValueError) as exc:
                    log.warning("refreshing prompt %r (%s) failed; still serving version %s: %s", ref.name, ref.ref, current.version, exc)
                    continue
                self._served = {**self._served, ref.name: _served(prompt, folder, ref.ref)}
                changes.append(f"prompt {ref.name!r}: {ref.ref} moved from version {current.version} to {version}")
                log.warning("%s", changes[-1])
        return changes


def is_alias(ref: str) -> bool:
    """True for a reference whose target can move (`.../champion`)."""
    return ref.rstrip("/").rsplit("/", 1)[-1] == "champion"


def log_location(specs: Sequence[str], setting: str) -> str | None:
    """The registry the prediction log of `specs` writes to, or None for no log. `setting` is
    `serve.prediction_log` (or `softprompt predict --prediction-log`): `off`, a registry URI, or
    `auto`: the registry of the first registry reference (none when every one is a run folder)."""
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    for spec in specs:
        root = registry_root(split_spec(spec)[1])
        if root:
            return root
    return None


def registry_root(ref: str) -> str | None:
    """The registry a `<registry>/<task>/<model>/<version|champion>` reference lives in, or None for a run folder."""
    if ref.startswith("s3://"):
        bucket, _, rest = ref[len("s3://"):].partition("/")
        parts = rest.strip("/").split("/")
        return f"s3://{bucket}/{'/'.join(parts[:-3])}".rstrip("/") if len(parts) >= 3 else None
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    if is_alias(ref):  # a version folder may be a pulled copy outside any registry
        return str(path.parent.parent.parent)
    return None


def _served(prompt: TunedPrompt, folder: Path, ref: str) -> Served:
    manifest = _manifest(folder)
    return Served(prompt, prompt_version(folder), ref, manifest)


def prompt_version(folder: Path) -> str | None:
    """The registry version a prompt folder holds (its MANIFEST.json), or None for a run's artifact folder."""
    version = _manifest(folder).get("version")
    return version if isinstance(version, str) else None


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(folder) / "MANIFEST.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
