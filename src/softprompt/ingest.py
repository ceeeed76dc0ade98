"""Ingest: read the raw example files, check every row, and write the prepared dataset.

`run` reads `data.train` (and `data.eval`, `data.test` when given) from local paths or `s3://`
URIs, as CSV, TSV, JSON Lines or Parquet; maps raw labels to `task.labels`; rejects bad rows with a
reason and the line they came from (every one listed in `rejects.jsonl`); holds out a stratified
eval split when there is no eval file; and writes the folder that `softprompt.dataset` describes.
Files that cannot be used stop the run with one `DataError` that names everything wrong at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from softprompt.config import DataConfig, JobConfig, S3Config
from softprompt.dataset import SPLITS, Split, write_split
from softprompt.errors import DataError, StoreError
from softprompt.modeling import load_tokenizer
from softprompt.tasks import encode_input, encode_target
from softprompt.uris import is_s3, read_bytes

MANIFEST_FILE = "dataset_manifest.json"
REJECTS_FILE = "rejects.jsonl"
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

FORMATS_BY_EXTENSION = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""What `data.format: auto` picks for each file extension."""

_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes after decoding with surrogateescape
_MISSING = object()
_SHOWN_CHARS = 200


@dataclass(frozen=True)
class IngestResult:
    """What ingest prepared: the contract between ingest and the stages after it."""

    output_dir: Path
    """Folder holding train/eval(/test).parquet, rejects.jsonl and dataset_manifest.json."""
    fingerprint: str
    """SHA-256 (hex) over every prepared row of every split plus the task's kind, template and labels."""
    counts: dict[str, int]
    """Split -> rows written."""
    label_counts: dict[str, dict[str, int]]
    """Split -> label -> rows (in `task.labels` order; empty for generation tasks)."""
    rejected: int
    """Rows rejected over all files."""
    rejects_by_reason: dict[str, int]
    """Reason -> rejected rows (reasons with at least one row)."""
    rejects_file: Path | None
    """`rejects.jsonl`, or None when no row was rejected (an empty file is still written)."""
    manifest_path: Path
    """`dataset_manifest.json`."""
    warnings: list[str] = field(default_factory=list)
    """Things worth a look that did not stop the run (labels missing from a split, ...)."""

    def summary(self) -> str:
        """A few lines for people: rows per split and label, rejects, warnings."""
        lines = [f"prepared dataset in {self.output_dir} (fingerprint {self.fingerprint[:12]})"]
        for split, n in self.counts.items():
            per_label = ", ".join(f"{k} {v}" for k, v in self.label_counts.get(split, {}).items())
            lines.append(f"  {split:<5} {n:>7} rows" + (f"  ({per_label})" if per_label else ""))
        if self.rejected:
            reasons = ", ".join(f"{k} {v}" for k, v in self.rejects_by_reason.items())
            lines.append(f"  rejected {self.rejected} rows ({reasons}); see {self.rejects_file}")
        else:
            lines.append("  no rows rejected")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def run(
    cfg: JobConfig, output_dir: Path, *, tokenizer: Any | None = None, progress: bool = False
) -> IngestResult:
    """Read, check and split the configured files and write the prepared dataset.

    Args:
        cfg: The job; `cfg.data` says what to read and how, `cfg.task` the template and labels.
        output_dir: Folder to write to (created). Prepared files of an earlier run are removed
            first, so a failed run never leaves a mix of old and new splits behind.
        tokenizer: The base model's tokenizer; None loads it from `cfg.model`.
        progress: Show a progress bar over the rows of each file.

    Returns:
        Counts, rejects, warnings and the fingerprint of what was written.

    Raises:
        DataError: listing every unusable file (missing, unreadable, empty, a missing column, no
            usable rows, or more rejected rows than `data.max_reject_fraction` allows).
            `rejects.jsonl` is written before it is raised.
    """
    data, task = cfg.data, cfg.task
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*(f"{s}.parquet" for s in SPLITS), MANIFEST_FILE, REJECTS_FILE):
        (out / name).unlink(missing_ok=True)

    readable, problems = _read_all(data, cfg.s3)
    # Loaded only now, so a mistyped path fails before a base model is fetched or converted.
    tok: Any = tokenizer
    if readable and tok is None:
        tok = load_tokenizer(cfg.model)
    checked = {s.split: _check(s, columns, cfg, tok, progress) for s, columns in readable}
    _reject_leakage(checked)
    rejects_path = out / REJECTS_FILE
    _write_rejects(rejects_path, checked)
    for c in checked.values():
        problems.extend(_file_problems(c, data, rejects_path))
    if problems:
        raise DataError(_join(problems))

    splits, sampling = _make_splits(checked, cfg)
    by_label = task.kind == "classification"
    label_counts = {
        s: {label: sum(r.label == label for r in rows) for label in task.labels} if by_label else {}
        for s, rows in splits.items()
    }
    counts = {s: len(rows) for s, rows in splits.items()}
    warnings = [w for c in checked.values() for w in c.warnings]
    for s, per_label in label_counts.items():
        for label, n in per_label.items():
            if n == 0:
                warnings.append(f"label {label!r} has no rows in the {s} split")
            elif n < 2:
                warnings.append(f"label {label!r} has only {n} row in the {s} split")
    for s, rows in splits.items():
        write_split(out, s, _to_split(rows))

    rejects = [r for c in checked.values() for r in c.rejects]
    reason_counts = Counter(r.reason for r in rejects)
    by_reason = {reason: reason_counts[reason] for reason in REJECT_REASONS if reason_counts[reason]}
    fingerprint = _fingerprint(splits, cfg)
    manifest = {
        "format_version": 1,
        "fingerprint": fingerprint,
        "task": {"name": task.name, "kind": task.kind, "template": task.template, "labels": task.labels},
        "sources": [
            {
                "split": c.split,
                "uri": c.uri,
                "sha256": c.sha256,
                "rows_read": c.rows_read,
                "rows_kept": len(c.kept),
                "rows_rejected": len(c.rejects),
            }
            for c in checked.values()
        ],
        "counts": counts,
        "label_counts": label_counts,
        "rejects_by_reason": by_reason,
        "token_lengths": {s: _length_stats(rows) for s, rows in splits.items()},
        "tokenizer": {
            "name_or_path": str(getattr(tok, "name_or_path", "")),
            "vocab_size": len(tok),
        },
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "split": {
            "eval_from": "file" if "eval" in checked else "train",
            "eval_fraction": data.eval_fraction,
            "split_seed": data.split_seed,
        },
        "sampling": sampling,
        "warnings": warnings,
    }
    manifest_path = out / MANIFEST_FILE
    tmp = manifest_path.with_name(f".{MANIFEST_FILE}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)  # the manifest appears last: its presence means the folder is complete
    return IngestResult(
        output_dir=out,
        fingerprint=fingerprint,
        counts=counts,
        label_counts=label_counts,
        rejected=len(rejects),
        rejects_by_reason=by_reason,
        rejects_file=rejects_path if rejects else None,
        manifest_path=manifest_path,
        warnings=warnings,
    )


def check_sources(cfg: JobConfig) -> list[str]:
    """Pre-flight check of the configured input files, for `softprompt validate`.

    Each file must exist, be readable and parseable in its format, hold data rows and have the
    configured columns. Rows are not checked, no tokenizer is loaded and nothing is written.

    Returns:
        Every problem found, each naming the file and the fix; empty when ingest can start.
    """
    return _read_all(cfg.data, cfg.s3)[1]


def _read_all(data: DataConfig, s3: S3Config) -> tuple[list[tuple[_Source, dict[str, str | int]]], list[str]]:
    """The readable sources with their resolved columns, and the problems of the others."""
    problems: list[str] = []
    readable: list[tuple[_Source, dict[str, str | int]]] = []
    for split, uri in (("train", data.train), ("eval", data.eval), ("test", data.test)):
        if not uri:
            continue
        try:
            source = _read(split, uri, data, s3)
        except DataError as exc:
            problems.append(str(exc))
            continue
        columns, column_problems = _resolve_columns(source, data)
        problems.extend(column_problems)
        if not column_problems:
            readable.append((source, columns))
    return readable, problems


# --------------------------------------------------------------------------------------------------
# Reading: bytes -> records (one per data row, with the line it starts on)


@dataclass
class _Record:
    line: int
    values: list[Any] | dict[str, Any] | None  # None: the row could not be parsed (see problem)
    raw: str
    problem: str | None = None


@dataclass
class _Source:
    split: str
    uri: str
    fmt: str
    sha256: str
    records: list[_Record]
    names: list[str] | None  # column names from a header row or the Parquet schema
    keyed: bool  # rows are JSON objects (values by key) rather than lists of fields
    header_guessed: bool  # `data.header` was null and we decided

    @property
    def where(self) -> str:
        return f"data.{self.split} file {self.uri}"


def _read(split: str, uri: str, data: DataConfig, s3: S3Config) -> _Source:
    where = f"data.{split} file {uri}"
    raw = _load(split, uri, s3)
    fmt = _pick_format(split, uri, data)
    sha = hashlib.sha256(raw).hexdigest()
    if not raw.strip():
        raise DataError(f"{where} is empty; point data.{split} at a file with examples")
    names: list[str] | None = None
    keyed = False
    guessed = data.header is None
    if fmt == "parquet":
        names, records = _parse_parquet(raw, where)
        guessed = False
    else:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{where} is UTF-16 encoded; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)")
        if raw.startswith(b"PAR1"):
            raise DataError(f"{where} is a Parquet file; name it .parquet or set data.format=parquet")
        text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        if fmt == "jsonl":
            keyed, records = _parse_jsonl(text, where)
            guessed = False
        else:
            header = data.header if data.header is not None else _columns_by_name(data)
            names, records = _parse_delimited(text, "," if fmt == "csv" else "\t", header)
    if not records:
        what = "a header row but no data rows" if names else "no data rows"
        raise DataError(f"{where} has {what}; point data.{split} at a file with examples")
    return _Source(split, uri, fmt, sha, records, names, keyed, guessed)


