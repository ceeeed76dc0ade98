"""Ingest's result: what it prepared, the contract between ingest and the stages after it.

`run` returns an `IngestResult` and writes it into the prepared dataset folder as
`ingest_result.json` (`RESULT_FILE`), last, so the file's presence means the folder is complete.
`IngestResult.read(folder)` reads it back, equal to what `run` returned; in a folder that an earlier
release prepared it reads the same contents from `dataset_manifest.json` (`LEGACY_RESULT_FILE`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from softprompt.dataset import RESULT_FILE, result_path
from softprompt.errors import DataError

REJECTS_FILE = "rejects.jsonl"
FORMAT_VERSION = 1
"""`format_version` of the result file; a reader refuses other versions."""
_NOT_IN_FILE = ("output_dir", "result_path")  # where the file lies, not what it says


@dataclass(frozen=True)
class SourceSummary:
    """One input file as ingest read it."""

    split: str
    """`train`, `eval` or `test`: the option `data.<split>` that named it."""
    uri: str
    """The local path or `s3://` URI it was read from."""
    sha256: str
    """SHA-256 (hex) of its bytes."""
    rows_read: int
    rows_kept: int
    rows_rejected: int


@dataclass(frozen=True)
class IngestResult:
    """What ingest prepared: the contract between ingest and the stages after it.

    The result file holds every field but the two paths, in this order, after `format_version`.
    """

    output_dir: Path
    """Folder holding train/eval(/test).parquet, rejects.jsonl and the result file."""
    result_path: Path
    """The result file: `ingest_result.json` in `output_dir` (`dataset_manifest.json` when read from a
    folder that an earlier release prepared)."""
    fingerprint: str
    """SHA-256 (hex) over every prepared row of every split plus the task's kind, template and labels."""
    task: dict[str, Any]
    """The task the rows were prepared for: name, kind, template, labels."""
    sources: list[SourceSummary]
    """The input files, train first."""
    counts: dict[str, int]
    """Split -> rows written."""
    label_counts: dict[str, dict[str, int]]
    """Split -> label -> rows (in `task.labels` order; empty for generation tasks)."""
    rejects_by_reason: dict[str, int]
    """Reason -> rejected rows (reasons with at least one row)."""
    token_lengths: dict[str, dict[str, float]]
    """Split -> tokens per row (input plus target): min, mean, p50, p95 and max."""
    tokenizer: dict[str, Any]
    """The tokenizer the rows were encoded with: name_or_path, vocab_size."""
    created_at: str
    """When ingest wrote the folder (UTC, ISO 8601, to the second)."""
    split: dict[str, Any]
    """Where eval came from: eval_from (`file` or `train`), eval_fraction and split_seed."""
    sampling: dict[str, dict[str, Any]]
    """Split -> rows_before, rows_after and option, for each split capped by `data.max_<split>_rows`."""
    warnings: list[str] = field(default_factory=list)
    """Things worth a look that did not stop the run (labels missing from a split, ...)."""

    @property
    def rejected(self) -> int:
        """Rows rejected over all files."""
        return sum(self.rejects_by_reason.values())

    @property
    def rejects_file(self) -> Path | None:
        """`rejects.jsonl`, or None when no row was rejected (an empty file is still written)."""
        return self.output_dir / REJECTS_FILE if self.rejected else None

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

    def write(self) -> Path:
        """Write `ingest_result.json` into `output_dir` in one step (a temporary file, then a rename).

        Returns:
            Its path.
        """
        body = {"format_version": FORMAT_VERSION, **asdict(self)}
        for name in _NOT_IN_FILE:
            del body[name]
        path = self.output_dir / RESULT_FILE
        tmp = path.with_name(f".{RESULT_FILE}.tmp")
        tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> IngestResult:
        """The result ingest wrote into `folder`, a prepared dataset: its `ingest_result.json`, or the
        `dataset_manifest.json` of a folder that an earlier release prepared.

        Raises:
            DataError: when `folder` holds no result file (says to run ingest), or one that is not
                readable as an ingest result of this version.
        """
        root = Path(folder)
        path = result_path(root)
        fix = "run `softprompt ingest` again to rewrite it"
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}; {fix}") from exc
        if not isinstance(body, dict) or body.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} is not an ingest result of format_version {FORMAT_VERSION}; {fix}")
        try:
            values = {f.name: body[f.name] for f in fields(cls) if f.name not in _NOT_IN_FILE}
            values["sources"] = [SourceSummary(**s) for s in values["sources"]]
            return cls(output_dir=root, result_path=path, **values)
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path} lacks a field of an ingest result or has one of another shape ({exc}); {fix}") from exc
