"""Checking: records -> kept rows and rejects.

Finds the configured columns in a parsed file, runs every row through the checks (in the order of
`REJECT_REASONS`), drops rows that leak between splits, writes every rejected row with its reason
and line to the rejects file, and says which files have too few usable rows to go on.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from softprompt.config import DataConfig, JobConfig
from softprompt.ingest.readers import Record, Source, is_index, kind_of
from softprompt.tasks import encode_input, encode_target

REJECT_REASONS = (
    "bad_row",
    "undecodable",
    "missing_text",
    "missing_label",
    "too_long_chars",
    "unknown_label",
    "duplicate",
    "conflicting_label",
    "too_long_tokens",
    "leakage",
)
"""Every reason a row can be rejected for, in the order the checks run."""

_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes after decoding with surrogateescape
_MISSING = object()
_SHOWN_CHARS = 200


@dataclass(frozen=True)
class Row:
    """A row that passed every check, encoded for the model."""

    line: int
    text: str
    label: str
    """Label name, or target text for generation."""
    label_id: int
    slice: str | None
    key: str
    """Normalized text, for duplicate and leakage checks."""
    input_ids: list[int]
    target_ids: list[int]


@dataclass(frozen=True)
class Reject:
    """A rejected row: one line of the rejects file."""

    file: str
    line: int
    reason: str
    detail: str
    text: str


@dataclass
class Checked:
    """One input file after the checks."""

    split: str
    uri: str
    sha256: str
    rows_read: int
    kept: list[Row]
    rejects: list[Reject]
    warnings: list[str]
    unit: str = "line"
    """What a row's number counts in messages: `line`, or `row` for Parquet."""


@dataclass(frozen=True)
class _Layout:
    """How one file's records are read: where each role lives and how messages name it."""

    columns: dict[str, str | int]
    """Role -> key or 0-based index."""
    named: dict[str, str]
    """Role -> the column as messages name it (`column 'review' (data.text_column)`)."""
    width: int
    unit: str


def resolve_columns(source: Source, data: DataConfig) -> tuple[dict[str, str | int], list[str]]:
    """Where text, label and slice live in each row: a key (JSON objects) or a 0-based index.

    Returns:
        Role (`text`, `label`, `slice`) -> key or index, and every column setting the file cannot
        satisfy, each naming the file, the option, the columns found and the fix.
    """
    resolved: dict[str, str | int] = {}
    problems: list[str] = []
    width = _usual_width(source)
    for role, spec in (
        ("text", data.text_column),
        ("label", data.label_column),
        ("slice", data.slice_column),
    ):
        if spec is None:
            continue
        option = f"data.{role}_column"
        if source.keyed:
            key = str(spec)
            if not any(isinstance(r.values, dict) and key in r.values for r in source.records):
                found = list(
                    dict.fromkeys(k for r in source.records if isinstance(r.values, dict) for k in r.values)
                )
                problems.append(
                    f"{source.where}: no line has the key {key!r} ({option}); keys found: {found[:20]}; "
                    f"set {option} to one of them"
                )
            resolved[role] = key
        elif source.names is not None and str(spec).strip() in source.names:
            resolved[role] = source.names.index(str(spec).strip())
        elif is_index(spec) and int(spec) < width:
            resolved[role] = int(spec)
        elif is_index(spec) and source.fmt == "parquet" and source.names is not None:
            shown = [_clip(n, 40) for n in source.names[:20]]
            problems.append(
                f"{source.where}: {option}={spec} but the file has {width} columns {shown}; "
                f"set {option} to a column's name"
            )
        elif is_index(spec):
            problems.append(
                f"{source.where}: {option}={spec} but its rows have {width} fields "
                f"(0-based indexes 0..{width - 1}); set {option} to one of them"
            )
        elif source.names is not None:
            what = "the file has columns" if source.fmt == "parquet" else "the header has columns"
            hint = (
                f"; if the file has no header row, set data.header=false and give {option} as a 0-based index"
                if source.header_guessed
                else ""
            )
            shown = [_clip(n, 40) for n in source.names[:20]]
            problems.append(
                f"{source.where}: no column {spec!r} ({option}); {what} {shown}; "
                f"set {option} to one of them{hint}"
            )
        else:
            why = (
                "its lines are JSON arrays" if source.fmt == "jsonl" else "data.header=false (no header row)"
            )
            problems.append(
                f"{source.where}: {option}={spec!r} is a column name, but {why}; give a 0-based index "
                f"(rows have {width} fields) or set data.header=true"
            )
    return resolved, problems


