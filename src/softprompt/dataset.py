"""The prepared dataset that ingest writes and every later stage reads.

A prepared dataset is a folder: `train.parquet`, `eval.parquet`, optionally `test.parquet`, and
ingest's result file `ingest_result.json` (`softprompt.ingest.IngestResult`; a folder prepared by
an earlier release has it as `dataset_manifest.json`, which still reads). Each Parquet file has the
columns of `SPLIT_SCHEMA`. Local folders only here; the Ray layer reads the same files from `s3://`
with Ray Data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from softprompt.errors import DataError

SPLITS = ("train", "eval", "test")

RESULT_FILE = "ingest_result.json"
"""Ingest's result file in a prepared dataset (`softprompt.ingest.IngestResult`)."""
LEGACY_RESULT_FILE = "dataset_manifest.json"
"""The result file's name in folders prepared by earlier releases; read when there is no `RESULT_FILE`."""

SPLIT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),  # 1-based line/row number in the source file
        pa.field("text", pa.string()),
        pa.field("label", pa.string()),  # label name (classification) or target text (generation)
        pa.field("label_id", pa.int32()),  # index into task.labels; -1 for generation
        pa.field("slice", pa.string()),  # group attribute or null
        pa.field("input_ids", pa.list_(pa.int32())),  # encoded template(text)
        pa.field("target_ids", pa.list_(pa.int32())),  # generation target + EOS; empty otherwise
        pa.field("length", pa.int32()),  # len(input_ids) + len(target_ids)
    ]
)


@dataclass
class Split:
    """One split in memory (columns as Python lists)."""

    input_ids: list[list[int]]
    label_ids: list[int]
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    target_ids: list[list[int]] = field(default_factory=list)
    slices: list[str | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if not self.texts:
            self.texts = [""] * n
        if not self.labels:
            self.labels = [""] * n
        if not self.target_ids:
            self.target_ids = [[] for _ in range(n)]
        if not self.slices:
            self.slices = [None] * n
        if not self.rows:
            self.rows = list(range(1, n + 1))
        for name in ("label_ids", "texts", "labels", "target_ids", "slices", "rows"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Split.{name} has {len(getattr(self, name))} items, input_ids has {n}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (input plus target)."""
        return [len(a) + len(b) for a, b in zip(self.input_ids, self.target_ids, strict=True)]

    def subset(self, indices: list[int]) -> Split:
        """The rows at `indices`, in that order."""
        return Split(
            input_ids=[self.input_ids[i] for i in indices],
            label_ids=[self.label_ids[i] for i in indices],
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            target_ids=[self.target_ids[i] for i in indices],
            slices=[self.slices[i] for i in indices],
            rows=[self.rows[i] for i in indices],
        )

    def sample(self, limit: int | None, seed: int) -> Split:
        """At most `limit` rows drawn with `seed`, kept in file order (all rows when `limit` is None or not smaller).

        Used for the periodic evaluation subset. The seed must not vary between trials of one sweep
        (pass `data.split_seed`, never `train.seed`): ASHA's rung comparisons and the choice of the
        best trial are only fair when every trial is scored on the same rows.
        """
        if limit is None or len(self) <= limit:
            return self
        return self.subset(sorted(random.Random(seed).sample(range(len(self)), limit)))

    def to_table(self) -> pa.Table:
        """As an Arrow table with `SPLIT_SCHEMA`."""
        return pa.table(
            {
                "row": self.rows,
                "text": self.texts,
                "label": self.labels,
                "label_id": self.label_ids,
                "slice": self.slices,
                "input_ids": self.input_ids,
                "target_ids": self.target_ids,
                "length": self.lengths,
            },
            schema=SPLIT_SCHEMA,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> Split:
        """From an Arrow table with (at least) the columns of `SPLIT_SCHEMA`."""
        missing = [f.name for f in SPLIT_SCHEMA if f.name not in table.column_names]
        if missing:
            raise DataError(f"prepared split lacks columns {missing}; re-run `softprompt ingest`")
        cols = table.to_pydict()
        return cls(
            input_ids=cols["input_ids"],
            label_ids=cols["label_id"],
            texts=cols["text"],
            labels=cols["label"],
            target_ids=cols["target_ids"],
            slices=cols["slice"],
            rows=cols["row"],
        )


def read_split(data_dir: str | Path, split: str) -> Split:
    """Read one split of a prepared dataset folder.

    Raises:
        DataError: when the folder or split file is missing (says to run ingest).
    """
    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `softprompt ingest` first or check the data folder")
    return Split.from_table(pq.read_table(path))


def has_split(data_dir: str | Path, split: str) -> bool:
    """Whether the prepared dataset has this split."""
    return (Path(data_dir) / f"{split}.parquet").is_file()


def write_split(data_dir: str | Path, split: str, data: Split) -> Path:
    """Write one split as Parquet."""
    path = Path(data_dir) / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data.to_table(), path)
    return path


def result_path(data_dir: str | Path) -> Path:
    """Ingest's result file in a prepared dataset: `ingest_result.json`, or `dataset_manifest.json`
    in a folder that an earlier release prepared.

    Raises:
        DataError: when the folder holds neither (says to run ingest).
    """
    folder = Path(data_dir)
    for name in (RESULT_FILE, LEGACY_RESULT_FILE):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / RESULT_FILE} does not exist; run `softprompt ingest` first")


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Ingest's result file of a prepared dataset (see `result_path`), as written.

    `softprompt.ingest.IngestResult.read` reads the same file as a typed result.
    """
    result: dict[str, Any] = json.loads(result_path(data_dir).read_text(encoding="utf-8"))
    return result
