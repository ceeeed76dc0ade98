"""Ingest: read the raw example files, check every row, and write the prepared dataset.

`run` reads `data.train` (and `data.eval`, `data.test` when given) from local paths or `s3://`
URIs, as CSV, TSV, JSON Lines or Parquet; maps raw labels to `task.labels`; rejects bad rows with a
reason and the line they came from (every one listed in `rejects.jsonl`); holds out a stratified
eval split when there is no eval file; and writes the folder that `softprompt.dataset` describes.
Files that cannot be used stop the run with one `DataError` that names everything wrong at once.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from softprompt.config import DataConfig, JobConfig, S3Config
from softprompt.dataset import SPLITS, write_split
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
from softprompt.ingest.splits import content_fingerprint, length_stats, make_splits, to_split
from softprompt.modeling import load_tokenizer

MANIFEST_FILE = "dataset_manifest.json"
REJECTS_FILE = "rejects.jsonl"


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

    rejects = [r for c in checked.values() for r in c.rejects]
    reason_counts = Counter(r.reason for r in rejects)
    by_reason = {reason: reason_counts[reason] for reason in REJECT_REASONS if reason_counts[reason]}
    fingerprint = content_fingerprint(splits, cfg)
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
        "token_lengths": {s: length_stats(rows) for s, rows in splits.items()},
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