def check_source(
    source: Source, columns: dict[str, str | int], cfg: JobConfig, tokenizer: Any, progress: bool
) -> Checked:
    """Run every row of one file through the checks.

    Args:
        source: The parsed file.
        columns: Where each role lives in a row (from `resolve_columns`).
        cfg: The job; `cfg.data` holds the limits and label map, `cfg.task` the template and labels.
        tokenizer: The base model's tokenizer, to encode kept rows and measure their length.
        progress: Show a progress bar over the rows.

    Returns:
        The kept rows, the rejects (each with a reason and its line) and warnings.
    """
    task = cfg.task
    label_ids = {label: i for i, label in enumerate(task.labels)}
    named = {role: _column_named(source, role, getattr(cfg.data, f"{role}_column"), c) for role, c in columns.items()}
    layout = _Layout(columns, named, _usual_width(source), source.unit)
    first_seen: dict[str, tuple[int, str]] = {}  # normalized text -> (line, label) of the first kept row
    seen_pairs: dict[tuple[str, str], int] = {}  # generation: (text, target) -> line
    kept: list[Row] = []
    rejects: list[Reject] = []
    records = tqdm(source.records, desc=f"ingest {source.split}", unit="row", disable=not progress)
    for rec in records:
        outcome = _check_record(rec, layout, cfg, tokenizer, label_ids, first_seen, seen_pairs)
        if isinstance(outcome, Row):
            kept.append(outcome)
            first_seen.setdefault(outcome.key, (outcome.line, outcome.label))
            seen_pairs.setdefault((outcome.key, _normalize(outcome.label)), outcome.line)
        else:
            reason, detail, shown = outcome
            rejects.append(Reject(source.uri, rec.line, reason, _shown(detail), _shown(shown)))
    warnings: list[str] = []
    first = source.records[0]
    if source.names is None and not source.keyed and rejects and rejects[0].line == first.line == 1:
        warnings.append(
            f"{source.where}: line 1 was rejected ({rejects[0].reason}); if it is a header row, "
            "set data.header=true"
        )
    return Checked(source.split, source.uri, source.sha256, len(source.records), kept, rejects, warnings, source.unit)


def reject_leakage(checked: dict[str, Checked]) -> None:
    """Drop train rows also in eval/test and eval rows also in test: evaluation data stays intact."""
    for split, against in (("eval", ("test",)), ("train", ("eval", "test"))):
        if split not in checked:
            continue
        index: dict[str, tuple[str, str, str]] = {}
        for other in against:
            if other in checked:
                for row in checked[other].kept:
                    index.setdefault(row.key, (other, checked[other].uri, f"{checked[other].unit} {row.line}"))
        if not index:
            continue
        c = checked[split]
        kept: list[Row] = []
        for row in c.kept:
            hit = index.get(row.key)
            if hit is None:
                kept.append(row)
                continue
            detail = (
                f"the same text is in the {hit[0]} file ({hit[1]} {hit[2]}); kept there, dropped here"
            )
            c.rejects.append(Reject(c.uri, row.line, "leakage", detail, _shown(row.text)))
        c.kept = kept
        c.rejects.sort(key=lambda r: r.line)


def file_problems(c: Checked, data: DataConfig, rejects_path: Path) -> list[str]:
    """Why a checked file cannot be used: no usable rows, or more rejects than
    `data.max_reject_fraction` allows (with the most common reasons); empty when it can."""
    share = len(c.rejects) / c.rows_read
    if c.kept and share <= data.max_reject_fraction:
        return []
    by_reason: dict[str, list[Reject]] = {}
    for r in c.rejects:
        by_reason.setdefault(r.reason, []).append(r)
    top = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), REJECT_REASONS.index(kv[0])))[:3]
    reasons = "; ".join(f"{reason} {len(rs)} (e.g. {c.unit} {rs[0].line}: {rs[0].detail})" for reason, rs in top)
    if not c.kept:
        return [
            f"data.{c.split} file {c.uri} has no usable rows: all {c.rows_read} rows were rejected: {reasons}. "
            f"Every rejected row is listed in {rejects_path}; fix the data or the column and label settings"
        ]
    return [
        f"data.{c.split} file {c.uri}: {len(c.rejects)} of {c.rows_read} rows rejected ({share:.1%}, above "
        f"data.max_reject_fraction={data.max_reject_fraction}): {reasons}. Every rejected row is listed in "
        f"{rejects_path}; clean the data or raise data.max_reject_fraction"
    ]


