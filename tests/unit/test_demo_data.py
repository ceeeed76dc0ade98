"""Sanity checks for the bundled customer-support intent demo dataset (src/softprompt/demo)."""

from __future__ import annotations

import csv
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

LABELS = {"billing", "cancellation", "delivery", "refund", "technical", "account", "product"}
SPLITS = ("train", "test")
REPO_DEMO_DIR = Path(__file__).resolve().parents[2] / "src" / "softprompt" / "demo"


def _demo_dir() -> Traversable | Path:
    try:
        demo = files("softprompt") / "demo"
        if demo.is_dir():
            return demo
    except ModuleNotFoundError:
        pass
    return REPO_DEMO_DIR


def _read(split: str) -> tuple[list[str], list[tuple[str, str]]]:
    with (_demo_dir() / f"{split}.csv").open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows: list[tuple[str, str]] = []
        for row in reader:
            assert len(row) == 2, f"{split}.csv: malformed row {row!r}"
            rows.append((row[0], row[1]))
    return header, rows


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def data() -> dict[str, list[tuple[str, str]]]:
    return {split: _read(split)[1] for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS)
def test_header_is_text_label(split: str) -> None:
    header, _ = _read(split)
    assert header == ["text", "label"]


@pytest.mark.parametrize("split", SPLITS)
def test_all_labels_present_and_valid(split: str, data: dict[str, list[tuple[str, str]]]) -> None:
    labels = {label for _, label in data[split]}
    assert labels == LABELS


@pytest.mark.parametrize("split", SPLITS)
def test_no_empty_text(split: str, data: dict[str, list[tuple[str, str]]]) -> None:
    for text, label in data[split]:
        assert text.strip(), f"empty text for label {label!r} in {split}"
        assert text == text.strip(), f"untrimmed text in {split}: {text!r}"


def test_counts_per_label(data: dict[str, list[tuple[str, str]]]) -> None:
    total = Counter(label for split in SPLITS for _, label in data[split])
    test = Counter(label for _, label in data["test"])
    for label in LABELS:
        assert total[label] >= 100, f"{label}: only {total[label]} rows in total"
        assert test[label] >= 25, f"{label}: only {test[label]} rows in test"
    assert sum(total.values()) >= 840


def test_labels_roughly_balanced(data: dict[str, list[tuple[str, str]]]) -> None:
    total = Counter(label for split in SPLITS for _, label in data[split])
    assert max(total.values()) - min(total.values()) <= 0.1 * max(total.values())


@pytest.mark.parametrize("split", SPLITS)
def test_no_duplicates_within_split(split: str, data: dict[str, list[tuple[str, str]]]) -> None:
    dupes = [t for t, n in Counter(_norm(text) for text, _ in data[split]).items() if n > 1]
    assert not dupes, f"duplicates in {split}: {dupes[:5]}"


def test_no_overlap_between_splits(data: dict[str, list[tuple[str, str]]]) -> None:
    train = {_norm(text) for text, _ in data["train"]}
    test = {_norm(text) for text, _ in data["test"]}
    overlap = train & test
    assert not overlap, f"texts in both train and test: {sorted(overlap)[:5]}"
