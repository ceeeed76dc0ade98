"""Reading: one input file's bytes -> records, one per data row, with the line it starts on.

Files come from local paths or `s3://` URIs (through `softprompt.uris`) as CSV, TSV, JSON Lines or
Parquet. Rows are not checked here, only parsed: a row that cannot be parsed becomes a record with a
problem, so the checks can reject it with its line number. A file that cannot be used at all (missing,
empty, the wrong encoding or format) raises a `DataError` that names it and the fix.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.config import DataConfig, S3Config
from softprompt.errors import DataError, StoreError
from softprompt.uris import is_s3, local_path, read_bytes

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


@dataclass
class Record:
    """One data row as parsed, before any check."""

    line: int
    """The line (CSV/TSV/JSONL) or 1-based row (Parquet) it starts on."""
    values: list[Any] | dict[str, Any] | None
    """Fields by position, values by key (JSON objects), or None: the row could not be parsed."""
    raw: str
    """The row's text as it stands in the file (empty for Parquet)."""
    problem: str | None = None
    """Why it could not be parsed (when `values` is None)."""


@dataclass
class Source:
    """One input file, read and parsed."""

    split: str
    uri: str
    fmt: str
    sha256: str
    records: list[Record]
    names: list[str] | None
    """Column names from a header row or the Parquet schema."""
    keyed: bool
    """Rows are JSON objects (values by key) rather than lists of fields."""
    header_guessed: bool
    """`data.header` was null and we decided."""

    @property
    def where(self) -> str:
        """The file as error messages name it."""
        return f"data.{self.split} file {self.uri}"

    @property
    def unit(self) -> str:
        """What a record's number counts, as messages say it: `row` (Parquet) or `line`."""
        return "row" if self.fmt == "parquet" else "line"


def read_source(split: str, uri: str, data: DataConfig, s3: S3Config) -> Source:
    """Load and parse the input file of one split.

    Args:
        split: `train`, `eval` or `test`; messages name the option `data.<split>`.
        uri: A local path or an `s3://` URI.
        data: The format, header and column settings.
        s3: Where `s3://` URIs are read from.

    Returns:
        The parsed file, with the SHA-256 of its bytes.

    Raises:
        DataError: the file is missing, unreadable, empty, UTF-16, of another format than named,
            or has no data rows.
    """
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
    return Source(split, uri, fmt, sha, records, names, keyed, guessed)


def is_index(spec: str | int) -> bool:
    """Whether a `data.*_column` setting is a 0-based field index rather than a column name."""
    # YAML `text_column: 1` reaches us as "1" (the config keeps str before int), so digits count.
    return isinstance(spec, int) or spec.strip().isdigit()


def kind_of(value: Any) -> str:
    """A parsed value's type as JSON names it (`string`, `object`, `number`, ...), for messages."""
    return {
        str: "string",
        dict: "object",
        list: "array",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def _load(split: str, uri: str, s3: S3Config) -> bytes:
    if is_s3(uri):
        if not uri[len("s3://") :].strip("/").count("/"):
            raise DataError(f"data.{split}={uri!r} does not name a file; write it as s3://BUCKET/path/file.csv")
        try:
            return read_bytes(uri, endpoint=s3.endpoint, region=s3.region)
        except StoreError as exc:
            raise DataError(f"cannot read data.{split}={uri}: {exc}; check data.{split} and s3.endpoint") from exc
    _check_local_file(split, uri)
    try:
        return read_bytes(uri)
    except StoreError as exc:
        raise DataError(f"data.{split} file {exc} (relative paths start at {Path.cwd()}); check data.{split}") from exc


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _check_local_file(split: str, uri: str) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO waits for a writer
    forever, and a symlink loop is not a missing file (though `Path.exists` says False for one)."""
    path = local_path(uri)
    where = f"data.{split} file {uri}"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(
                f"{where} is a symlink to {os.readlink(path)}, which does not exist; point data.{split} "
                "at the real file or fix the link"
            ) from None
        return  # read_bytes says it does not exist, with the working folder
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(
                f"{where} is a symlink loop (ELOOP: {path} or a folder on its way links back to itself); "
                f"point data.{split} at the real file (`readlink -f` shows where the links lead)"
            ) from None
        raise DataError(f"cannot read {where}: {exc.strerror or exc}; check data.{split}") from exc
    if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):  # read_bytes names a folder as such
        return
    kind = next((name for test, name in _NOT_REGULAR if test(info.st_mode)), "a special file")
    raise DataError(
        f"{where} is {kind}, not a regular file, and reading it could wait forever; save the data to a "
        f"file and point data.{split} at it"
    )


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
    return any(spec is not None and not is_index(spec) for spec in specs)


def _parse_delimited(text: str, delimiter: str, header: bool) -> tuple[list[str] | None, list[Record]]:
    # TSV has no quoting by convention (IANA); a stray quote in a review must not swallow lines.
    lines = io.StringIO(text, newline="").readlines()
    if delimiter == ",":
        reader = csv.reader(iter(lines), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
    else:
        reader = csv.reader(iter(lines), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    names: list[str] | None = None
    records: list[Record] = []
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
                Record(start, None, _lines(lines, start, done), f"is an unreadable record: {exc}")
            )
            continue
        done = reader.line_num
        if not fields:  # a blank line holds no row
            continue
        if header and names is None:
            names = [f.strip() for f in fields]
            continue
        records.append(Record(start, fields, _lines(lines, start, done)))
    return names, records


def _lines(lines: list[str], start: int, end: int) -> str:
    return "".join(lines[start - 1 : end]).rstrip("\r\n")


def _parse_jsonl(text: str, where: str) -> tuple[bool, list[Record]]:
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
    records: list[Record] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(
                Record(number, None, line, f"is not valid JSON ({exc.msg} at column {exc.colno})")
            )
            continue
        if not isinstance(value, (dict, list)):
            records.append(
                Record(number, None, line, f"holds a JSON {kind_of(value)}, not an object or array")
            )
            continue
        records.append(Record(number, value, line))
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


def _parse_parquet(raw: bytes, where: str) -> tuple[list[str], list[Record]]:
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
        Record(i, list(v), "") for i, v in enumerate(zip(*columns, strict=True), start=1)
    ]
