"""The prompt registry: artifact stores (a local folder or S3), immutable versions, the champion
pointer, and their command line.

`store.py` and `s3.py` hold the stores, `versions.py` the version layout and reading it,
`publishing.py` publishing a run folder, `champion.py` moving the champion pointer, `cli.py` the
commands; this module re-exports their public names."""

from typing import TYPE_CHECKING

from softprompt.registry.champion import Gate, PromotionResult, promote, rollback
from softprompt.registry.publishing import REQUIRED_FILES, PublishResult, publish
from softprompt.registry.store import ArtifactStore, open_store
from softprompt.registry.versions import (
    CHAMPION_ALIAS,
    VersionInfo,
    compute_version,
    list_models,
    list_versions,
    pull,
    resolve_artifact,
    show,
    slug,
    verify_folder,
)

if TYPE_CHECKING:
    from softprompt.config import JobConfig


def open_registry(cfg: "JobConfig") -> ArtifactStore:
    """The registry a job publishes to: `publish.registry` with the job's S3 endpoint and region."""
    return open_store(cfg.publish.registry, endpoint_url=cfg.s3.endpoint, region=cfg.s3.region)


__all__ = [
    "CHAMPION_ALIAS",
    "REQUIRED_FILES",
    "ArtifactStore",
    "Gate",
    "PromotionResult",
    "PublishResult",
    "VersionInfo",
    "compute_version",
    "list_models",
    "list_versions",
    "open_registry",
    "open_store",
    "promote",
    "publish",
    "pull",
    "resolve_artifact",
    "rollback",
    "show",
    "slug",
    "verify_folder",
]
