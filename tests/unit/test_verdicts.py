"""Honest verdicts: "beats" only when McNemar's exact test says so, and the gates that follow it.

A prompt that scores higher than a baseline within the noise is "not significantly better than"
it, in the CLI's verdict line, metrics.json and the report; the pipeline's promotion condition and
the registry's gate (with `require_significance`) refuse it; an ensemble replaces the single
prompt only when it is significantly better on eval.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

from softprompt import evaluate
from softprompt.charts import BarSeries, bar_chart, line_chart
from softprompt.config import config_from_dict, load_config, to_dict
from softprompt.metrics import (
    SIGNIFICANCE_LEVEL,
    classification_metrics,
    compare,
    mcnemar_p,
    verdict_sentence,
)
from softprompt.registry import Gate, promote, publish
from softprompt.registry.store import LocalStore

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["a", "b"]


def _rows(labels: list[int]) -> types.SimpleNamespace:
    return types.SimpleNamespace(label_ids=labels)


def _scores(correct: list[bool], labels: list[int]) -> np.ndarray:
    """Two-class scores whose argmax is the true label where `correct`, the other label elsewhere."""
    pred = [y if ok else 1 - y for ok, y in zip(correct, labels, strict=True)]
    return np.array([[1.0, 0.0] if p == 0 else [0.0, 1.0] for p in pred])


def _case(tuned: list[bool], few: list[bool], zero: list[bool]) -> tuple[str, bool, dict[str, dict[str, object]]]:
    y = [i % 2 for i in range(len(tuned))]
    scores = {"tuned": _scores(tuned, y), "few_shot": _scores(few, y), "zero_shot": _scores(zero, y)}
    results = {k: classification_metrics(y, s.argmax(1), None, LABELS) for k, s in scores.items()}
    return evaluate._verdict(results, scores, _rows(y), "tuned", "accuracy")  # type: ignore[arg-type]


# 100 rows: tuned right on 80; few-shot on 75 (disagreeing on 5+10 rows: p ~ 0.3); zero-shot on 40.
TUNED = [True] * 80 + [False] * 20
FEW = [True] * 70 + [False] * 10 + [True] * 5 + [False] * 15
ZERO = [True] * 40 + [False] * 60


def test_a_higher_score_within_the_noise_is_not_significantly_better() -> None:
    verdict, beats, comparisons = _case(TUNED, FEW, ZERO)
    p = mcnemar_p(TUNED, FEW)
    assert 0.05 <= p < 1 and comparisons["few_shot"]["delta_points"] == 5.0
    assert beats is False
    assert "beats" not in verdict
    assert f"not significantly better than few-shot (+5.0 points, p={p:.2g})" in verdict
    assert "significantly better than zero-shot (+40.0 points" in verdict
    assert verdict.startswith("The tuned prompt is significantly better than zero-shot") and " but not " in verdict
    assert "McNemar's exact test, significant at p < 0.05" in verdict
    assert comparisons["few_shot"]["outcome"] == "not_significant" and comparisons["few_shot"]["significant"] is False
    assert comparisons["zero_shot"]["outcome"] == "better" and comparisons["zero_shot"]["mcnemar_p"] < SIGNIFICANCE_LEVEL


def test_beats_is_said_only_when_every_baseline_is_significantly_beaten() -> None:
    verdict, beats, comparisons = _case(TUNED, ZERO, ZERO)
    assert beats is True and verdict.startswith("The tuned prompt beats both baselines: accuracy 80.0% (95% CI ")
    assert "significantly better than zero-shot (+40.0 points" in verdict and "significantly better than few-shot (+40.0 points" in verdict
    assert {c["outcome"] for c in comparisons.values()} == {"better"}


def test_a_significantly_worse_prompt_is_called_worse() -> None:
    verdict, beats, comparisons = _case(ZERO, TUNED, ZERO)
    assert beats is False and comparisons["few_shot"]["outcome"] == "worse"
    assert "significantly worse than few-shot (-40.0 points" in verdict


def test_the_test_is_on_correctness_and_the_direction_must_agree() -> None:
    # A positive metric difference with more rows only the baseline got right is not a win.
    c = compare("few-shot", [True] * 10 + [False] * 30, [False] * 10 + [True] * 30, delta_points=2.0)
    assert c.only_a == 10 and c.only_b == 30 and c.p_value < 0.05 and c.outcome == "not_significant"
    assert verdict_sentence("tuned prompt", "accuracy 50.0%", []) == "The tuned prompt: accuracy 50.0% (no baselines scored)."


def test_the_promotion_condition_follows_the_setting() -> None:
    weak = {"beats_baselines": False, "comparisons": {"few_shot": {"delta_points": 5.0, "mcnemar_p": 0.3}}}
    assert evaluate.promotion_condition(weak, require_significance=True) is False
    assert evaluate.promotion_condition(weak, require_significance=False) is True
    assert evaluate.promotion_condition({"beats_baselines": True, "comparisons": {}}, require_significance=True) is True


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_require_significance_to_promote(config: Path) -> None:
    assert load_config(config).publish.require_significance is True


# ------------------------------------------------------------------------------------------ the gate


def _run(folder: Path, comparisons: dict[str, dict[str, object]] | None, accuracy: float = 0.8) -> Path:
    """A run folder publish accepts (its adapter bytes need not be real), scored against few-shot;
    `comparisons=None` is a metrics.json from before significance was recorded."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00" + hashlib.sha256(str(accuracy).encode()).digest())
    cfg = {"task": {"name": "intent", "labels": LABELS, "verbalizer": {"a": [" a"], "b": [" b"]}}, "data": {"train": "x.csv"}, "model": {"name": "tiny"}}
    provenance = {"git": {"sha": "x"}, "packages": {"softprompt": "0"}, "dataset": {"fingerprint": "d"}, "train": {"steps": 1}}
    manifest = {"task": "intent", "base_model": {"name": "tiny", "weights_sha256": "ab" * 32}, "config": to_dict(config_from_dict(cfg)), **provenance}
    (folder / "run_manifest.json").write_text(json.dumps(manifest))
    metrics = {"primary_metric": "accuracy", "split": "test", "eval_fingerprint": "e", "tuned": {"accuracy": accuracy}, "few_shot": {"accuracy": 0.75}}
    (folder / "metrics.json").write_text(json.dumps(metrics | ({} if comparisons is None else {"comparisons": comparisons})))
    (folder / "report.html").write_text(f"<html>{accuracy}</html>")
    return folder


