"""The prediction log on a local folder and on a real S3 endpoint (moto's server on loopback): batched
writes that never block the caller, a slow and a failing store, retention, deletion by id."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from softprompt import predlog
from softprompt.errors import ConfigError
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import ArtifactStore, LocalStore

SCORES = {"refund": -0.1, "billing": -2.5}


def _record(plog: predlog.PredictionLog, i: int) -> str:
    return plog.record(prompt_version="0123456789abcdef", text=f"where is my refund {i}", label="refund", scores=SCORES, model="tiny")


class _Flaky:
    """A store whose writes are slow (`delay`) or fail (the first `failures` calls, or every call)."""

    def __init__(self, inner: ArtifactStore, *, delay: float = 0.0, failures: int = 0) -> None:
        self.inner, self.delay, self.failures, self.calls = inner, delay, failures, 0

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> str:
        self.calls += 1
        time.sleep(self.delay)
        if self.calls <= self.failures:
            raise ConnectionError("store down")
        return self.inner.put_bytes(key, data, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_records_are_written_in_batches_under_their_hour(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    plog = predlog.PredictionLog(store, task="support", flush_rows=10, flush_seconds=60)
    ids = [_record(plog, i) for i in range(25)]
    stats = plog.close()
    assert stats == {"queued": 0, "written": 25, "dropped": 0, "failed_flushes": 0}
    assert len(set(ids)) == 25 and ids == sorted(ids)  # unique, and they sort by time
    records = list(predlog.read_records(store, "support"))
    assert [r["id"] for r in records] == ids
    first = records[0]
    assert first["input"] == "where is my refund 0" and first["label"] == "refund" and first["scores"] == SCORES
    assert first["task"] == "support" and first["model"] == "tiny" and first["prompt_version"] == "0123456789abcdef"
    keys = store.list("support/_predictions/")
    assert all(k.startswith(predlog.partition("support", predlog.id_time(ids[0]))[:-3]) for k in keys)  # one date
    assert 1 <= len(keys) < 25  # batched: a flush writes one object per hour


def test_inputs_can_be_left_out_or_redacted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for task, kw, expected in [("a", {"log_inputs": False}, None), ("b", {"redact": lambda t: t.replace("refund", "[X]")}, "where is my [X] 0")]:
        plog = predlog.PredictionLog(store, task=task, **kw)
        _record(plog, 0)
        plog.close()
        (rec,) = predlog.read_records(store, task)
        assert rec["input"] == expected


def test_a_slow_store_never_blocks_the_caller_and_drops_are_counted(tmp_path: Path) -> None:
    counted: dict[str, int] = {}
    lock = threading.Lock()

    def on_count(name: str, n: int) -> None:
        with lock:
            counted[name] = counted.get(name, 0) + n

    plog = predlog.PredictionLog(_Flaky(LocalStore(tmp_path), delay=1.0), task="t", max_queue=100, flush_rows=50, on_count=on_count)
    start = time.perf_counter()
    for i in range(1000):
        _record(plog, i)
    assert time.perf_counter() - start < 0.5  # 1000 records while every write takes a second
    stats = plog.close(timeout_s=10)
    assert stats["dropped"] >= 800 and stats["written"] + stats["dropped"] == 1000
    assert counted == {k: stats[k] for k in ("written", "dropped") if stats[k]}


def test_a_failing_store_is_retried_and_a_down_store_holds_at_most_the_bound(tmp_path: Path) -> None:
    flaky = _Flaky(LocalStore(tmp_path / "a"), failures=2)
    plog = predlog.PredictionLog(flaky, task="t", flush_seconds=0.1)
    ids = [_record(plog, i) for i in range(30)]
    time.sleep(1.0)
    stats = plog.close()
    assert stats["failed_flushes"] == 2 and stats["written"] == 30 and stats["dropped"] == 0
    assert sorted(r["id"] for r in predlog.read_records(flaky.inner, "t")) == ids

    down = _Flaky(LocalStore(tmp_path / "b"), failures=10**9)
    plog = predlog.PredictionLog(down, task="t", max_queue=20, flush_seconds=0.1)
    for i in range(50):
        _record(plog, i)
        time.sleep(0.005)
    time.sleep(0.5)
    stats = plog.close()
    assert stats["written"] == 0 and stats["queued"] <= 20 and stats["dropped"] >= 30
    assert stats["queued"] + stats["dropped"] == 50  # nothing lost without being counted


def test_retention_and_deletion_by_id_on_s3(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "registry", endpoint_url=s3_endpoint)
    now = dt.datetime.now(dt.timezone.utc)
    old_ids = [predlog.new_id((now - dt.timedelta(days=40)).timestamp()) for _ in range(3)]
    old_key = predlog.partition("support", now - dt.timedelta(days=40)) + f"{old_ids[0]}.jsonl"
    store.put_bytes(old_key, "".join(json.dumps({"id": i}) + "\n" for i in old_ids).encode())
    plog = predlog.PredictionLog(store, task="support", flush_rows=3)
    fresh = [_record(plog, i) for i in range(6)]
    assert plog.close()["written"] == 6

    assert predlog.expire(store, "support", retention_days=30) == [old_key]
    assert [r["id"] for r in predlog.read_records(store, "support")] == fresh
    made = predlog.id_time(fresh[0])
    assert [r["id"] for r in predlog.read_records(store, "support", since=made)] == fresh
    assert list(predlog.read_records(store, "support", since=made + dt.timedelta(hours=1))) == []
    assert list(predlog.read_records(store, "support", until=made)) == []

    assert predlog.delete(store, "support", [fresh[1], fresh[4]]) == 2
    assert [r["id"] for r in predlog.read_records(store, "support")] == [fresh[0], fresh[2], fresh[3], fresh[5]]
    before = set(store.list("support/_predictions/"))
    assert predlog.delete(store, "support", fresh) == 4
    assert store.list("support/_predictions/") == [] and before  # emptied files are deleted
    with pytest.raises(ConfigError, match=r"prediction id 'v0003' is not 24 lowercase hex digits"):
        predlog.delete(store, "support", ["v0003"])
    with pytest.raises(ConfigError, match="retention_days=0"):
        predlog.expire(store, "support", retention_days=0)


def test_a_batch_job_logs_every_row_and_a_down_store_loses_no_prediction(tmp_path: Path) -> None:
    rows = [{"task": "intent" if i % 3 else "urgency", "prompt_version": "0123456789abcdef", "text": f"row {i}", "label": "refund",
             "scores": SCORES, "model": "tiny"} for i in range(12_000)]  # more than a server's queue bound: a batch drops none
    store = LocalStore(tmp_path / "registry")
    ids, stats = predlog.record_batch(store, rows, log_inputs=False)
    assert len(set(ids)) == len(rows) and stats == {"queued": 0, "written": len(rows), "dropped": 0, "failed_flushes": 0}
    logged = {r["id"]: r for task in ("intent", "urgency") for r in predlog.read_records(store, task)}
    assert [(logged[i]["task"], logged[i]["input"]) for i in ids[:3]] == [("urgency", None), ("intent", None), ("intent", None)]

    down = _Flaky(LocalStore(tmp_path / "down"), failures=10**9)
    ids, stats = predlog.record_batch(down, rows[:5], timeout_s=0.5)  # type: ignore[arg-type]
    assert len(ids) == 5 and stats["written"] == 0 and stats["queued"] + stats["dropped"] == 5 and stats["failed_flushes"] >= 1
