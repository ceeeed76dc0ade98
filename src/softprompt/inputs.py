"""The rows a person hands `softprompt predict` or `softprompt feedback import`: JSONL, CSV, TSV,
Parquet or plain text, each record with where it is in the file as people count (`line 3`, `row 3`).

    rows = read_inputs("reviews.jsonl", text_column="text", prompt_column="task")   # [(prompt, text), ...]
    records = read_table("corrections.csv")                                          # [("row 1", {...}), ...]

Nothing is skipped silently: a file that cannot be read, a line that is not JSON, a row without its
text is a DataError naming the file, the line or row and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from softprompt.errors import DataError


def read_inputs(path: str | Path, text_column: str = "text", prompt_column: str | None = None, default_prompt: str = "") -> list[tuple[str, str]]:
    """Read `(prompt, text)` rows from JSONL, CSV, TSV, Parquet, or plain text (one input per line).

    Raises:
        DataError: naming the file and the line or row: unreadable or non-UTF-8 bytes, a JSONL line
            that is not a JSON object, a row without the text field or with an empty text.
    """
    p = Path(path)
    rows = []
    for where, rec in read_table(p, text_column):
        if not isinstance(rec, dict):
            raise DataError(f"{p} {where} is a JSON {type(rec).__name__}, not an object; write one object per line, e.g. {{\"{text_column}\": \"...\"}}")
        if text_column not in rec:
            raise DataError(f"{p} {where} has no {text_column!r} field (fields: {sorted(rec)}); pass --text-column")
        text = rec[text_column]
        if text is None or isinstance(text, (dict, list)) or not str(text).strip():
            raise DataError(f"{p} {where} has an empty or non-text {text_column!r} value ({text!r}); give every row a text")
        name = str(rec.get(prompt_column) or "") if prompt_column else default_prompt
        rows.append((name or default_prompt, str(text)))
    return rows


def read_table(path: str | Path, text_column: str = "text") -> list[tuple[str, Any]]:
    """The records of a JSONL, CSV, TSV or Parquet file (plain text: one `{text_column: line}` a
    line), each with where it is as people count (`line 3`, `row 3`).

    Raises:
        DataError: naming the file and line: missing, unreadable, not UTF-8, a line that is not JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file {p} does not exist")
    suffix = p.suffix.lower()
    records: list[tuple[str, Any]] = []  # (where, record): "line 3" or "row 3", as people count them
    if suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{p} is not a readable Parquet file: {exc}") from exc
        records = [(f"row {n}", rec) for n, rec in enumerate(table.to_pylist(), 1)]
    else:
        raw = p.read_bytes()
        try:
            content = raw.decode("utf-8-sig")  # like ingest, accept a UTF-8 byte-order mark
        except UnicodeDecodeError as exc:
            bad = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"{p} line {bad} is not valid UTF-8 ({exc.reason}); save the file as UTF-8") from exc
        if suffix in (".jsonl", ".ndjson", ".json"):
            for n, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        records.append((f"line {n}", json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{p} line {n} is not valid JSON: {exc.msg}; write one JSON object per line") from exc
        elif suffix in (".csv", ".tsv"):
            import csv
            import io

            reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
            records = [(f"row {n}", rec) for n, rec in enumerate(reader, 1)]
        else:
            records = [(f"line {n}", {text_column: line}) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    return records

