"""Classification metrics for comparing a tuned soft prompt with its baselines.

Pure numpy: accuracy, per-class precision/recall/F1, macro-F1, the confusion matrix, expected
calibration error (ECE), per-slice accuracy, an exact McNemar test between two methods scored on
the same examples (and what its outcome lets a verdict say), and a bootstrap confidence interval
for accuracy.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SIGNIFICANCE_LEVEL = 0.05
"""A method is better or worse than another only when McNemar's exact test gives p below this."""

SIGNIFICANCE_TEST = "McNemar's exact test"
"""The test every verdict names: paired, on per-example correctness, two-sided."""

# Rows of `probs` may come from a float16/float32 softmax over label tokens; allow rounding slack.
_PROB_SUM_ATOL = 1e-3


@dataclass(frozen=True)
class ClassificationMetrics:
    """Scores of one method (tuned, zero-shot, few-shot, ...) on one labelled split."""

    n: int
    """Number of scored examples."""
    accuracy: float
    """Fraction of examples whose predicted label equals the true label."""
    macro_f1: float
    """Unweighted mean of the per-class F1 over every label in `labels`."""
    labels: list[str]
    """Label names; indices in `confusion` and keys of `per_class` follow this order."""
    per_class: dict[str, dict[str, float]]
    """label -> {"precision", "recall", "f1", "support"}; support is an int count of true examples."""
    confusion: list[list[int]]
    """confusion[i][j] counts examples whose true label is labels[i] and prediction is labels[j]."""
    ece: float | None = None
    """Expected calibration error from equal-width confidence bins; None when no probabilities."""
    slices: dict[str, dict[str, float]] | None = None
    """slice value -> {"n", "accuracy", "macro_f1"}; None when no slice column was given."""
    slice_gap: float | None = None
    """Best minus worst slice accuracy; None when no slice column was given."""

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict of plain ints, floats, strings, lists and dicts."""
        return {
            "n": int(self.n),
            "accuracy": float(self.accuracy),
            "macro_f1": float(self.macro_f1),
            "labels": [str(label) for label in self.labels],
            "per_class": {label: _class_row(row) for label, row in self.per_class.items()},
            "confusion": [[int(c) for c in row] for row in self.confusion],
            "ece": None if self.ece is None else float(self.ece),
            "slices": None if self.slices is None else {k: _slice_row(v) for k, v in self.slices.items()},
            "slice_gap": None if self.slice_gap is None else float(self.slice_gap),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassificationMetrics:
        """Rebuilds metrics written by `to_dict`.

        Raises:
            ValueError: if a required key is missing (the message lists them).
        """
        required = ("n", "accuracy", "macro_f1", "labels", "per_class", "confusion")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(
                f"classification metrics dict lacks key(s) {missing}; expected the output of "
                f"ClassificationMetrics.to_dict() with keys {list(required)} plus ece, slices, slice_gap"
            )
        slices = data.get("slices")
        ece = data.get("ece")
        gap = data.get("slice_gap")
        return cls(
            n=int(data["n"]),
            accuracy=float(data["accuracy"]),
            macro_f1=float(data["macro_f1"]),
            labels=[str(label) for label in data["labels"]],
            per_class={str(k): _class_row(v) for k, v in data["per_class"].items()},
            confusion=[[int(c) for c in row] for row in data["confusion"]],
            ece=None if ece is None else float(ece),
            slices=None if slices is None else {str(k): _slice_row(v) for k, v in slices.items()},
            slice_gap=None if gap is None else float(gap),
        )


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    probs: np.ndarray | None,
    labels: Sequence[str],
    slices: Sequence[str] | np.ndarray | None = None,
    ece_bins: int = 15,
) -> ClassificationMetrics:
    """Scores predictions against true labels.

    Zero-division convention: a class that is never predicted has precision 0.0, a class with no
    true examples has recall 0.0, and F1 is 0.0 whenever precision + recall is 0. Macro-F1 averages
    over every label in `labels`, so a class the model never gets right pulls it down. Inside a slice,
    macro-F1 averages over the labels that occur in that slice (as truth or prediction) instead,
    because a slice rarely holds every class and an absent class would otherwise count as F1 = 0.

    ECE uses the maximum probability of each row as the confidence and `y_pred == y_true` as the
    outcome (so `y_pred` is expected to be the argmax of `probs`), with `ece_bins` equal-width bins
    over (0, 1]: ECE = sum over bins of |accuracy - mean confidence| * bin size / n.

    Args:
        y_true: True label index of each example, into `labels`.
        y_pred: Predicted label index of each example, into `labels`.
        probs: [n, len(labels)] class probabilities (rows sum to 1), or None to skip ECE.
        labels: Label names, in index order.
        slices: Optional slice value of each example (e.g. a domain or length bucket).
        ece_bins: Number of equal-width confidence bins for ECE.

    Returns:
        The metrics; `slices`/`slice_gap` are None when `slices` is None, `ece` is None when
        `probs` is None.

    Raises:
        ValueError: naming the argument, when lengths differ, an index is outside `labels`,
            `labels` is empty or repeats a name, `probs` has the wrong shape or is not a
            distribution, or `ece_bins` < 1.
    """
    label_names = [str(label) for label in labels]
    k = len(label_names)
    if k == 0:
        raise ValueError("labels is empty; pass the task's label names in index order")
    if len(set(label_names)) != k:
        dupes = sorted({name for name in label_names if label_names.count(name) > 1})
        raise ValueError(f"labels repeats {dupes}; every label name must be unique")
    true = _as_indices(y_true, "y_true", k, label_names)
    pred = _as_indices(y_pred, "y_pred", k, label_names)
    if len(true) != len(pred):
        raise ValueError(
            f"y_true has {len(true)} entries but y_pred has {len(pred)}; pass one prediction per example"
        )
    if len(true) == 0:
        raise ValueError("y_true is empty; metrics need at least one example")
    n = len(true)

    confusion = _confusion(true, pred, k)
    precision, recall, f1 = _prf(confusion)
    support = confusion.sum(axis=1)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }

    ece = None if probs is None else _ece(probs, true, pred, k, ece_bins)
    slice_stats, gap = (None, None) if slices is None else _slice_metrics(true, pred, slices, k)
    return ClassificationMetrics(
        n=n,
        accuracy=float(np.mean(true == pred)),
        macro_f1=float(np.mean(f1)),
        labels=label_names,
        per_class=per_class,
        confusion=confusion.tolist(),
        ece=ece,
        slices=slice_stats,
        slice_gap=gap,
    )


def mcnemar_p(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> float:
    """Exact two-sided McNemar p-value that methods A and B have the same accuracy.

    Only discordant examples count: b = A right and B wrong, c = A wrong and B right. Under the
    null hypothesis b ~ Binomial(b + c, 1/2); the p-value is 2 * P(X <= min(b, c)), capped at 1.

    Args:
        correct_a: Whether method A got each example right.
        correct_b: Whether method B got the same examples right, in the same order.

    Returns:
        The p-value in [0, 1]; 1.0 when the methods never disagree.

    Raises:
        ValueError: if the two sequences differ in length.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"correct_a has shape {a.shape} but correct_b has {b.shape}; "
            "pass one flag per example for both methods, in the same order"
        )
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    total = only_a + only_b
    if total == 0:
        return 1.0
    # Exact integer arithmetic: P(X <= m) = sum_{i<=m} C(total, i) / 2**total, rounded once.
    tail = 0
    term = 1  # C(total, 0)
    for i in range(min(only_a, only_b) + 1):
        tail += term
        term = term * (total - i) // (i + 1)
    return min(1.0, 2 * tail / 2**total)