def _load(split: str, uri: str, s3: S3Config) -> bytes:
    if is_s3(uri):
        if not uri[len("s3://") :].strip("/").count("/"):
            raise DataError(f"data.{split}={uri!r} does not name a file; write it as s3://BUCKET/path/file.csv")
        try:
            return read_bytes(uri, endpoint=s3.endpoint, region=s3.region)
        except StoreError as exc:
            raise DataError(f"cannot read data.{split}={uri}: {exc}; check data.{split} and s3.endpoint") from exc
    try:
        return read_bytes(uri)
    except StoreError as exc:
        raise DataError(f"data.{split} file {exc} (relative paths start at {Path.cwd()}); check data.{split}") from exc


def _pick_format(split: str, uri: str, data: DataConfig) -> str:
    if data.format != "auto":
        return data.format
    suffix = Path(uri.rstrip("/").rsplit("/", 1)[-1]).suffix.lower()
    fmt = FORMATS_BY_EXTENSION.get(suffix)
    if fmt is None:
        raise DataError(
            f"data.{split} file {uri}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            "set data.format to csv, tsv, jsonl or parquet"
        )
    return fmt


def _columns_by_name(data: DataConfig) -> bool:
    specs = (data.text_column, data.label_column, data.slice_column)
    return any(spec is not None and not _is_index(spec) for spec in specs)


