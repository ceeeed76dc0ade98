"""One self-contained HTML page comparing a tuned soft prompt with its baselines.

The page has inline CSS and inline SVG charts (drawn by `softprompt.charts`), and no scripts,
fonts or links to other servers, so it can be attached to a model card, mailed, or opened offline
years later. Every string that comes from a user (title, labels, task, config values, notes) is
HTML-escaped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.charts import BarSeries, bar_chart, escape, heatmap, line_chart, percent
from softprompt.metrics import ClassificationMetrics

PRIMARY_METRICS = ("accuracy", "macro_f1")
"""Metrics a report can rank methods by."""

# Known methods, in the order the page shows them; any other key follows, sorted by name.
_METHOD_NAMES = {
    "tuned": "Tuned prompt",
    "zero_shot": "Zero-shot",
    "few_shot": "Few-shot",
    "ensemble": "Ensemble",
}
_METHOD_COLORS = {"tuned": "#2563eb", "zero_shot": "#9ca3af", "few_shot": "#f59e0b", "ensemble": "#7c3aed"}
_OTHER_COLOR = "#10b981"
_METRIC_NAMES = {"accuracy": "Accuracy", "macro_f1": "Macro-F1"}


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows; built by the evaluate stage from its results."""

    title: str
    """Page title, e.g. "sst2 · SmolLM2-135M · 20 virtual tokens"."""
    task: str
    """Task name as the user configured it."""
    labels: list[str]
    """Label names in index order; must match the labels of every result."""
    primary_metric: str
    """"accuracy" or "macro_f1": the metric the verdict and the deltas are about."""
    results: dict[str, ClassificationMetrics]
    """method -> metrics; keys are "tuned", "zero_shot", "few_shot" and optionally "ensemble"."""
    history: list[dict[str, Any]]
    """Training records {"step", "train_loss"} and, on eval steps, "eval_metric"; may be empty."""
    manifest: dict[str, Any]
    """Provenance: git_sha, packages, base_model, dataset_fingerprint, config (the resolved one)."""
    verdict: str
    """One-sentence headline, e.g. "The tuned prompt is ... but not significantly better than few-shot (+0.8 points, p=0.9): ..."."""
    notes: list[str] = field(default_factory=list)
    """Free-text caveats shown under the charts."""
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)
    """baseline -> metrics.json's comparison of the winner with it (delta_points, mcnemar_p, outcome); empty: no table."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """method -> 95% interval of its accuracy, drawn as whiskers on the accuracy bars."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.primary_metric not in PRIMARY_METRICS:
            problems.append(f"primary_metric is {self.primary_metric!r}; use one of {list(PRIMARY_METRICS)}")
        if not self.labels:
            problems.append("labels is empty; pass the task's label names in index order")
        if not self.results:
            problems.append("results is empty; pass at least the tuned prompt's metrics")
        for method, metrics in self.results.items():
            if not isinstance(metrics, ClassificationMetrics):
                problems.append(
                    f"results[{method!r}] is a {type(metrics).__name__}; pass a ClassificationMetrics "
                    "(ClassificationMetrics.from_dict turns a saved dict back into one)"
                )
            elif list(metrics.labels) != list(self.labels):
                problems.append(
                    f"results[{method!r}] was scored with labels {metrics.labels}, but the report's labels "
                    f"are {self.labels}; score every method with the same label list"
                )
        if problems:
            raise ValueError("cannot build the report:\n" + "\n".join(f"  - {p}" for p in problems))


