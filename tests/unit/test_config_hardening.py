"""Config hardening: YAML alias bombs, values quoted in messages, and NaN/infinity in float fields."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import tracemalloc
import typing
from pathlib import Path
from typing import Any

import pytest

from softprompt.config import JobConfig, config_from_dict, load_config, validate
from softprompt.errors import ConfigError

BASE = ["task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "data.train=x"]
BASE_RAW: dict[str, Any] = {
    "task": {"labels": ["a", "b"], "verbalizer": {"a": [" a"], "b": [" b"]}},
    "data": {"train": "x"},
}


def _bomb(levels: int, width: int = 9) -> str:
    """Billion laughs: each anchored list repeats the one before `width` times."""
    names = [f"l{i}" for i in range(levels)]
    lines = [f"  {names[0]}: &{names[0]} [" + ", ".join(['"x"'] * width) + "]"]
    for prev, cur in itertools.pairwise(names):
        lines.append(f"  {cur}: &{cur} [" + ", ".join([f"*{prev}"] * width) + "]")
    return "anchors:\n" + "\n".join(lines) + f"\ntask:\n  labels: *{names[-1]}\n"


def _float_fields() -> list[str]:
    """Every float field of every section of the schema, found by type: a new one is covered."""
    found = []
    for section, tp in typing.get_type_hints(JobConfig).items():
        if dataclasses.is_dataclass(tp):
            for name, hint in typing.get_type_hints(typing.cast(type, tp)).items():
                if hint is float or float in typing.get_args(hint):
                    found.append(f"{section}.{name}")
    return found


FLOAT_FIELDS = _float_fields()


# --------------------------------------------------------------------------------------------------
# 7. Alias bombs and long values


@pytest.mark.parametrize("levels", [6, 9])  # 9**9 ~ 387 million values from under 1 KB
def test_alias_bomb_is_refused_quickly_in_little_memory(tmp_path: Path, levels: int) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(levels), encoding="utf-8")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as err:
            load_config(path)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert str(path) in message and "aliases expand to more than 100,000 values" in message
    assert "anchors (&name) and aliases (*name)" in message  # the fix
    assert len(message) < 500 and seconds < 5 and peak < 50 * 2**20


def test_ordinary_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "words: &words [' yes']\ntask:\n  labels: [a, b]\n  verbalizer: {a: *words, b: [' no']}\n"
        "data: {train: x}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="unknown key words"):  # loaded, then checked as usual
        load_config(path)


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("task:\n  labels: &l [a, *l]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"alias at line 2 refers to a value that contains it"):
        load_config(path)


def test_alias_bomb_in_an_override_is_refused() -> None:
    width = ", ".join(["x"] * 9)
    levels = [f"&a0 [{width}]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, f"task.labels=[{', '.join(levels)}]"])
    assert "override task.labels: its aliases expand" in str(err.value) and len(str(err.value)) < 500


def test_long_values_are_clipped_in_messages() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, "train.lr=" + "a" * 20_000, "task.name=" + "N" * 20_000])
    message = str(err.value)
    assert "train.lr='aaaa" in message and "... (20000 chars) must be a number" in message
    assert "task.name='NNNN" in message and "... (20000 chars): use lowercase" in message
    assert len(message) < 1500

    many = {**BASE_RAW, "task": {**BASE_RAW["task"], "labels": ["a", "b"] * 50_000}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(many)
    duplicates = next(p for p in err.value.problems if "has duplicates" in p)
    assert "... (100000 items) has duplicates" in duplicates and len(duplicates) < 400


# --------------------------------------------------------------------------------------------------
# 8. NaN and infinity in float fields


def test_float_fields_are_found() -> None:
    assert {"train.lr", "train.max_grad_norm", "data.eval_fraction", "ray.gpus_per_worker"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_every_float_field_refuses_nan_and_infinity(key: str, value: float) -> None:
    section, name = key.split(".")
    raw = {**BASE_RAW, section: {**BASE_RAW.get(section, {}), name: value}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    (problem,) = [p for p in err.value.problems if p.startswith(f"{key}=")]
    assert f"{key}={value!r} is not a finite number" in problem and "set a real number" in problem


@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_validate_refuses_nan_in_a_config_built_in_code(key: str) -> None:
    section, name = key.split(".")
    cfg = config_from_dict(BASE_RAW)
    bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: math.nan})})
    assert any(p.startswith(f"{key}=nan is not a finite number") for p in validate(bad))


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", ".nan", ".inf", "-.inf", "1e999", "Infinity"])
def test_overrides_refuse_nan_and_infinity(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, f"train.lr={text}"])
    message = str(err.value)
    assert "train.lr=" in message and "is not a finite number" in message and "e.g. train.lr=0.03" in message


def test_finite_overrides_still_work() -> None:
    cfg = load_config(None, [*BASE, "train.lr=1e-4", "train.max_grad_norm=null", "ray.cpus_per_worker=0.5"])
    assert (cfg.train.lr, cfg.train.max_grad_norm, cfg.ray.cpus_per_worker) == (1e-4, None, 0.5)


def test_search_space_refuses_infinite_range() -> None:
    with pytest.raises(ConfigError, match=r"tune.search_space.train.lr: low=0.01 high=inf: both must be finite"):
        load_config(None, [*BASE, "tune.num_samples=2", "tune.search_space={train.lr: {type: uniform, low: 0.01, high: .inf}}"])
