"""Ingest hardening: special files (a FIFO, a symlink loop) and Parquet messages that say "row" and
name columns, from both `ingest.run` and the validate step's `ingest.check_sources`."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softprompt.config import JobConfig, ModelConfig, config_from_dict
from softprompt.errors import DataError
from softprompt.ingest import REJECTS_FILE, check_sources, run
from softprompt.modeling import load_tokenizer
from softprompt.testing import build_tiny_model

TASK = {"name": "sent", "labels": ["negative", "positive"], "verbalizer": {"negative": [" negative"], "positive": [" positive"]}}
BINARY = {"0": "negative", "1": "positive"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tokenizer(ModelConfig(name=str(build_tiny_model(tmp_path_factory.mktemp("tiny")))))


def make_cfg(train: Path | str, **data: Any) -> JobConfig:
    return config_from_dict({"task": TASK, "data": {"train": str(train), **data}})


def both_messages(cfg: JobConfig, out: Path) -> tuple[list[str], str]:
    """What the validate step (`check_sources`) and the ingest stage (`run`) say about `cfg`."""
    problems = check_sources(cfg)
    with pytest.raises(DataError) as err:
        run(cfg, out, tokenizer=object())  # refused before any row is tokenized
    return problems, str(err.value)


@pytest.fixture
def unblock_fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO, and a watchdog that opens its write end after 10 s so a reader stuck on it (the old
    behaviour) returns and the test fails instead of hanging."""
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(10):
            with contextlib.suppress(OSError):  # no reader: nothing is stuck
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    yield fifo
    done.set()


# --------------------------------------------------------------------------------------------------
# Special files


def test_fifo_is_refused_up_front(unblock_fifo: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    problems, message = both_messages(make_cfg(unblock_fifo), tmp_path / "out")
    assert time.monotonic() - started < 10
    expected = (
        f"data.train file {unblock_fifo} is a named pipe (FIFO), not a regular file, and reading it could "
        "wait forever; save the data to a file and point data.train at it"
    )
    assert problems == [expected] and message == expected


def test_symlink_loop_is_reported_as_a_loop(tmp_path: Path) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.symlink_to(second)
    second.symlink_to(first)
    problems, message = both_messages(make_cfg(first), tmp_path / "out")
    assert problems == [message]
    assert f"data.train file {first} is a symlink loop (ELOOP" in message
    assert "point data.train at the real file" in message and "does not exist" not in message


def test_dangling_symlink_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "train.csv"
    link.symlink_to(tmp_path / "gone.csv")
    problems, message = both_messages(make_cfg(link), tmp_path / "out")
    assert problems == [message]
    assert f"data.train file {link} is a symlink to {tmp_path / 'gone.csv'}, which does not exist" in message


# --------------------------------------------------------------------------------------------------
# Parquet: rows, not lines; columns by name


def test_parquet_rejects_say_row_and_name_the_column(tmp_path: Path, tok: Any) -> None:
    train, held_out = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    texts = ["good film", "bad film", "good film", "good film", None, "in eval too"] + [f"review {i}" for i in range(20)]
    labels = [1, 0, 1, 0, 1, 1] + [i % 2 for i in range(20)]
    pq.write_table(pa.table({"label": labels, "review": texts}), train)
    pq.write_table(pa.table({"label": [0, 1, 1], "review": ["e one", "e two", "in eval too"]}), held_out)
    cfg = make_cfg(train, eval=str(held_out), text_column="review", label_map=BINARY, max_reject_fraction=0.0)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        run(cfg, out, tokenizer=tok)
    details = {r["line"]: r["detail"] for r in map(json.loads, (out / REJECTS_FILE).read_text().splitlines())}
    assert details[3] == "same text and label as row 1"
    assert details[4].startswith("row 1 has the same text with label 'positive'")
    assert details[5] == "the text in column 'review' (data.text_column) is empty"
    assert details[6].startswith(f"the same text is in the eval file ({held_out} row 3)")
    message = str(err.value)
    assert "(e.g. row 3: same text and label as row 1)" in message and "e.g. line" not in message


def test_parquet_column_given_by_index_is_named(tmp_path: Path, tok: Any) -> None:
    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"label": [1, 0, 1], "review": ["fine", "", "good"]}), train)
    out = tmp_path / "out"
    with pytest.raises(DataError):
        run(make_cfg(train, text_column=1, label_column=0, label_map=BINARY), out, tokenizer=tok)
    (reject,) = map(json.loads, (out / REJECTS_FILE).read_text().splitlines())
    assert reject["detail"] == "the text in column 'review' (data.text_column=1) is empty"


def test_parquet_column_index_out_of_range_lists_the_columns(tmp_path: Path) -> None:
    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"label": [1, 0], "review": ["fine", "bad"]}), train)
    problems, message = both_messages(make_cfg(train, text_column=5), tmp_path / "out")
    expected = (
        f"data.train file {train}: data.text_column=5 but the file has 2 columns ['label', 'review']; "
        "set data.text_column to a column's name"
    )
    assert problems == [expected] and message == expected
