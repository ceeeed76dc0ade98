"""The HTML report: every section present, well-formed, escaped and self-contained."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from softprompt.metrics import ClassificationMetrics, classification_metrics
from softprompt.report import ReportInputs, render_report, write_report

LABELS = ["positive", "negative", "<script>alert(1)</script>"]
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
SLICES = ["short", "long"] * 5


def _metrics(y_pred: list[int], with_probs: bool = True) -> ClassificationMetrics:
    probs = None
    if with_probs:
        probs = np.full((len(y_pred), 3), 0.1)
        probs[np.arange(len(y_pred)), y_pred] = 0.8
    return classification_metrics(Y_TRUE, y_pred, probs, LABELS, slices=SLICES)


def _inputs(**changes: Any) -> ReportInputs:
    results = {
        # zero_shot first on purpose: the report still shows the tuned prompt first.
        "zero_shot": _metrics([0, 1, 1, 1, 0, 0, 2, 0, 1, 0], with_probs=False),
        "tuned": _metrics([0, 0, 0, 1, 1, 0, 2, 2, 2, 1]),
        "few_shot": _metrics([0, 0, 1, 1, 1, 0, 2, 0, 2, 1]),
    }
    inputs = ReportInputs(
        title="sst2 & friends <v1>",
        task="sentiment <task>",
        labels=LABELS,
        primary_metric="accuracy",
        results=results,
        history=[
            {"step": 0, "train_loss": 2.3},
            {"step": 10, "train_loss": 1.7, "eval_metric": 0.55},
            {"step": 20, "train_loss": 1.1},
            {"step": 30, "train_loss": 0.8, "eval_metric": 0.8},
        ],
        manifest={
            "git_sha": "0123abcd",
            "packages": {"torch": "2.5.1", "transformers": "5.0.0"},
            "base_model": {"name": "SmolLM2-135M", "revision": "main"},
            "dataset_fingerprint": "sha256:feedbeef",
            "config": {"prompt": {"num_virtual_tokens": 20, "init_text": "<b>classify</b>"}},
        },
        verdict="The tuned prompt is significantly better than zero-shot (+30.0 points, p=1e-05) but not significantly better than few-shot (+10.0 points, p=0.2)",
        notes=["small test set: <10 examples"],
    )
    return dataclasses.replace(inputs, **changes)


class _StrictParser(HTMLParser):
    """Checks that every non-void element is closed in order; counts tags."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: dict[str, int] = {}
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += attrs
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += attrs

    def handle_endtag(self, tag: str) -> None:
        assert self.stack, f"</{tag}> without an open element"
        assert self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1]}>"
        self.stack.pop()


def _parse(page: str) -> _StrictParser:
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed elements: {parser.stack}"
    return parser


def test_report_has_every_section_and_is_well_formed() -> None:
    page = render_report(_inputs())

    parsed = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    for heading in (
        "Baseline comparison",
        "Confusion matrix · Tuned prompt",
        "Per-class scores",
        "Calibration",
        "Slices",
        "Training curves",
        "Notes",
        "Provenance",
    ):
        assert f"<h2>{heading}</h2>" in page
    # Bar chart, confusion heatmap, loss curve, eval curve.
    assert parsed.tags["svg"] == 4
    assert parsed.tags["polyline"] == 2
    assert "but not significantly better than few-shot (+10.0 points, p=0.2)" in page
    assert "Gap (best − worst)" in page
    assert "<details><summary>Resolved config</summary><pre>" in page
    for fact in ("0123abcd", "torch=2.5.1", "SmolLM2-135M @ main", "sha256:feedbeef"):
        assert fact in page


def test_tuned_prompt_is_shown_first_and_all_methods_present() -> None:
    page = render_report(_inputs())

    assert page.index("Tuned prompt") < page.index("Zero-shot") < page.index("Few-shot")


