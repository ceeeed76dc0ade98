"""Ingest: read the raw example files, check every row, and write the prepared dataset.

`run` reads `data.train` (and `data.eval`, `data.test` when given) from local paths or `s3://`
URIs, as CSV, TSV, JSON Lines or Parquet; maps raw labels to `task.labels`; rejects bad rows with a
reason and the line they came from (every one listed in `rejects.jsonl`); holds out a stratified
eval split when there is no eval file; and writes the folder that `softprompt.dataset` describes.
Files that cannot be used stop the run with one `DataError` that names everything wrong at once.

The stage in modules of one step each: `readers` (bytes -> records), `checks` (records -> kept rows
and rejects), `splits` (kept rows -> splits and their fingerprint), `result` (what ingest prepared,
written as the folder's result file) and `stage` (the run, in order).
"""

from softprompt.dataset import LEGACY_RESULT_FILE, RESULT_FILE
from softprompt.ingest.checks import REJECT_REASONS
from softprompt.ingest.readers import FORMATS_BY_EXTENSION
from softprompt.ingest.result import REJECTS_FILE, IngestResult, SourceSummary
from softprompt.ingest.stage import check_sources, run

__all__ = [
    "FORMATS_BY_EXTENSION",
    "LEGACY_RESULT_FILE",
    "REJECTS_FILE",
    "REJECT_REASONS",
    "RESULT_FILE",
    "IngestResult",
    "SourceSummary",
    "check_sources",
    "run",
]
