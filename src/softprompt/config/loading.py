"""Loading a job configuration: YAML (a path or `s3://`), `a.b=value` overrides, renamed keys of
earlier releases, and copies with changes. Every problem is collected and raised once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from softprompt.config.checks import validate
from softprompt.config.schema import JobConfig
from softprompt.config.typed import build, shown
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

MAX_YAML_NODES = 100_000
"""The most values (scalars, lists, mappings) a config's YAML may hold once every alias (`*name`) is
counted at each use. A real config holds a few hundred; an alias bomb (each list repeating the last
one ten times) holds billions in 2 KB, and quoting one in a message took gigabytes."""


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
            loaded = load_yaml(_read_config_text(p), p)
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


def load_yaml(text: str, where: str) -> Any:
    """YAML text as plain data, the way a config is read: YAML's safe subset, refusing text whose
    aliases expand past `MAX_YAML_NODES` values or refer to themselves.

    Args:
        text: The YAML.
        where: What holds it (a file, an override), for the message.

    Raises:
        ConfigError: the aliases expand too far or loop, naming `where` and the fix.
        yaml.YAMLError: the text is not YAML.
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _AliasBomb as exc:
        raise ConfigError(f"{where}: {exc}; write the values out instead of nesting anchors (&name) and aliases (*name)") from None
    finally:
        loader.dispose()


def config_from_dict(raw: dict[str, Any], *, inference_only: bool = False) -> JobConfig:
    """Build and validate a configuration from a plain mapping (e.g. a resolved config in a manifest).

    `inference_only` skips the checks that matter only for training (see `validate`)."""
    problems: list[str] = []
    cfg = build(JobConfig, raw, "", problems, RENAMED)
    problems.extend(p for p in validate(cfg, inference_only=inference_only) if p not in problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def recorded_config(raw: dict[str, Any]) -> JobConfig:
    """A configuration recorded by any release (a run manifest's `config`), renamed keys carried over
    to their new names: what a person writes must use the new names, what a published artifact
    recorded stays readable. It is read to predict with a finished run's prompt, so the checks that
    matter only for training are skipped (an artifact trained in float16 by an earlier release
    still predicts)."""
    return config_from_dict(upgrade(raw), inference_only=True)


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


class _AliasBomb(Exception):
    """YAML whose aliases expand past the limit or refer to themselves (the text says which)."""


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that measures a document before building it. PyYAML builds an alias as a
    shared reference, so loading a bomb is cheap; everything after (the typed builder walking it,
    `repr` in a message, `dataclasses.asdict`) expands it in full."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node, MAX_YAML_NODES)
        return node


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Raise `_AliasBomb` when the document under `root`, every alias expanded, holds more than
    `limit` nodes or contains itself. Counts each shared node once (memoized), so it costs as much
    as the text, not as its expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the path from the root: seeing one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                line = node.start_mark.line + 1
                raise _AliasBomb(f"its aliases expand to more than {limit:,} values (at line {line})")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _AliasBomb(f"an alias at line {node.start_mark.line + 1} refers to a value that contains it")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


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
        problems.append(f"override {shown(item)} must look like section.key=value")
        return None
    dotted, _, text = item.partition("=")
    key = ".".join(k for k in dotted.strip().split(".") if k)
    if not key:
        problems.append(f"override {shown(item)} has no key before '='")
        return None
    try:
        value = load_yaml(text, f"override {key}") if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
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
            problems.append(f"{dotted}={shown(value)}: {k} is not a section")
            return
        node = child
    node[keys[-1]] = value