def write_rejects(path: Path, checked: dict[str, Checked]) -> None:
    """Write every rejected row as one JSON line: file, line, reason, detail, text."""
    with path.open("w", encoding="utf-8") as f:
        for c in checked.values():
            for r in c.rejects:
                record = {
                    "file": r.file,
                    "line": r.line,
                    "reason": r.reason,
                    "detail": r.detail,
                    "text": r.text,
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _usual_width(source: Source) -> int:
    if source.names is not None:
        return len(source.names)
    widths = Counter(len(r.values) for r in source.records if isinstance(r.values, list))
    return widths.most_common(1)[0][0] if widths else 0


def _column_named(source: Source, role: str, spec: str | int | None, column: str | int) -> str:
    """The column of a role as messages name it: by its name wherever the file has names (a
    Parquet schema, a header row), never by an index the config did not write."""
    option = f"data.{role}_column"
    if isinstance(column, str):
        return f"key {column!r} ({option})"
    if source.names is not None and column < len(source.names):
        name = _clip(source.names[column], 40)
        return f"column {name!r} ({option}={spec})" if spec is not None and is_index(spec) else f"column {name!r} ({option})"
    return f"field {column} ({option}={spec})"


def _check_record(
    rec: Record,
    layout: _Layout,
    cfg: JobConfig,
    tokenizer: Any,
    label_ids: dict[str, int],
    first_seen: dict[str, tuple[int, str]],
    seen_pairs: dict[tuple[str, str], int],
) -> Row | tuple[str, str, str]:
    """A kept row, or (reason, detail, text to show) for a rejected one."""
    data, task = cfg.data, cfg.task
    unit, named, width = layout.unit, layout.named, layout.width
    if rec.values is None:
        return "bad_row", f"{unit} {rec.line} {rec.problem}", rec.raw
    if isinstance(rec.values, list) and len(rec.values) != width:
        end = rec.line + rec.raw.count("\n")
        spans = f"; the record runs to line {end}: an unclosed quote?" if end > rec.line else ""
        return "bad_row", f"has {len(rec.values)} fields, expected {width}{spans}", rec.raw
    values: dict[str, str | None] = {}
    for role, column in layout.columns.items():
        value, problem = _as_str(_get(rec.values, column), numbers_ok=role != "text")
        if problem:
            return "bad_row", f"the {role} in {named[role]} {problem}", rec.raw
        values[role] = value
    text, raw_label, slice_value = values["text"], values["label"], values.get("slice")
    if any(v is not None and _SURROGATE.search(v) for v in values.values()):
        return (
            "undecodable",
            "holds bytes that are not valid UTF-8 (shown as \ufffd); re-save the file as UTF-8",
            rec.raw,
        )
    if text is None or not text.strip():
        return "missing_text", f"the text in {named['text']} is empty", rec.raw
    if raw_label is None or not raw_label.strip():
        return "missing_label", f"the label in {named['label']} is empty", text
    if len(text) > data.max_text_chars:
        return (
            "too_long_chars",
            f"{len(text)} characters, more than data.max_text_chars={data.max_text_chars}; "
            "shorten it or raise the limit",
            text,
        )
    key = _normalize(text)
    if task.kind == "classification":
        raw = raw_label.strip()
        label = data.label_map.get(raw, raw)
        if label not in label_ids:
            mapped = f" (data.label_map maps {raw!r} to it)" if label != raw else ""
            return (
                "unknown_label",
                f"label {label!r}{mapped} is not one of {task.labels}; map raw values to label names with "
                f"data.label_map, e.g. data.label_map={{{raw!r}: {task.labels[0]!r}}}",
                text,
            )
        earlier = first_seen.get(key)
        if earlier is not None and earlier[1] == label:
            return "duplicate", f"same text and label as {unit} {earlier[0]}", text
        if earlier is not None:
            return (
                "conflicting_label",
                f"{unit} {earlier[0]} has the same text with label {earlier[1]!r}, this row says {label!r}",
                text,
            )
        label_id, target_ids = label_ids[label], list[int]()
    else:
        # Generation keeps several targets for one input (references, paraphrases); only exact
        # repeats of input and target are duplicates.
        label = raw_label
        earlier_line = seen_pairs.get((key, _normalize(label)))
        if earlier_line is not None:
            return "duplicate", f"same text and target as {unit} {earlier_line}", text
        label_id, target_ids = -1, encode_target(tokenizer, label)
    input_ids = encode_input(tokenizer, task.template, text)
    if len(input_ids) > data.max_tokens:
        return (
            "too_long_tokens",
            f"{len(input_ids)} tokens with the template, more than data.max_tokens={data.max_tokens}; "
            "shorten it or raise the limit",
            text,
        )
    slice_value = (slice_value.strip() or None) if slice_value is not None else None
    return Row(rec.line, text, label, label_id, slice_value, key, input_ids, target_ids)


def _get(values: list[Any] | dict[str, Any], column: str | int) -> Any:
    if isinstance(values, dict):
        return values.get(str(column), _MISSING)
    return values[column] if isinstance(column, int) and column < len(values) else _MISSING


def _as_str(value: Any, *, numbers_ok: bool) -> tuple[str | None, str | None]:
    """(the value as text or None when missing, a problem when it has the wrong type)."""
    if value is _MISSING or value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if isinstance(value, str):
        return value, None
    if numbers_ok and isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    # pandas turns an integer column with gaps into floats; 1.0 still means label "1".
    if numbers_ok and isinstance(value, float) and value.is_integer():
        return str(int(value)), None
    return None, f"is a {kind_of(value)} ({_clip(repr(value), 40)}), not a string"


def _normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _shown(text: str) -> str:
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _clip(text, _SHOWN_CHARS)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"
