"""The prediction log: every served or batch prediction, appended to the registry's store under its task.

    plog = PredictionLog(store, task="support-intent")
    pid = plog.record(prompt_version="0123456789abcdef", text="...", label="refund", scores={...}, model="smollm2-135m")
    plog.close()

    read_records(store, "support-intent", since=...)        # what the feedback loop reads
    expire(store, "support-intent", retention_days=30)      # whole partitions older than that go
    delete(store, "support-intent", ["0190f3c2a1b4e3d2c1b0a9f8"])   # records by id (an erasure request)

Layout: `<task>/_predictions/date=YYYY-MM-DD/hour=HH/<first id>.jsonl`, one JSON object per line:
`{"id", "time", "task", "model", "prompt_version", "input", "label", "scores"}`. Partitions are UTC
hours: what a reader scans and what retention deletes whole. `_predictions` can never be a base
model's key segment (those start with a letter or digit), so a serving key can be allowed to write
there and nowhere else (infra/minio/policies/serve.json), never a champion pointer.

An id is 24 hex digits: the record's time in milliseconds (12), a sequence within the millisecond
(4) and 32 random bits, so ids sort by time and name their partition, which is how `delete` finds
a record without an index.

Writing never blocks or fails the caller: `record` puts the record on a bounded queue and returns
its id at once; a writer thread flushes every `flush_seconds` or `flush_rows` records, one object
per partition per flush. A full queue drops the record; a failing store keeps the batch for the
next flush, holding at most `max_queue` records in all (the oldest are dropped first). Drops are
counted (`stats`, the `on_count` hook a server feeds its metrics from) and logged, at most once a
minute.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from softprompt.errors import ConfigError
from softprompt.registry.store import ArtifactStore

log = logging.getLogger(__name__)

PREFIX = "_predictions"
"""The log's key segment under a task."""
_ID_RE = re.compile(r"^[0-9a-f]{24}$")
_PARTITION_RE = re.compile(r"/date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")

Redact = Callable[[str], "str | None"]
"""Turns an input into what the log keeps (None keeps nothing)."""


_last = [0, 0]  # (ms, sequence) of this process's latest id
_id_lock = threading.Lock()


def new_id(now: float | None = None) -> str:
    """A prediction id: the time in milliseconds (12 hex digits), a sequence within the
    millisecond (4) so that one process's ids sort in the order they were made, and 32 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        seq = _last[1] + 1 if ms == _last[0] else 0
        _last[:] = [ms, seq]
    return f"{ms:012x}{seq & 0xFFFF:04x}{secrets.token_hex(4)}"


def id_time(pid: str) -> dt.datetime:
    """The UTC time an id was made.

    Raises:
        ConfigError: `pid` is not an id this log makes (names it and the expected form).
    """
    if not _ID_RE.match(pid):
        raise ConfigError(f"prediction id {pid!r} is not 24 lowercase hex digits (the `id` a prediction response returns)")
    return dt.datetime.fromtimestamp(int(pid[:12], 16) / 1000, tz=dt.timezone.utc)


def partition(task: str, when: dt.datetime) -> str:
    """The key prefix holding a task's records of one UTC hour."""
    when = when.astimezone(dt.timezone.utc)
    return f"{task}/{PREFIX}/date={when:%Y-%m-%d}/hour={when:%H}/"


