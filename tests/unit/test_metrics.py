"""Metrics on small cases computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softprompt.metrics import ClassificationMetrics, bootstrap_ci, classification_metrics, compare, mcnemar_p

LABELS = ["a", "b", "c"]
# Confusion (rows true, cols predicted): a=[1,1,0], b=[0,2,0], c=[1,0,1].
Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]


def test_accuracy_confusion_and_per_class_scores() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, None, LABELS)

    assert m.n == 6
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m.per_class["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m.per_class["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m.per_class["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m.ece is None
    assert m.slices is None
    assert m.slice_gap is None


def test_numpy_index_arrays_are_accepted() -> None:
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED, dtype=np.int32), None, LABELS)

    assert m.accuracy == pytest.approx(4 / 6)


def test_zero_division_gives_zero_and_macro_f1_averages_all_labels() -> None:
    # "b" has support but is never predicted; "c" has neither support nor predictions.
    m = classification_metrics([0, 0, 1], [0, 0, 0], None, LABELS)

    assert m.per_class["a"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m.per_class["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m.per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m.macro_f1 == pytest.approx(0.8 / 3)


def test_ece_on_constructed_example() -> None:
    # Two examples at confidence 0.85 (one right): gap 0.35; three at 0.75 (all right): gap 0.25.
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [0.25, 0.75], [0.25, 0.75], [0.25, 0.75]])
    y_true = [0, 1, 1, 1, 1]
    y_pred = [0, 0, 1, 1, 1]

    for bins in (10, 15):
        m = classification_metrics(y_true, y_pred, probs, ["neg", "pos"], ece_bins=bins)
        assert m.ece == pytest.approx((2 * 0.35 + 3 * 0.25) / 5)


def test_ece_is_zero_when_confident_and_right() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])

    m = classification_metrics([0, 1], [0, 1], probs, ["neg", "pos"])

    assert m.ece == pytest.approx(0.0)


def test_slices_and_gap() -> None:
    slices = ["x", "y", "x", "x", "y", "y"]

    m = classification_metrics(Y_TRUE, Y_PRED, None, LABELS, slices=slices)

    assert m.slices is not None
    assert list(m.slices) == ["x", "y"]
    # x: true [a, b, b], pred [a, b, b]; only a and b occur, both F1 1.
    assert m.slices["x"] == pytest.approx({"n": 3, "accuracy": 1.0, "macro_f1": 1.0})
    # y: true [a, c, c], pred [b, a, c]; a F1 0, b F1 0 (predicted, no support), c F1 2/3.
    assert m.slices["y"] == pytest.approx({"n": 3, "accuracy": 1 / 3, "macro_f1": (2 / 3) / 3})
    assert m.slice_gap == pytest.approx(2 / 3)


def test_single_slice_has_zero_gap() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, None, LABELS, slices=["all"] * 6)

    assert m.slice_gap == 0.0


def test_to_dict_is_json_ready_and_round_trips() -> None:
    probs = np.full((6, 3), 1 / 3)
    m = classification_metrics(Y_TRUE, Y_PRED, probs, LABELS, slices=["x", "y", "x", "x", "y", "y"])

    data = json.loads(json.dumps(m.to_dict()))
    back = ClassificationMetrics.from_dict(data)

    assert back == m
    assert type(m.to_dict()["confusion"][0][0]) is int
    assert type(m.to_dict()["per_class"]["a"]["support"]) is int
    assert (
        ClassificationMetrics.from_dict(classification_metrics([0], [0], None, ["a"]).to_dict()).ece is None
    )


def test_from_dict_names_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"confusion"):
        ClassificationMetrics.from_dict(
            {"n": 1, "accuracy": 1.0, "macro_f1": 1.0, "labels": [], "per_class": {}}
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"y_pred": [0, 1]}, r"y_true has 6 entries but y_pred has 2"),
        ({"y_pred": [0, 1, 3, 1, 0, 2]}, r"y_pred\[2\] is 3, outside labels"),
        ({"y_true": [0, -1, 1, 1, 2, 2]}, r"y_true\[1\] is -1"),
        ({"y_true": [0.5, 0, 1, 1, 2, 2]}, r"y_true must hold integer label indices"),
        ({"labels": []}, r"labels is empty"),
        ({"labels": ["a", "b", "a"]}, r"labels repeats \['a'\]"),
        ({"y_true": [], "y_pred": []}, r"y_true is empty"),
        ({"probs": np.full((6, 2), 0.5)}, r"probs has shape \(6, 2\); expected \(6, 3\)"),
        ({"probs": np.full((6, 3), 0.5)}, r"probs row 0 sums to 1.5"),
        ({"probs": np.full((6, 3), np.nan)}, r"non-finite"),
        ({"probs": np.full((6, 3), 1 / 3), "ece_bins": 0}, r"ece_bins is 0"),
        ({"slices": ["x"]}, r"slices has 1 entries but y_true has 6"),
    ],
)
def test_invalid_inputs_name_the_argument(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"y_true": Y_TRUE, "y_pred": Y_PRED, "probs": None, "labels": LABELS}
    args.update(kwargs)

    with pytest.raises(ValueError, match=message):
        classification_metrics(**args)  # type: ignore[arg-type]


def test_mcnemar_identical_methods_give_one() -> None:
    flags = [True, False, True, True, False]

    assert mcnemar_p(flags, flags) == 1.0


def test_mcnemar_exact_value_and_strong_difference() -> None:
    # Discordant pairs: A-only right 1, B-only right 5 -> p = 2 * (C(6,0) + C(6,1)) / 2**6.
    a = [True] + [False] * 5 + [True] * 4
    b = [False] + [True] * 5 + [True] * 4
    assert mcnemar_p(a, b) == pytest.approx(14 / 64)
    assert mcnemar_p(b, a) == pytest.approx(14 / 64)

    assert mcnemar_p([True] * 40, [False] * 40) < 1e-10


def test_mcnemar_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="correct_a has shape"):
        mcnemar_p([True, False], [True])


def test_bootstrap_ci_contains_accuracy_and_is_reproducible() -> None:
    correct = [True] * 70 + [False] * 30

    low, high = bootstrap_ci(correct)

    assert 0.55 < low < 0.7 < high < 0.85
    assert bootstrap_ci(correct) == (low, high)
    narrow = bootstrap_ci(correct, alpha=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"correct": []}, "correct is empty"),
        ({"correct": [True], "n_boot": 0}, "n_boot is 0"),
        ({"correct": [True], "alpha": 1.0}, "alpha is 1.0"),
    ],
)
def test_bootstrap_ci_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)  # type: ignore[arg-type]


def test_a_comparison_records_its_test_and_outcome() -> None:
    # 12 rows only A got right, 2 only B: p = 2 * P(X <= 2 | n=14) ~ 0.013.
    a = [True] * 12 + [False] * 2 + [True] * 6
    b = [False] * 12 + [True] * 2 + [True] * 6
    c = compare("few-shot", a, b, delta_points=50.0)
    assert (c.only_a, c.only_b) == (12, 2) and c.p_value == pytest.approx(mcnemar_p(a, b)) and c.p_value < 0.05
    assert c.outcome == "better" and c.phrase() == f"significantly better than few-shot (+50.0 points, p={c.p_value:.2g})"
    assert c.to_dict() == {"delta_points": 50.0, "mcnemar_p": c.p_value, "only_winner": 12, "only_baseline": 2, "outcome": "better", "significant": True}
    assert compare("few-shot", a[:4] + a[12:], b[:4] + b[12:], delta_points=10.0).outcome == "not_significant"