def _is_index(spec: str | int) -> bool:
    # YAML `text_column: 1` reaches us as "1" (the config keeps str before int), so digits count.
    return isinstance(spec, int) or spec.strip().isdigit()


def _parse_delimited(text: str, delimiter: str, header: bool) -> tuple[list[str] | None, list[_Record]]:
    # TSV has no quoting by convention (IANA); a stray quote in a review must not swallow lines.
    lines = io.StringIO(text, newline="").readlines()
    if delimiter == ",":
        reader = csv.reader(iter(lines), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
    else:
        reader = csv.reader(iter(lines), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    names: list[str] | None = None
    records: list[_Record] = []
    done = 0  # physical lines consumed so far
    while True:
        start = done + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            done = reader.line_num
            records.append(
                _Record(start, None, _lines(lines, start, done), f"is an unreadable record: {exc}")
            )
            continue
        done = reader.line_num
        if not fields:  # a blank line holds no row
            continue
        if header and names is None:
            names = [f.strip() for f in fields]
            continue
        records.append(_Record(start, fields, _lines(lines, start, done)))
    return names, records


def _lines(lines: list[str], start: int, end: int) -> str:
    return "".join(lines[start - 1 : end]).rstrip("\r\n")


def _parse_jsonl(text: str, where: str) -> tuple[bool, list[_Record]]:
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, list) and (
            text.strip().count("\n") or any(isinstance(x, (dict, list)) for x in doc)
        ):
            raise DataError(
                f"{where} is one JSON array, not JSON Lines (one object per line); convert it with "
                "`jq -c '.[]' FILE > FILE.jsonl`"
            )
    records: list[_Record] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(
                _Record(number, None, line, f"is not valid JSON ({exc.msg} at column {exc.colno})")
            )
            continue
        if not isinstance(value, (dict, list)):
            records.append(
                _Record(number, None, line, f"holds a JSON {_kind(value)}, not an object or array")
            )
            continue
        records.append(_Record(number, value, line))
    objects = sum(isinstance(r.values, dict) for r in records)
    keyed = objects >= sum(isinstance(r.values, list) for r in records)
    for r in records:
        if r.values is not None and isinstance(r.values, dict) != keyed:
            r.problem = (
                "is a JSON array but the other lines are objects"
                if keyed
                else ("is a JSON object but the other lines are arrays")
            )
            r.values = None
    return keyed, records


def _parse_parquet(raw: bytes, where: str) -> tuple[list[str], list[_Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{where} is not a readable Parquet file ({exc}); check the file or set data.format"
        ) from exc
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return list(table.column_names), [
        _Record(i, list(v), "") for i, v in enumerate(zip(*columns, strict=True), start=1)
    ]


# --------------------------------------------------------------------------------------------------
# Checking: records -> kept rows and rejects


@dataclass(frozen=True)
class _Row:
    line: int
    text: str
    label: str  # label name, or target text for generation
    label_id: int
    slice: str | None
    key: str  # normalized text, for duplicate and leakage checks
    input_ids: list[int]
    target_ids: list[int]


@dataclass(frozen=True)
class _Reject:
    file: str
    line: int
    reason: str
    detail: str
    text: str


@dataclass
class _Checked:
    split: str
    uri: str
    sha256: str
    rows_read: int
    kept: list[_Row]
    rejects: list[_Reject]
    warnings: list[str]


def _resolve_columns(source: _Source, data: DataConfig) -> tuple[dict[str, str | int], list[str]]:
    """Where text, label and slice live in each row: a key (JSON objects) or a 0-based index."""
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
        elif _is_index(spec) and int(spec) < width:
            resolved[role] = int(spec)
        elif _is_index(spec):
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


def _usual_width(source: _Source) -> int:
    if source.names is not None:
        return len(source.names)
    widths = Counter(len(r.values) for r in source.records if isinstance(r.values, list))
    return widths.most_common(1)[0][0] if widths else 0


def _check(
    source: _Source, columns: dict[str, str | int], cfg: JobConfig, tokenizer: Any, progress: bool
) -> _Checked:
    task = cfg.task
    label_ids = {label: i for i, label in enumerate(task.labels)}
    width = _usual_width(source)
    first_seen: dict[str, tuple[int, str]] = {}  # normalized text -> (line, label) of the first kept row
    seen_pairs: dict[tuple[str, str], int] = {}  # generation: (text, target) -> line
    kept: list[_Row] = []
    rejects: list[_Reject] = []
    records = tqdm(source.records, desc=f"ingest {source.split}", unit="row", disable=not progress)
    for rec in records:
        outcome = _check_record(rec, columns, width, cfg, tokenizer, label_ids, first_seen, seen_pairs)
        if isinstance(outcome, _Row):
            kept.append(outcome)
            first_seen.setdefault(outcome.key, (outcome.line, outcome.label))
            seen_pairs.setdefault((outcome.key, _normalize(outcome.label)), outcome.line)
        else:
            reason, detail, shown = outcome
            rejects.append(_Reject(source.uri, rec.line, reason, _shown(detail), _shown(shown)))
    warnings: list[str] = []
    first = source.records[0]
    if source.names is None and not source.keyed and rejects and rejects[0].line == first.line == 1:
        warnings.append(
            f"{source.where}: line 1 was rejected ({rejects[0].reason}); if it is a header row, "
            "set data.header=true"
        )
    return _Checked(source.split, source.uri, source.sha256, len(source.records), kept, rejects, warnings)


def _check_record(
    rec: _Record,
    columns: dict[str, str | int],
    width: int,
    cfg: JobConfig,
    tokenizer: Any,
    label_ids: dict[str, int],
    first_seen: dict[str, tuple[int, str]],
    seen_pairs: dict[tuple[str, str], int],
) -> _Row | tuple[str, str, str]:
    """A kept row, or (reason, detail, text to show) for a rejected one."""
    data, task = cfg.data, cfg.task
    if rec.values is None:
        return "bad_row", f"line {rec.line} {rec.problem}", rec.raw
    if isinstance(rec.values, list) and len(rec.values) != width:
        end = rec.line + rec.raw.count("\n")
        spans = f"; the record runs to line {end}: an unclosed quote?" if end > rec.line else ""
        return "bad_row", f"has {len(rec.values)} fields, expected {width}{spans}", rec.raw
    values: dict[str, str | None] = {}
    for role, column in columns.items():
        value, problem = _as_str(_get(rec.values, column), numbers_ok=role != "text")
        if problem:
            return "bad_row", f"the {role} (data.{role}_column={column!r}) {problem}", rec.raw
        values[role] = value
    text, raw_label, slice_value = values["text"], values["label"], values.get("slice")
    if any(v is not None and _SURROGATE.search(v) for v in values.values()):
        return (
            "undecodable",
            "holds bytes that are not valid UTF-8 (shown as \ufffd); re-save the file as UTF-8",
            rec.raw,
        )
    if text is None or not text.strip():
        return "missing_text", f"the text (data.text_column={data.text_column!r}) is empty", rec.raw
    if raw_label is None or not raw_label.strip():
        return "missing_label", f"the label (data.label_column={data.label_column!r}) is empty", text
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
            return "duplicate", f"same text and label as line {earlier[0]}", text
        if earlier is not None:
            return (
                "conflicting_label",
                f"line {earlier[0]} has the same text with label {earlier[1]!r}, this row says {label!r}",
                text,
            )
        label_id, target_ids = label_ids[label], list[int]()
    else:
        # Generation keeps several targets for one input (references, paraphrases); only exact
        # repeats of input and target are duplicates.
        label = raw_label
        earlier_line = seen_pairs.get((key, _normalize(label)))
        if earlier_line is not None:
            return "duplicate", f"same text and target as line {earlier_line}", text
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
    return _Row(rec.line, text, label, label_id, slice_value, key, input_ids, target_ids)


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
    return None, f"is a {_kind(value)} ({_clip(repr(value), 40)}), not a string"


def _kind(value: Any) -> str:
    return {
        str: "string",
        dict: "object",
        list: "array",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def _normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _shown(text: str) -> str:
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _clip(text, _SHOWN_CHARS)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _reject_leakage(checked: dict[str, _Checked]) -> None:
    """Drop train rows also in eval/test and eval rows also in test: evaluation data stays intact."""
    for split, against in (("eval", ("test",)), ("train", ("eval", "test"))):
        if split not in checked:
            continue
        index: dict[str, tuple[str, str, int]] = {}
        for other in against:
            if other in checked:
                for row in checked[other].kept:
                    index.setdefault(row.key, (other, checked[other].uri, row.line))
        if not index:
            continue
        c = checked[split]
        kept: list[_Row] = []
        for row in c.kept:
            hit = index.get(row.key)
            if hit is None:
                kept.append(row)
                continue
            detail = (
                f"the same text is in the {hit[0]} file ({hit[1]} line {hit[2]}); kept there, dropped here"
            )
            c.rejects.append(_Reject(c.uri, row.line, "leakage", detail, _shown(row.text)))
        c.kept = kept
        c.rejects.sort(key=lambda r: r.line)


def _file_problems(c: _Checked, data: DataConfig, rejects_path: Path) -> list[str]:
    share = len(c.rejects) / c.rows_read
    if c.kept and share <= data.max_reject_fraction:
        return []
    by_reason: dict[str, list[_Reject]] = {}
    for r in c.rejects:
        by_reason.setdefault(r.reason, []).append(r)
    top = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), REJECT_REASONS.index(kv[0])))[:3]
    reasons = "; ".join(f"{reason} {len(rs)} (e.g. line {rs[0].line}: {rs[0].detail})" for reason, rs in top)
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