class PredictionLog:
    """A task's prediction log writer: `record` queues, a background thread writes in batches."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        task: str,
        log_inputs: bool = True,
        redact: Redact | None = None,
        max_queue: int = 10_000,
        flush_rows: int = 500,
        flush_seconds: float = 2.0,
        on_count: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_queue < 1 or flush_rows < 1 or flush_seconds <= 0:
            raise ConfigError(
                f"prediction log max_queue={max_queue}, flush_rows={flush_rows}, flush_seconds={flush_seconds}: "
                "use max_queue >= 1, flush_rows >= 1 and flush_seconds > 0"
            )
        self.store, self.task = store, task
        self.log_inputs, self.redact = log_inputs, redact
        self.max_queue, self.flush_rows, self.flush_seconds = max_queue, flush_rows, flush_seconds
        self.on_count = on_count
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max_queue)
        self._pending: list[dict[str, Any]] = []  # taken off the queue, not yet written (the writer's only)
        self._counts = {"written": 0, "dropped": 0, "failed_flushes": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._run, name=f"prediction-log-{task}", daemon=True)
        self._thread.start()

    def record(self, *, prompt_version: str, text: str, label: str | None, scores: dict[str, float] | None, model: str) -> str:
        """Queue one prediction; returns its id at once (even when the record must be dropped)."""
        pid = new_id()
        kept = (self.redact(text) if self.redact else text) if self.log_inputs else None
        rec = {
            "id": pid, "time": id_time(pid).isoformat(timespec="milliseconds"), "task": self.task, "model": model,
            "prompt_version": prompt_version, "input": kept, "label": label, "scores": scores,
        }
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            self._count("dropped", 1)
        return pid

    def stats(self) -> dict[str, int]:
        """Records queued (waiting or being retried), written, dropped, and flushes that failed."""
        with self._lock:
            return {"queued": self._queue.qsize() + len(self._pending), **self._counts}

    def close(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Stop the writer after a last flush (bounded by `timeout_s`); returns `stats`."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.stats()

    def _count(self, name: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._counts[name] += n
        if self.on_count is not None:
            self.on_count(name, n)
        if name == "dropped" and time.monotonic() - self._last_warning > 60:
            self._last_warning = time.monotonic()
            log.warning("prediction log of %s dropped %d records so far (queue full or store failing)", self.task, self._counts["dropped"])

    def _run(self) -> None:
        deadline = time.monotonic() + self.flush_seconds
        while True:
            stopping = self._stop.is_set()
            try:
                timeout = max(0.0, deadline - time.monotonic())
                self._pending.append(self._queue.get(timeout=min(timeout, 0.2)))
            except queue.Empty:
                pass
            self._drain()
            if stopping or len(self._pending) >= self.flush_rows or time.monotonic() >= deadline:
                self._flush()
                deadline = time.monotonic() + self.flush_seconds
                if stopping:
                    return

    def _drain(self) -> None:
        while len(self._pending) < self.max_queue:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _flush(self) -> None:
        if not self._pending:
            return
        groups: dict[str, list[dict[str, Any]]] = {}
        for rec in self._pending:
            groups.setdefault(partition(self.task, id_time(rec["id"])), []).append(rec)
        left: list[dict[str, Any]] = []
        for prefix, recs in groups.items():
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
            try:
                self.store.put_bytes(f"{prefix}{recs[0]['id']}.jsonl", body)
            except Exception as exc:  # a slow or failing store must never reach the caller
                log.warning("prediction log of %s: writing %d records failed (%s); retrying at the next flush", self.task, len(recs), exc)
                self._count("failed_flushes", 1)
                left.extend(recs)
            else:
                self._count("written", len(recs))
        overflow = len(left) + self._queue.qsize() - self.max_queue
        if overflow > 0:  # the retry buffer shares the queue's bound: the oldest go
            left = left[overflow:]
            self._count("dropped", overflow)
        self._pending = left


def record_batch(store: ArtifactStore, rows: Sequence[dict[str, Any]], *, log_inputs: bool = True,
                 timeout_s: float = 60.0) -> tuple[list[str], dict[str, int]]:
    """Log a batch job's predictions (`softprompt predict`): each row has `task`, `prompt_version`,
    `text`, `label`, `scores` and `model`. Returns the ids (in row order) and the summed `stats`:
    nothing is dropped for want of queue room, and a store that fails past `timeout_s` leaves its
    records `queued` (never written, never raised: the predictions stand without their log).
    """
    logs: dict[str, PredictionLog] = {}
    ids = []
    for row in rows:
        plog = logs.get(row["task"])
        if plog is None:
            plog = logs[row["task"]] = PredictionLog(store, task=row["task"], log_inputs=log_inputs, max_queue=max(1, len(rows)),
                                                     flush_rows=min(len(rows), 5_000))
        ids.append(plog.record(prompt_version=row["prompt_version"], text=row["text"], label=row["label"], scores=row["scores"],
                               model=row["model"]))
    stats = {"queued": 0, "written": 0, "dropped": 0, "failed_flushes": 0}
    for plog in logs.values():
        for name, n in plog.close(timeout_s=timeout_s).items():
            stats[name] += n
    return ids, stats


def read_records(
    store: ArtifactStore, task: str, *, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> Iterator[dict[str, Any]]:
    """A task's logged records, partition by partition (oldest first), `since <= time < until`."""
    for key in store.list(f"{task}/{PREFIX}/"):
        hour = _partition_hour(key)
        if hour is None or (since and hour + dt.timedelta(hours=1) <= since) or (until and hour >= until):
            continue
        for line in store.get_bytes(key).decode().splitlines():
            if not line.strip():
                continue
            rec: dict[str, Any] = json.loads(line)
            when = id_time(rec["id"])
            if (since is None or when >= since) and (until is None or when < until):
                yield rec


def expire(store: ArtifactStore, task: str, retention_days: float, *, now: dt.datetime | None = None) -> list[str]:
    """Delete a task's partitions whose whole hour is older than `retention_days`; returns the keys deleted.

    Raises:
        ConfigError: `retention_days` is not positive.
    """
    if retention_days <= 0:
        raise ConfigError(f"prediction log retention_days={retention_days}; use a number of days > 0 (e.g. 30)")
    cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=retention_days)
    gone = []
    for key in store.list(f"{task}/{PREFIX}/"):
        hour = _partition_hour(key)
        if hour is not None and hour + dt.timedelta(hours=1) <= cutoff:
            store.delete(key)
            gone.append(key)
    return gone


def delete(store: ArtifactStore, task: str, ids: Sequence[str]) -> int:
    """Remove the records with these ids (each found in the partition its id names); returns how
    many were removed. A file left empty is deleted.

    Raises:
        ConfigError: an id is malformed (nothing is deleted then).
    """
    partitions = {partition(task, id_time(pid)) for pid in ids}  # id_time refuses a malformed id first
    wanted = set(ids)
    return sum(drop_records(store, prefix, lambda rec: rec["id"] in wanted) for prefix in partitions)


def drop_records(store: ArtifactStore, prefix: str, drop: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite the JSON-lines objects under `prefix` without the records `drop` picks (an object
    left empty is deleted; untouched objects are not rewritten); returns how many records went.
    The only rewrite of these append-only logs: erasure."""
    removed = 0
    for key in store.list(prefix):
        lines = [line for line in store.get_bytes(key).decode().splitlines() if line.strip()]
        kept = [line for line in lines if not drop(json.loads(line))]
        if len(kept) == len(lines):
            continue
        removed += len(lines) - len(kept)
        if kept:
            store.put_bytes(key, ("\n".join(kept) + "\n").encode())
        else:
            store.delete(key)
    return removed


def _partition_hour(key: str) -> dt.datetime | None:
    m = _PARTITION_RE.search(key)
    if not m:
        return None
    return dt.datetime.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H").replace(tzinfo=dt.timezone.utc)