def test_the_gate_refuses_a_challenger_not_significantly_better_than_its_baselines(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "registry")
    weak = publish(store, _run(tmp_path / "weak", {"few_shot": {"delta_points": 0.8, "mcnemar_p": 0.9, "outcome": "not_significant"}}))
    refused = promote(store, weak.task, weak.base_model, weak.version, gate=Gate(require_significance=True))
    assert refused.status == "refused" and not refused.promoted
    assert "not significantly better than few-shot (+0.8 points, p=0.9)" in refused.message
    assert "McNemar's exact test" in refused.message and "--force" in refused.message
    # Without the requirement the same version becomes the first champion; --force records the override.
    assert promote(store, weak.task, weak.base_model, weak.version).status == "promoted"
    strong = publish(store, _run(tmp_path / "strong", {"few_shot": {"delta_points": 9.0, "mcnemar_p": 0.001}}, accuracy=0.9))
    moved = promote(store, strong.task, strong.base_model, strong.version, gate=Gate(require_significance=True))
    assert moved.status == "promoted", moved.message
    # A version published before significance was recorded is refused with the way out.
    old = publish(store, _run(tmp_path / "old", None, accuracy=0.95))
    unknown = promote(store, old.task, old.base_model, old.version, gate=Gate(require_significance=True))
    assert unknown.status == "refused" and "records no significance test" in unknown.message and "--force" in unknown.message
    forced = promote(store, old.task, old.base_model, old.version, gate=Gate(require_significance=True), force=True, reason="test")
    assert forced.status == "promoted" and forced.forced


def test_the_promote_command_takes_the_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from softprompt.cli import main

    store = LocalStore(tmp_path / "registry")
    weak = publish(store, _run(tmp_path / "weak", {"few_shot": {"delta_points": 0.8, "mcnemar_p": 0.9}}))
    code = main(["promote", weak.task, weak.base_model, weak.version, "--registry", str(tmp_path / "registry"), "--require-significance"])
    assert code == 3 and "not significantly better than few-shot" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- the charts


def test_bars_start_at_zero_and_show_their_interval() -> None:
    svg = bar_chart(["Accuracy"], [BarSeries("Tuned", "#000", [0.8], [(0.7, 0.9)])], "chart")
    assert ">0%</text>" in svg and "95% interval 70.0%-90.0%" in svg


def test_line_charts_start_at_zero_or_say_they_are_zoomed() -> None:
    points = [(1.0, 0.80), (2.0, 0.82), (3.0, 0.85)]
    assert "zoomed" not in line_chart(points, "Eval metric", "#000", y_from_zero=True)
    assert ">0</text>" in line_chart(points, "Eval metric", "#000", y_from_zero=True)
    assert "Eval metric (y axis zoomed, not from 0)" in line_chart(points, "Eval metric", "#000")