def _write_rejects(path: Path, checked: dict[str, _Checked]) -> None:
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


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the input data:\n" + "\n".join(f"  - {p}" for p in problems)


# --------------------------------------------------------------------------------------------------
# Splitting and writing


def _make_splits(
    checked: dict[str, _Checked], cfg: JobConfig
) -> tuple[dict[str, list[_Row]], dict[str, Any]]:
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


def _strata(rows: list[_Row], by_label: bool) -> dict[str, list[int]]:
    strata: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        strata.setdefault(row.label if by_label else "", []).append(i)
    return strata


def _hold_out(rows: list[_Row], fraction: float, seed: int, by_label: bool) -> tuple[list[_Row], list[_Row]]:
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


def _sample(rows: list[_Row], limit: int, seed: str, by_label: bool) -> list[_Row]:
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


def _to_split(rows: list[_Row]) -> Split:
    return Split(
        input_ids=[r.input_ids for r in rows],
        label_ids=[r.label_id for r in rows],
        texts=[r.text for r in rows],
        labels=[r.label for r in rows],
        target_ids=[r.target_ids for r in rows],
        slices=[r.slice for r in rows],
        rows=[r.line for r in rows],
    )


def _fingerprint(splits: dict[str, list[_Row]], cfg: JobConfig) -> str:
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


def _length_stats(rows: list[_Row]) -> dict[str, float]:
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
