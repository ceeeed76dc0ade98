"""The prompt registry: artifact stores (a local folder or S3), immutable versions, the champion
pointer, and their command line."""

from softprompt.registry.versions import (
    CHAMPION_ALIAS,
    REQUIRED_FILES,
    Gate,
    PromotionResult,
    PublishResult,
    VersionInfo,
    compute_version,
    list_models,
    list_versions,
    promote,
    publish,
    pull,
    resolve_artifact,
    rollback,
    show,
    slug,
    verify_folder,
)

__all__ = [
    "CHAMPION_ALIAS",
    "REQUIRED_FILES",
    "Gate",
    "PromotionResult",
    "PublishResult",
    "VersionInfo",
    "compute_version",
    "list_models",
    "list_versions",
    "promote",
    "publish",
    "pull",
    "resolve_artifact",
    "rollback",
    "show",
    "slug",
    "verify_folder",
]
