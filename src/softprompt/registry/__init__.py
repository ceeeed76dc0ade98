"""The prompt registry: artifact stores (a local folder or S3), immutable versions, the champion
pointer, and their command line.

`store.py` and `s3.py` hold the stores, `versions.py` the version layout and reading it,
`integrity.py` the checks of what was read, `publishing.py` publishing a run folder,
`champion.py` moving the champion pointer, `repair.py` restoring a damaged version, `cli.py` the
commands; this module re-exports their public names."""

from typing import TYPE_CHECKING

from softprompt.registry.champion import Gate, PromotionResult, promote, rollback
from softprompt.registry.integrity import compute_version, verify_folder
from softprompt.registry.publishing import REQUIRED_FILES, PublishResult, publish
from softprompt.registry.repair import RepairResult, repair
from softprompt.registry.store import ArtifactStore, open_store
from softprompt.registry.versions import (
    CHAMPION_ALIAS,
    VersionInfo,
    list_models,
    list_versions,
    pull,
    resolve_artifact,
    show,
    slug,
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
    "RepairResult",
    "VersionInfo",
    "compute_version",
    "list_models",
    "list_versions",
    "open_registry",
    "open_store",
    "promote",
    "publish",
    "pull",
    "repair",
    "resolve_artifact",
    "rollback",
    "show",
    "slug",
    "verify_folder",
]
