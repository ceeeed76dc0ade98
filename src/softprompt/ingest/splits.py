"""Splitting: kept rows -> the train/eval(/test) splits, their fingerprint and length statistics.

The eval split comes from its own file or is held out of train, stratified by label and seeded per
label; `data.max_*_rows` caps a split with a seeded stratified sample. Both keep file order.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

from softprompt.config import JobConfig
from softprompt.dataset import Split
from softprompt.errors import DataError
from softprompt.ingest.checks import Checked, Row


def make_splits(checked: dict[str, Checked], cfg: JobConfig) -> tuple[dict[str, list[Row]], dict[str, Any]]:
    """The rows of each split, and how splits were capped by `data.max_*_rows`.

    Args:
        checked: Split -> its checked file; `train` is always there.
        cfg: The job; `cfg.data` holds the eval fraction, seed and caps.

    Returns:
        Split -> rows, and split -> {rows_before, rows_after, option} for every capped split.

    Raises:
        DataError: there is no eval file and train has too few rows to hold one out.
    """
    data = cfg.data
    by_label = cfg.task.kind == "classification"
    train = checked["train"].kept
    if "eval" in checked:
        eval_rows = checked["eval"].kept
    else:
        train, eval_rows = _hold_out(train, data.eval_fraction, data.split_seed, by_label)
        if not eval_rows:
            raise DataError(
                f"data.train file {checked['train'].uri} has too few usable rows ({len(train)}) to hold out "
                f"an eval split (data.eval_fraction={data.eval_fraction}; a label needs 2 rows for one to be "
                "held out); add rows or set data.eval to an eval file"
            )
    splits = {"train": train, "eval": eval_rows}
    if "test" in checked:
        splits["test"] = checked["test"].kept
    sampling: dict[str, Any] = {}
    limits = {"train": data.max_train_rows, "eval": data.max_eval_rows, "test": data.max_test_rows}
    for split, rows in list(splits.items()):
        limit = limits[split]
        if limit is not None and len(rows) > limit:
            sampling[split] = {
                "rows_before": len(rows),
                "rows_after": limit,
                "option": f"data.max_{split}_rows",
            }
            splits[split] = _sample(rows, limit, f"{data.split_seed}:{split}", by_label)
    return splits, sampling


def to_split(rows: list[Row]) -> Split:
    """The rows as a `softprompt.dataset.Split`, ready to write."""
    return Split(
        input_ids=[r.input_ids for r in rows],
        label_ids=[r.label_id for r in rows],
        texts=[r.text for r in rows],
        labels=[r.label for r in rows],
        target_ids=[r.target_ids for r in rows],
        slices=[r.slice for r in rows],
        rows=[r.line for r in rows],
    )


def content_fingerprint(splits: dict[str, list[Row]], cfg: JobConfig) -> str:
    """SHA-256 (hex) over every row of every split plus the task's kind, template and labels."""
    # Content only (no paths, line numbers or timestamps): the same examples give the same fingerprint.
    task = cfg.task
    digest = hashlib.sha256()
    head = {"kind": task.kind, "template": task.template, "labels": task.labels}
    digest.update(json.dumps(head, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    for split, rows in splits.items():
        for r in rows:
            item = [split, r.text, r.label, r.label_id, r.slice, r.input_ids, r.target_ids]
            digest.update(json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def length_stats(rows: list[Row]) -> dict[str, float]:
    """Tokens per row (input plus target): min, mean, p50, p95 (nearest rank) and max."""
    lengths = sorted(len(r.input_ids) + len(r.target_ids) for r in rows)
    if not lengths:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}

    def nearest_rank(q: float) -> int:
        return lengths[max(0, math.ceil(q * len(lengths)) - 1)]

    return {
        "min": lengths[0],
        "mean": round(sum(lengths) / len(lengths), 2),
        "p50": nearest_rank(0.5),
        "p95": nearest_rank(0.95),
        "max": lengths[-1],
    }


def _strata(rows: list[Row], by_label: bool) -> dict[str, list[int]]:
    strata: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        strata.setdefault(row.label if by_label else "", []).append(i)
    return strata


def _hold_out(rows: list[Row], fraction: float, seed: int, by_label: bool) -> tuple[list[Row], list[Row]]:
    """Per label: shuffle (seeded) and hold out round(fraction * n) rows, at least 1 and at most n - 1."""
    held: list[int] = []
    for label, idx in _strata(rows, by_label).items():
        n = len(idx)
        if n < 2:
            continue
        take = min(max(round(fraction * n), 1), n - 1)
        shuffled = list(idx)
        # Seeded per label, so adding rows of one label never moves another label's split.
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        held.extend(shuffled[:take])
    chosen = set(held)
    return [r for i, r in enumerate(rows) if i not in chosen], [rows[i] for i in sorted(chosen)]


def _sample(rows: list[Row], limit: int, seed: str, by_label: bool) -> list[Row]:
    """A seeded stratified sample of `limit` rows (largest-remainder quotas), in file order."""
    strata = _strata(rows, by_label)
    quota = {label: limit * len(idx) / len(rows) for label, idx in strata.items()}
    take = {label: int(q) for label, q in quota.items()}
    short = limit - sum(take.values())
    for label in sorted(strata, key=lambda s: (-(quota[s] - take[s]), -len(strata[s]), s))[:short]:
        take[label] += 1
    chosen: list[int] = []
    for label, idx in strata.items():
        shuffled = list(idx)
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        chosen.extend(shuffled[: take[label]])
    return [rows[i] for i in sorted(chosen)]
