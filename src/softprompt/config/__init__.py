"""The job's configuration: typed sections (`schema.py`), loaded from YAML plus `a.b=value` overrides
(`loading.py`), checked together (`checks.py`) by a builder whose messages name key, value and fix
(`typed.py`). Import from here: `from softprompt.config import JobConfig, load_config`."""

from softprompt.config.checks import validate
from softprompt.config.loading import (
    RENAMED,
    config_from_dict,
    load_config,
    load_yaml,
    recorded_config,
    replace,
    to_dict,
    upgrade,
    with_values,
)
from softprompt.config.schema import (
    SEARCH_SPACE_TYPES,
    TUNABLE_SECTIONS,
    DataConfig,
    EvaluateConfig,
    JobConfig,
    ModelConfig,
    PromptConfig,
    PublishConfig,
    RayConfig,
    S3Config,
    TaskConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "RENAMED",
    "SEARCH_SPACE_TYPES",
    "TUNABLE_SECTIONS",
    "DataConfig",
    "EvaluateConfig",
    "JobConfig",
    "ModelConfig",
    "PromptConfig",
    "PublishConfig",
    "RayConfig",
    "S3Config",
    "TaskConfig",
    "TrainConfig",
    "TuneConfig",
    "config_from_dict",
    "load_config",
    "load_yaml",
    "recorded_config",
    "replace",
    "to_dict",
    "upgrade",
    "validate",
    "with_values",
]
