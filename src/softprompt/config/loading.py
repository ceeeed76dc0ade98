"""Loading a job configuration: YAML (a path or `s3://`), `a.b=value` overrides, renamed keys of
earlier releases, and copies with changes. Every problem is collected and raised once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from softprompt.config.checks import validate
from softprompt.config.schema import JobConfig
from softprompt.config.typed import build
from softprompt.errors import ConfigError, StoreError

RENAMED = {
    "publish.store": "publish.registry",
    "publish.s3_endpoint_url": "s3.endpoint",
    "publish.region": "s3.region",
    "data.s3_endpoint_url": "s3.endpoint",
    "model.s3_endpoint_url": "s3.endpoint",
    "ray.storage_endpoint_url": "s3.endpoint",
}
"""Config keys of earlier releases -> their names now (docs/migration.md). A renamed key is an error
that names the new one, never silently ignored."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job configuration from YAML plus `a.b=value` overrides.

    Args:
        path: A YAML file; `None` starts from the defaults.
        overrides: `section.key=value` strings; values are parsed as YAML (`train.lr=0.1`,
            `evaluate.baselines=[zero_shot]`, `data.eval=null`).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem found (unknown keys with the valid ones, wrong types,
            out-of-range values, inconsistent sections).
    """
    raw: dict[str, Any] = {}
    source = str(path) if path is not None else None
    if path is not None:
        p = str(path)
        try:
            loaded = yaml.safe_load(_read_config_text(p))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}", source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}", source)
        raw = loaded
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, problems)
    cfg = build(JobConfig, raw, "", problems, RENAMED)
    # Cross-field checks run even after type errors (bad fields keep their defaults), so one
    # run of the command reports everything there is to fix.
    problems.extend(p for p in validate(cfg) if p not in problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a configuration from a plain mapping (e.g. a resolved config in a manifest)."""
    problems: list[str] = []
    cfg = build(JobConfig, raw, "", problems, RENAMED)
    problems.extend(p for p in validate(cfg) if p not in problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def recorded_config(raw: dict[str, Any]) -> JobConfig:
    """A configuration recorded by any release (a run manifest's `config`), renamed keys carried over
    to their new names: what a person writes must use the new names, what a published artifact
    recorded stays readable."""
    return config_from_dict(upgrade(raw))


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a plain config with keys of earlier releases (`RENAMED`) moved to their new names;
    a new key that is already set wins."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in RENAMED.items():
        old_section, _, old_key = old.partition(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        new_section, _, new_key = new.partition(".")
        target = out.setdefault(new_section, {})
        if isinstance(target, dict) and target.get(new_key) is None and value is not None:
            target[new_key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain data (the resolved config recorded in manifests)."""
    return dataclasses.asdict(cfg)


def replace(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    """A copy of `cfg` with `a.b=value` overrides (values as YAML text) applied and validated."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in overrides:
        parsed = _parse_override(item, problems)
        if parsed is not None:
            values[parsed[0]] = parsed[1]
    if problems:
        raise ConfigError(problems)
    return with_values(cfg, values)


def with_values(cfg: JobConfig, values: dict[str, Any]) -> JobConfig:
    """A copy of `cfg` with `{"section.key": value}` set (typed values, e.g. a Tune trial's) and validated."""
    raw = to_dict(cfg)
    problems: list[str] = []
    for key, value in values.items():
        _set_path(raw, key, value, problems)
    if problems:
        raise ConfigError(problems)
    return config_from_dict(raw)


def _read_config_text(path: str) -> str:
    """A config file's text: a local path, or `s3://bucket/key` (endpoint from $AWS_ENDPOINT_URL,
    credentials from the standard AWS chain) for jobs that start on a cluster."""
    from softprompt.uris import read_bytes

    try:
        return read_bytes(path).decode("utf-8")
    except StoreError as exc:
        fix = "pass an existing YAML file (or an s3:// URI)" if "://" not in path else "check the URI, s3 endpoint and credentials"
        raise ConfigError(f"cannot read config {path}: {exc}; {fix}", path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc}); save it as UTF-8", path) from exc


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    parsed = _parse_override(item, problems)
    if parsed is not None:
        _set_path(raw, parsed[0], parsed[1], problems)


def _parse_override(item: str, problems: list[str]) -> tuple[str, Any] | None:
    """`a.b=text` -> (`a.b`, the text read as YAML), or None with the problem recorded."""
    if "=" not in item:
        problems.append(f"override {item!r} must look like section.key=value")
        return None
    dotted, _, text = item.partition("=")
    key = ".".join(k for k in dotted.strip().split(".") if k)
    if not key:
        problems.append(f"override {item!r} has no key before '='")
        return None
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_path(raw: dict[str, Any], dotted: str, value: Any, problems: list[str]) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = {}
            node[k] = child
        if not isinstance(child, dict):
            problems.append(f"{dotted}={value!r}: {k} is not a section")
            return
        node = child
    node[keys[-1]] = value
