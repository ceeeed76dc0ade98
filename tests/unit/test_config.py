"""Config: every shipped YAML validates; unknown keys, types and overrides give errors people can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from softprompt.config import JobConfig, config_from_dict, load_config, replace, to_dict
from softprompt.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))
TASK = {"labels": ["neg", "pos"], "verbalizer": {"neg": [" no"], "pos": [" yes"]}}


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return exc.value.problems


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_there_are_shipped_configs() -> None:
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "sst2.yaml", "trec.yaml", "agnews.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    # Each file starts with the command that runs it (STYLE.md).
    assert path.read_text(encoding="utf-8").startswith("# softprompt ")
    # A round trip through plain data (what manifests record) gives the same config.
    assert config_from_dict(to_dict(cfg)) == cfg


def test_defaults_plus_minimal_task_validate() -> None:
    cfg = config_from_dict({"task": TASK, "data": {"train": "x.csv"}})
    assert cfg.train.steps > 0 and cfg.task.labels == ["neg", "pos"]


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path, "task: {labels: [a, b], verbalizer: {a: [' a'], b: [' b']}}\ndata: {train: x.csv}\ntrain: {stpes: 5}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (problem,) = _problems(exc)
    assert "unknown key train.stpes" in problem
    assert "did you mean 'steps'" in problem
    for key in ("steps", "batch_size", "grad_accum", "lr", "seed"):
        assert key in problem  # the valid keys are listed
    assert str(path) in str(exc.value)


def test_unknown_section_is_rejected_too() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"task": TASK, "data": {"train": "x.csv"}, "trian": {"steps": 3}})
    (problem,) = _problems(exc)
    assert "unknown key trian" in problem and "did you mean 'train'" in problem


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "task": {"labels": ["a"], "verbalizer": {}, "templat": "x"},
        "data": {"train": ""},
        "train": {"lr": "fast", "steps": 0},
        "prompt": {"num_virtual_tokens": 0},
    }
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    text = "\n".join(_problems(exc))
    for fragment in ("task.templat", "train.lr='fast' must be a number", "train.steps=0", "num_virtual_tokens=0", "data.train is empty", "at least 2 labels"):
        assert fragment in text, fragment
    assert len(_problems(exc)) >= 6
    assert f"{len(_problems(exc))} problems" in str(exc.value)


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        None,
        [
            "task.labels=[neg, pos]",
            "task.verbalizer={neg: [' no'], pos: [' yes']}",
            "data.train=x.csv",
            "train.lr=0.1",
            "train.steps=7",
            "train.warmup_steps=2",
            "train.max_grad_norm=null",
            "train.length_grouping=false",
            "evaluate.baselines=[zero_shot]",
            "data.eval=null",
            "task.template=Q: {text} A:",
        ],
    )
    assert cfg.train.lr == 0.1 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.train.max_grad_norm is None
    assert cfg.train.length_grouping is False
    assert cfg.evaluate.baselines == ["zero_shot"]
    assert cfg.data.eval is None
    assert cfg.task.template == "Q: {text} A:"


def test_override_ints_become_floats_where_floats_are_expected() -> None:
    cfg = load_config(None, ["task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "data.train=x", "train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_exponents_without_a_dot_are_numbers_though_yaml_reads_them_as_text() -> None:
    base = ["task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "data.train=x"]
    assert load_config(None, [*base, "train.lr=1e-5"]).train.lr == 1e-5
    assert load_config(None, [*base, "train.lr=3E-2"]).train.lr == 0.03
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, "train.lr=fast"])
    assert "train.lr='fast' must be a number" in str(err.value)


def test_malformed_override_is_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "data.train=x", "train.lr", "train.steps.x=1"])
    text = "\n".join(_problems(exc))
    assert "'train.lr' must look like section.key=value" in text
    assert "train.steps={'x': 1} must be an integer" in text


def test_type_errors_name_the_key_and_the_expected_type() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(
            {
                "task": {**TASK, "kind": "regression"},
                "data": {"train": "x.csv", "header": "maybe"},
                "train": {"steps": 2.5, "batch_size": True},
                "evaluate": {"baselines": ["zero_shot", "ten_shot"]},
            }
        )
    text = "\n".join(_problems(exc))
    assert "task.kind='regression' must be one of 'classification', 'generation'" in text
    assert "data.header='maybe' must be true or false or null" in text
    assert "train.steps=2.5 must be an integer" in text
    assert "train.batch_size=True must be an integer" in text  # bools are not counts
    assert "evaluate.baselines=['zero_shot', 'ten_shot'] must be a list of one of 'zero_shot', 'few_shot'" in text


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"task": TASK, "data": {"train": "x.csv"}, "train": 5})
    assert any("train must be a mapping" in p for p in _problems(exc))


def test_str_or_int_columns_keep_ints_as_indices() -> None:
    cfg = config_from_dict({"task": TASK, "data": {"train": "x.csv", "text_column": 1, "label_column": "0", "slice_column": 2}})
    assert cfg.data.text_column == 1 and isinstance(cfg.data.text_column, int)
    assert cfg.data.label_column == "0" and isinstance(cfg.data.label_column, str)
    assert cfg.data.slice_column == 2
    via_override = load_config(None, ["task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "data.train=x", "data.text_column=0"])
    assert via_override.data.text_column == 0


def test_label_map_keys_from_yaml_numbers_become_strings() -> None:
    cfg = config_from_dict({"task": TASK, "data": {"train": "x.csv", "label_map": {0: "neg", 1: "pos"}}})
    assert cfg.data.label_map == {"0": "neg", "1": "pos"}


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(
            {
                "task": {**TASK, "verbalizer": {"neg": [" no"], "pos": [" no"], "other": [" x"]}, "template": "no placeholder"},
                "data": {"train": "x.csv", "label_map": {"0": "nope"}},
                "prompt": {"init": "pretrained"},
                "train": {"steps": 5, "warmup_steps": 5, "early_stopping_patience": 2, "eval_every": 0},
            }
        )
    text = "\n".join(_problems(exc))
    for fragment in ("no {text} placeholder", "'other'", "data.label_map maps to ['nope']", "prompt.init_from", "train.warmup_steps=5", "needs periodic evaluation"):
        assert fragment in text, fragment


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "task: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_config_is_frozen_and_replace_validates() -> None:
    cfg = config_from_dict({"task": TASK, "data": {"train": "x.csv"}})
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # type: ignore[misc]
    assert replace(cfg, ["train.steps=3", "train.warmup_steps=1"]).train.steps == 3
    with pytest.raises(ConfigError, match=r"train\.steps=0"):
        replace(cfg, ["train.steps=0"])


def test_odd_keys_and_huge_numbers_are_problems_not_crashes() -> None:
    """Unknown keys of mixed types sort, and an integer too large for a float is a type problem
    (both raised Python errors from the builder before)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"task": {"labels": ["a", "b"], "verbalizer": {"a": [" a"], "b": [" b"]}}, "data": {"train": "x.csv"},
                          "train": {1: "x", "foo": 2, "lr": 10**400}})
    text = str(info.value)
    assert "unknown key train.1" in text and "unknown key train.foo" in text and "train.lr=" in text and "must be a number" in text