def bootstrap_ci(
    correct: Sequence[bool] | np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval for accuracy.

    Resampling n examples with replacement and counting the correct ones is exactly a draw from
    Binomial(n, accuracy), so the replicates are drawn that way: same distribution, O(n_boot) work.

    Args:
        correct: Whether each example was answered correctly.
        n_boot: Number of bootstrap replicates.
        seed: Seed of the random generator, for reproducible intervals.
        alpha: 1 - confidence level (0.05 gives a 95% interval).

    Returns:
        (low, high) accuracy bounds.

    Raises:
        ValueError: if `correct` is empty, `n_boot` < 1 or `alpha` is not in (0, 1).
    """
    flags = np.asarray(correct, dtype=bool)
    if flags.ndim != 1 or flags.size == 0:
        raise ValueError("correct is empty; pass one flag per scored example")
    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; use at least 1 (1000 is typical)")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is {alpha}; use a value in (0, 1), e.g. 0.05 for a 95% interval")
    n = int(flags.size)
    rng = np.random.default_rng(seed)
    accuracies = rng.binomial(n, float(flags.mean()), size=n_boot) / n
    low, high = np.quantile(accuracies, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Method A against method B on the same examples: the metric's difference and McNemar's test."""

    baseline: str
    """B's name as people read it, e.g. "few-shot"."""
    delta_points: float
    """A's metric minus B's, in percentage points (positive: A scored higher)."""
    p_value: float
    """McNemar's exact two-sided p-value on per-example correctness."""
    only_a: int
    """Examples A got right and B wrong."""
    only_b: int
    """Examples B got right and A wrong."""
    alpha: float = SIGNIFICANCE_LEVEL
    """The significance level the outcome is judged at."""

    @property
    def outcome(self) -> str:
        """`better`, `worse` (both significant, and the metric and the disagreements agree on the
        direction) or `not_significant`."""
        if self.p_value < self.alpha and self.delta_points > 0 and self.only_a > self.only_b:
            return "better"
        if self.p_value < self.alpha and self.delta_points < 0 and self.only_a < self.only_b:
            return "worse"
        return "not_significant"

    def phrase(self) -> str:
        """E.g. "not significantly better than few-shot (+0.8 points, p=0.9)"."""
        head = {
            "better": "significantly better than",
            "worse": "significantly worse than",
            "not_significant": "not significantly better than",
        }[self.outcome]
        return f"{head} {self.baseline} ({self.delta_points:+.1f} points, p={self.p_value:.2g})"

    def to_dict(self) -> dict[str, Any]:
        """The `comparisons` entry of metrics.json."""
        return {
            "delta_points": round(self.delta_points, 2),
            "mcnemar_p": self.p_value,
            "only_winner": self.only_a,
            "only_baseline": self.only_b,
            "outcome": self.outcome,
            "significant": self.outcome != "not_significant",
        }


def compare(
    baseline: str,
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    delta_points: float,
    alpha: float = SIGNIFICANCE_LEVEL,
) -> Comparison:
    """Compares method A with method B on the same examples.

    Args:
        baseline: B's name as people read it.
        correct_a: Whether A got each example right.
        correct_b: Whether B got the same examples right, in the same order.
        delta_points: A's metric minus B's, in percentage points (the metric may be macro-F1, so
            it is passed in; the test is on correctness either way).
        alpha: Significance level.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    p = mcnemar_p(a, b)
    return Comparison(baseline, float(delta_points), p, int(np.sum(a & ~b)), int(np.sum(~a & b)), alpha)


def verdict_sentence(method: str, result: str, comparisons: Sequence[Comparison]) -> str:
    """The one-sentence verdict of a method against its baselines, honest about significance.

    "Beats" is said only when the method is significantly better than every baseline; otherwise
    each baseline gets its own clause ("not significantly better than few-shot (+0.8 points,
    p=0.9)", "significantly worse than ...").

    Args:
        method: The method's name, e.g. "tuned prompt".
        result: Its score as people read it, e.g. "accuracy 76.3% (95% CI 71.0-81.5)".
        comparisons: One per baseline scored.
    """
    if not comparisons:
        return f"The {method}: {result} (no baselines scored)."
    test = f"{SIGNIFICANCE_TEST}, significant at p < {comparisons[0].alpha:g}"
    if all(c.outcome == "better" for c in comparisons):
        head = "beats both baselines" if len(comparisons) == 2 else ("beats the baseline" if len(comparisons) == 1 else "beats every baseline")
        return f"The {method} {head}: {result}, " + " and ".join(c.phrase() for c in comparisons) + f"; {test}."
    outcomes = {c.outcome for c in comparisons}
    joiner = " and " if len(outcomes) == 1 else " but "
    return f"The {method} is " + joiner.join(c.phrase() for c in comparisons) + f": {result}; {test}."


def _as_indices(values: Sequence[int] | np.ndarray, name: str, k: int, labels: list[str]) -> np.ndarray:
    """Converts label indices to an int array, rejecting non-integers and out-of-range values."""
    try:
        array = np.asarray([operator.index(v) for v in values], dtype=np.int64)
    except TypeError as exc:
        raise ValueError(f"{name} must hold integer label indices into labels; {exc}") from exc
    bad = np.flatnonzero((array < 0) | (array >= k))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] is {int(array[i])}, outside labels (valid indices 0..{k - 1} for {labels}); "
            f"{bad.size} value(s) out of range"
        )
    return array


def _confusion(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Counts (true, predicted) pairs into a [k, k] matrix."""
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    return matrix


def _prf(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1, with 0.0 wherever a denominator is 0."""
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    support = confusion.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def _ece(probs: np.ndarray, true: np.ndarray, pred: np.ndarray, k: int, bins: int) -> float:
    """Expected calibration error with equal-width bins over (0, 1]."""
    if bins < 1:
        raise ValueError(f"ece_bins is {bins}; use at least 1 (15 is the usual choice)")
    p = np.asarray(probs, dtype=float)
    if p.shape != (len(true), k):
        raise ValueError(f"probs has shape {p.shape}; expected ({len(true)}, {k}) = (examples, labels)")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs holds negative or non-finite values; pass softmax probabilities")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > _PROB_SUM_ATOL)
    if off.size:
        i = int(off[0])
        raise ValueError(
            f"probs row {i} sums to {sums[i]:.6f}, not 1; pass probabilities (apply softmax "
            f"over the label scores), {off.size} row(s) affected"
        )
    confidence = p.max(axis=1)
    correct = (true == pred).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 joins bin 0.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        if count:
            total += abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean())) * count
    return total / len(true)


def _slice_metrics(
    true: np.ndarray, pred: np.ndarray, slices: Sequence[str] | np.ndarray, k: int
) -> tuple[dict[str, dict[str, float]], float]:
    """Accuracy and macro-F1 per slice value, sorted by value, and the best-minus-worst gap."""
    values = [str(s) for s in slices]
    if len(values) != len(true):
        raise ValueError(
            f"slices has {len(values)} entries but y_true has {len(true)}; pass one slice value per example"
        )
    keys = np.asarray(values, dtype=object)
    stats: dict[str, dict[str, float]] = {}
    for value in sorted(set(values)):
        mask = keys == value
        confusion = _confusion(true[mask], pred[mask], k)
        _, _, f1 = _prf(confusion)
        present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
        stats[value] = {
            "n": int(mask.sum()),
            "accuracy": float(np.mean(true[mask] == pred[mask])),
            "macro_f1": float(np.mean(f1[present])),
        }
    accuracies = [row["accuracy"] for row in stats.values()]
    return stats, float(max(accuracies) - min(accuracies))


def _class_row(row: Mapping[str, Any]) -> dict[str, float]:
    return {
        "precision": float(row["precision"]),
        "recall": float(row["recall"]),
        "f1": float(row["f1"]),
        "support": int(row["support"]),
    }


def _slice_row(row: Mapping[str, Any]) -> dict[str, float]:
    return {"n": int(row["n"]), "accuracy": float(row["accuracy"]), "macro_f1": float(row["macro_f1"])}