def render_report(inputs: ReportInputs) -> str:
    """Renders the comparison report as one self-contained HTML page.

    Sections: headline verdict and scores, baseline comparison (table and bar chart), confusion
    matrix of the tuned prompt (or of the first method when there is no tuned result), per-class
    table, calibration, slices (when any result has them), training curves, notes and provenance.

    Args:
        inputs: What to show.

    Returns:
        The HTML document as a string.
    """
    methods = _ordered_methods(inputs.results)
    focus = methods[0]
    body = "\n".join(
        section
        for section in (
            _headline(inputs, methods),
            _comparison(inputs, methods),
            _confusion(inputs, focus),
            _per_class(inputs, methods),
            _calibration(inputs, methods),
            _slices(inputs, methods),
            _training(inputs.history),
            _notes(inputs.notes),
            _provenance(inputs.manifest),
        )
        if section
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(inputs.title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(inputs: ReportInputs, path: Path) -> Path:
    """Renders the report and writes it as UTF-8 to `path`, creating parent folders.

    Args:
        inputs: What to show.
        path: Where to write the HTML file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(inputs), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Sections


def _headline(inputs: ReportInputs, methods: list[str]) -> str:
    metric = inputs.primary_metric
    focus = methods[0]
    base = _lookup(inputs.manifest, _BASE_MODEL_KEYS)
    facts = [f"Task <b>{escape(inputs.task)}</b>", f"{len(inputs.labels)} labels"]
    if base is not None:
        facts.append(f"base model <b>{escape(_short(base))}</b>")
    facts.append(f"{inputs.results[focus].n} test examples")
    tiles = []
    for method in methods:
        value = _score(inputs.results[method], metric)
        delta = ""
        if method != focus:
            diff = 100 * (_score(inputs.results[focus], metric) - value)
            delta = f'<div class="delta">{escape(_method_name(focus))} {diff:+.1f} pts</div>'
        tiles.append(
            f'<div class="tile" style="border-color:{_color(method)}">'
            f'<div class="tile-name">{escape(_method_name(method))}</div>'
            f'<div class="tile-value">{percent(value)}</div>{delta}</div>'
        )
    return (
        f'<header><h1>{escape(inputs.title)}</h1><p class="facts">{" · ".join(facts)}</p>'
        f'<p class="verdict">{escape(inputs.verdict)}</p>'
        f'<p class="muted">Primary metric: {_METRIC_NAMES[metric]}</p>'
        f'<div class="tiles">{"".join(tiles)}</div></header>'
    )


def _comparison(inputs: ReportInputs, methods: list[str]) -> str:
    focus = methods[0]
    metric = inputs.primary_metric
    rows = []
    for method in methods:
        m = inputs.results[method]
        diff = (
            ""
            if method == focus
            else f"{100 * (_score(inputs.results[focus], metric) - _score(m, metric)):+.1f}"
        )
        rows.append(
            f"<tr><th>{_swatch(method)}{escape(_method_name(method))}</th><td>{m.n}</td>"
            f"<td>{percent(m.accuracy)}</td><td>{percent(m.macro_f1)}</td><td>{_num(m.ece)}</td><td>{diff}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>Method</th><th>n</th><th>Accuracy</th><th>Macro-F1</th><th>ECE</th>"
        f"<th>{escape(_method_name(focus))} lead ({_METRIC_NAMES[metric]}, pts)</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    caption = f'<p class="muted">Bars start at 0%.{" Whiskers: 95% bootstrap interval of accuracy." if inputs.intervals else ""}</p>'
    return (
        f"<section><h2>Baseline comparison</h2>{table}{_significance(inputs)}"
        f"{_bar_chart(inputs.results, methods, inputs.intervals)}{caption}</section>"
    )


_OUTCOMES = {"better": "significantly better", "worse": "significantly worse", "not_significant": "not significant"}


def _significance(inputs: ReportInputs) -> str:
    """The winner against each baseline: the difference, McNemar's p and what it allows us to say."""
    rows = "".join(
        f"<tr><th>{escape(_method_name(name))}</th><td>{float(c.get('delta_points', 0.0)):+.1f}</td>"
        f"<td>{_num(c.get('mcnemar_p'), '.2g')}</td><td>{escape(_OUTCOMES.get(c.get('outcome', ''), 'not significant'))}</td></tr>"
        for name, c in inputs.comparisons.items()
    )
    return rows and (
        '<p class="muted">Winner against each baseline: McNemar\'s exact test on the rows each got right; '
        "a difference counts only at p &lt; 0.05.</p><table><thead><tr><th>Baseline</th><th>Difference (pts)</th>"
        f"<th>p</th><th>Verdict</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _bar_chart(results: Mapping[str, ClassificationMetrics], methods: list[str], intervals: Mapping[str, tuple[float, float]]) -> str:
    """Grouped bars: one group per primary metric, one bar per method; accuracy has its interval."""
    series = [
        BarSeries(_method_name(m), _color(m), [_score(results[m], k) for k in PRIMARY_METRICS],
                  [intervals.get(m) if k == "accuracy" else None for k in PRIMARY_METRICS])
        for m in methods
    ]
    return bar_chart([_METRIC_NAMES[k] for k in PRIMARY_METRICS], series, "Accuracy and macro-F1 per method")


def _confusion(inputs: ReportInputs, method: str) -> str:
    m = inputs.results[method]
    return (
        f"<section><h2>Confusion matrix · {escape(_method_name(method))}</h2>"
        '<p class="muted">Rows are true labels, columns predicted labels; shading is the share of the '
        f"row, numbers are counts.</p>{heatmap(m.confusion, m.labels)}</section>"
    )


def _per_class(inputs: ReportInputs, methods: list[str]) -> str:
    focus, others = methods[0], methods[1:]
    head = (
        "<tr><th>Label</th><th>Support</th>"
        + "".join(f"<th>{escape(_method_name(focus))} {name}</th>" for name in ("precision", "recall", "F1"))
        + "".join(f"<th>{escape(_method_name(o))} F1</th>" for o in others)
        + "</tr>"
    )
    rows = []
    for label in inputs.labels:
        row = inputs.results[focus].per_class[label]
        cells = [f"<td>{int(row['support'])}</td>"]
        cells += [f"<td>{percent(row[key])}</td>" for key in ("precision", "recall", "f1")]
        cells += [f"<td>{percent(inputs.results[o].per_class[label]['f1'])}</td>" for o in others]
        rows.append(f"<tr><th>{escape(label)}</th>{''.join(cells)}</tr>")
    return (
        '<section><h2>Per-class scores</h2><p class="muted">A class never predicted has precision 0; '
        "a class with no test examples has recall 0.</p>"
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _calibration(inputs: ReportInputs, methods: list[str]) -> str:
    eces = {m: inputs.results[m].ece for m in methods}
    known = [v for v in eces.values() if v is not None]
    if not known:
        body = '<p class="muted">No class probabilities were recorded, so calibration was not measured.</p>'
    else:
        top = max(max(known), 1e-9)
        rows = []
        for method, ece in eces.items():
            bar = (
                ""
                if ece is None
                else f'<div class="hbar" style="width:{100 * ece / top:.1f}%;background:{_color(method)}"></div>'
            )
            rows.append(
                f"<tr><th>{escape(_method_name(method))}</th><td>{_num(ece)}</td>"
                f'<td class="barcell">{bar}</td></tr>'
            )
        body = (
            '<p class="muted">Expected calibration error: the gap between confidence (top class '
            "probability) and accuracy, averaged over equal-width confidence bins. Lower is better.</p>"
            f"<table><thead><tr><th>Method</th><th>ECE</th><th></th></tr></thead><tbody>{''.join(rows)}"
            "</tbody></table>"
        )
    return f"<section><h2>Calibration</h2>{body}</section>"


def _slices(inputs: ReportInputs, methods: list[str]) -> str:
    sliced = [m for m in methods if inputs.results[m].slices is not None]
    if not sliced:
        return ""
    values: list[str] = sorted({v for m in sliced for v in (inputs.results[m].slices or {})})
    head = (
        "<tr><th>Slice</th><th>n</th>"
        + "".join(f"<th>{escape(_method_name(m))} accuracy</th>" for m in sliced)
        + "</tr>"
    )
    rows = []
    for value in values:
        stats = [(inputs.results[m].slices or {}).get(value) for m in sliced]
        n = next((int(s["n"]) for s in stats if s is not None), 0)
        cells = "".join(f"<td>{'—' if s is None else percent(s['accuracy'])}</td>" for s in stats)
        rows.append(f"<tr><th>{escape(value)}</th><td>{n}</td>{cells}</tr>")
    gaps = "".join(f"<td>{_pts(inputs.results[m].slice_gap)}</td>" for m in sliced)
    rows.append(f'<tr class="gap"><th>Gap (best − worst)</th><td></td>{gaps}</tr>')
    return (
        "<section><h2>Slices</h2>"
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _training(history: Sequence[Mapping[str, Any]]) -> str:
    if not history:
        return (
            '<section><h2>Training curves</h2><p class="muted">No training history was recorded '
            "(for example, a run that only scored baselines).</p></section>"
        )
    loss = _points(history, "train_loss")
    evals = _points(history, "eval_metric")
    charts = [
        line_chart(loss, "Training loss", _METHOD_COLORS["tuned"], y_from_zero=True) if loss else _empty_chart("training loss"),
        line_chart(evals, "Eval metric", "#16a34a", y_from_zero=True) if evals else _empty_chart("eval metric"),
    ]
    return f'<section><h2>Training curves</h2><div class="charts">{"".join(charts)}</div></section>'


def _empty_chart(what: str) -> str:
    return f'<p class="muted chart-empty">No {what} values in the training history.</p>'


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{escape(note)}</li>" for note in notes)
    return f"<section><h2>Notes</h2><ul>{items}</ul></section>"


# Where provenance lives in the manifest; the first key present wins (dots walk nested dicts).
_GIT_KEYS = ("git_sha", "git.sha", "git_commit")
_PACKAGE_KEYS = ("packages", "package_versions", "versions")
_BASE_MODEL_KEYS = ("base_model", "model.base_model", "model.name", "model")
_DATASET_KEYS = ("dataset_fingerprint", "data_fingerprint", "dataset.fingerprint", "fingerprints")
_CONFIG_KEYS = ("config", "resolved_config")


def _provenance(manifest: Mapping[str, Any]) -> str:
    rows = []
    for name, keys in (
        ("Git SHA", _GIT_KEYS),
        ("Base model", _BASE_MODEL_KEYS),
        ("Dataset fingerprint", _DATASET_KEYS),
        ("Package versions", _PACKAGE_KEYS),
    ):
        value = _lookup(manifest, keys)
        shown = (
            '<span class="warn">not recorded</span>'
            if value is None
            else f"<code>{escape(_short(value))}</code>"
        )
        rows.append(f"<tr><th>{name}</th><td>{shown}</td></tr>")
    config = _lookup(manifest, _CONFIG_KEYS)
    blocks = []
    if config is not None:
        blocks.append(
            f"<details><summary>Resolved config</summary><pre>{escape(_json(config))}</pre></details>"
        )
    blocks.append(f"<details><summary>Full manifest</summary><pre>{escape(_json(manifest))}</pre></details>")
    return f"<section><h2>Provenance</h2><table><tbody>{''.join(rows)}</tbody></table>{''.join(blocks)}</section>"


# ---------------------------------------------------------------------------------------------
# Small helpers


def _ordered_methods(results: Mapping[str, ClassificationMetrics]) -> list[str]:
    known = [m for m in _METHOD_NAMES if m in results]
    return known + sorted(m for m in results if m not in _METHOD_NAMES)


def _method_name(method: str) -> str:
    return _METHOD_NAMES.get(method) or (f"Few-shot ({method.removeprefix('few_shot_')})" if method.startswith("few_shot_") else method)


def _color(method: str) -> str:
    return _METHOD_COLORS.get(method, _OTHER_COLOR)


def _swatch(method: str) -> str:
    return f'<span class="swatch" style="background:{_color(method)}"></span>'


def _score(metrics: ClassificationMetrics, metric: str) -> float:
    return float(metrics.accuracy if metric == "accuracy" else metrics.macro_f1)


def _points(history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) pairs of the records that hold a finite number under `key`, sorted by step."""
    points = []
    for record in history:
        step, value = record.get("step"), record.get(key)
        if not isinstance(step, (int, float)) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(step) and math.isfinite(value):
            points.append((float(step), float(value)))
    return sorted(points)


def _lookup(mapping: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        node: Any = mapping
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node not in (None, "", {}):
            return node
    return None


def _short(value: Any) -> str:
    """A one-line rendering of a manifest value: strings as-is, mappings as `k=v, ...`."""
    if isinstance(value, Mapping):
        if isinstance(value.get("name"), str):
            return _short(value["name"]) + (f" @ {value['revision']}" if value.get("revision") else "")
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_short(v) for v in value)
    return str(value)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def _pts(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} pts"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None else format(float(value), fmt)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827;background:#f3f4f6;margin:0}main{max-width:960px;margin:0 auto;padding:24px}
header,section{background:#fff;border-radius:8px;padding:16px 20px;margin-bottom:16px;box-shadow:0 1px 2px #0001}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 10px}
.facts,.muted{color:#4b5563}.muted{font-size:13px}.verdict{font-size:18px;font-weight:600;background:#eff6ff;border-left:4px solid #2563eb;padding:8px 12px}
.tiles{display:flex;gap:12px;flex-wrap:wrap}.tile{border-top:4px solid;border-radius:6px;background:#f9fafb;padding:8px 14px;min-width:120px}
.tile-name{font-size:12px;color:#4b5563}.tile-value{font-size:22px;font-weight:700}.delta{font-size:12px}table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:right}th:first-child{text-align:left}thead th{font-size:12px;color:#4b5563}
tr.gap th,tr.gap td{font-weight:600;border-top:2px solid #9ca3af}.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.barcell{width:220px}.hbar{height:10px;border-radius:2px}.charts{display:flex;gap:16px;flex-wrap:wrap}
svg{max-width:100%;height:auto;font-size:11px}svg text{fill:#374151}svg .count{text-anchor:middle;font-size:12px}
svg .val,svg .tick-x,svg .axis-title{text-anchor:middle}svg .tick-y,svg .row-label{text-anchor:end}svg .col-label{text-anchor:start}
svg .chart-title{font-weight:600;font-size:12px}svg .grid{stroke:#e5e7eb}.warn{color:#b45309;font-weight:600}code{word-break:break-all}
pre{background:#f9fafb;padding:10px;overflow:auto;max-height:480px;font-size:12px}summary{cursor:pointer;margin-top:8px}
"""