def test_confusion_matrix_shows_counts_and_labels() -> None:
    page = render_report(_inputs())

    heatmap = page[page.index("Confusion matrix · Tuned prompt") : page.index("Per-class scores")]
    assert "<svg" in heatmap
    assert "true positive, predicted positive: 3" in heatmap
    assert "true negative, predicted positive: 1" in heatmap
    assert ">negative</text>" in heatmap


def test_user_strings_are_escaped() -> None:
    page = render_report(_inputs())

    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "sst2 &amp; friends &lt;v1&gt;" in page
    assert "sentiment &lt;task&gt;" in page
    assert "&lt;b&gt;classify&lt;/b&gt;" in page
    assert "<b>classify</b>" not in page
    assert "small test set: &lt;10 examples" in page


def test_report_is_self_contained() -> None:
    page = render_report(_inputs())

    parsed = _parse(page)
    assert "http://" not in page
    assert "https://" not in page
    assert "script" not in parsed.tags
    assert "link" not in parsed.tags
    assert not [name for name, _ in parsed.attrs if name in ("src", "href")]


def test_empty_history_and_no_few_shot() -> None:
    inputs = _inputs(history=[])
    inputs = dataclasses.replace(
        inputs, results={k: v for k, v in inputs.results.items() if k != "few_shot"}, notes=[]
    )

    page = render_report(inputs)

    parsed = _parse(page)
    assert "No training history was recorded" in page
    assert "Few-shot" not in page
    assert "<h2>Notes</h2>" not in page
    assert parsed.tags["svg"] == 2  # bar chart and confusion matrix


def test_history_without_eval_points_and_no_probabilities_or_slices() -> None:
    plain = classification_metrics(Y_TRUE, Y_TRUE, None, LABELS)
    inputs = _inputs(
        history=[{"step": 0, "train_loss": 1.0}, {"step": 5, "train_loss": float("nan")}],
        results={"tuned": plain, "ensemble": plain},
        primary_metric="macro_f1",
        manifest={},
    )

    page = render_report(inputs)

    parsed = _parse(page)
    assert parsed.tags["svg"] == 3  # bars, heatmap, one-point loss curve
    assert "No eval metric values in the training history." in page
    assert "calibration was not measured" in page
    assert "<h2>Slices</h2>" not in page
    assert "Ensemble" in page
    assert "not recorded" in page


def test_invalid_inputs_are_reported_together() -> None:
    other = classification_metrics([0, 1], [0, 1], None, ["yes", "no"])

    with pytest.raises(ValueError) as info:
        _inputs(primary_metric="f1", results={"tuned": other})

    assert "primary_metric is 'f1'" in str(info.value)
    assert "results['tuned'] was scored with labels ['yes', 'no']" in str(info.value)


def test_write_report_creates_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"

    written = write_report(_inputs(), target)

    assert written == target
    assert target.read_text(encoding="utf-8") == render_report(_inputs())


def test_significance_table_and_intervals_are_shown_and_bars_start_at_zero() -> None:
    comparisons = {
        "zero_shot": {"delta_points": 30.0, "mcnemar_p": 1e-05, "outcome": "better"},
        "few_shot": {"delta_points": 10.0, "mcnemar_p": 0.2, "outcome": "not_significant"},
    }
    page = render_report(_inputs(comparisons=comparisons, intervals={"tuned": (0.4, 0.9)}))
    _parse(page)
    assert "McNemar&#x27;s exact test" in page or "McNemar's exact test" in page
    assert "<th>Few-shot</th><td>+10.0</td><td>0.2</td><td>not significant</td>" in page
    assert "<th>Zero-shot</th><td>+30.0</td><td>1e-05</td><td>significantly better</td>" in page
    assert "95% interval 40.0%-90.0%" in page and "Bars start at 0%. Whiskers: 95% bootstrap interval of accuracy." in page
    # Without comparisons there is no table (older callers), and the curves start at 0.
    plain = render_report(_inputs())
    assert "<th>Verdict</th>" not in plain and "zoomed" not in plain
