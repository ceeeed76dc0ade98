"""The ingest stage in order: read every configured file, check its rows, drop leakage, write the
rejects, split, write the splits and, last, the result file. `check_sources` is the first step alone.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from softprompt.config import DataConfig, JobConfig, S3Config
from softprompt.dataset import LEGACY_RESULT_FILE, RESULT_FILE, SPLITS, write_split
from softprompt.errors import DataError
from softprompt.ingest.checks import (
    REJECT_REASONS,
    check_source,
    file_problems,
    reject_leakage,
    resolve_columns,
    write_rejects,
)
from softprompt.ingest.readers import Source, read_source
from softprompt.ingest.result import REJECTS_FILE, IngestResult, SourceSummary
from softprompt.ingest.splits import content_fingerprint, length_stats, make_splits, to_split
from softprompt.modeling import load_tokenizer


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
        What was prepared: counts, rejects, warnings, the fingerprint and the input files; the same
        as the folder's result file, which `IngestResult.read` reads back.

    Raises:
        DataError: listing every unusable file (missing, unreadable, empty, a missing column, no
            usable rows, or more rejected rows than `data.max_reject_fraction` allows).
            `rejects.jsonl` is written before it is raised.
    """
    data, task = cfg.data, cfg.task
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*(f"{s}.parquet" for s in SPLITS), RESULT_FILE, LEGACY_RESULT_FILE, REJECTS_FILE):
        (out / name).unlink(missing_ok=True)

    readable, problems = _read_all(data, cfg.s3)
    # Loaded only now, so a mistyped path fails before a base model is fetched or converted.
    tok: Any = tokenizer
    if readable and tok is None:
        tok = load_tokenizer(cfg.model)
    checked = {s.split: check_source(s, columns, cfg, tok, progress) for s, columns in readable}
    reject_leakage(checked)
    rejects_path = out / REJECTS_FILE
    write_rejects(rejects_path, checked)
    for c in checked.values():
        problems.extend(file_problems(c, data, rejects_path))
    if problems:
        raise DataError(_join(problems))

    splits, sampling = make_splits(checked, cfg)
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
        write_split(out, s, to_split(rows))

    reason_counts = Counter(r.reason for c in checked.values() for r in c.rejects)
    by_reason = {reason: reason_counts[reason] for reason in REJECT_REASONS if reason_counts[reason]}
    result = IngestResult(
        output_dir=out,
        result_path=out / RESULT_FILE,
        fingerprint=content_fingerprint(splits, cfg),
        task={"name": task.name, "kind": task.kind, "template": task.template, "labels": task.labels},
        sources=[
            SourceSummary(c.split, c.uri, c.sha256, c.rows_read, len(c.kept), len(c.rejects))
            for c in checked.values()
        ],
        counts=counts,
        label_counts=label_counts,
        rejects_by_reason=by_reason,
        token_lengths={s: length_stats(rows) for s, rows in splits.items()},
        tokenizer={"name_or_path": str(getattr(tok, "name_or_path", "")), "vocab_size": len(tok)},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        split={
            "eval_from": "file" if "eval" in checked else "train",
            "eval_fraction": data.eval_fraction,
            "split_seed": data.split_seed,
        },
        sampling=sampling,
        warnings=warnings,
    )
    result.write()  # the result file appears last: its presence means the folder is complete
    return result


def check_sources(cfg: JobConfig) -> list[str]:
    """Pre-flight check of the configured input files, for `softprompt validate`.

    Each file must exist, be readable and parseable in its format, hold data rows and have the
    configured columns. Rows are not checked, no tokenizer is loaded and nothing is written.

    Returns:
        Every problem found, each naming the file and the fix; empty when ingest can start.
    """
    return _read_all(cfg.data, cfg.s3)[1]


def _read_all(data: DataConfig, s3: S3Config) -> tuple[list[tuple[Source, dict[str, str | int]]], list[str]]:
    """The readable sources with their resolved columns, and the problems of the others."""
    problems: list[str] = []
    readable: list[tuple[Source, dict[str, str | int]]] = []
    for split, uri in (("train", data.train), ("eval", data.eval), ("test", data.test)):
        if not uri:
            continue
        try:
            source = read_source(split, uri, data, s3)
        except DataError as exc:
            problems.append(str(exc))
            continue
        columns, column_problems = resolve_columns(source, data)
        problems.extend(column_problems)
        if not column_problems:
            readable.append((source, columns))
    return readable, problems


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the input data:\n" + "\n".join(f"  - {p}" for p in problems)
