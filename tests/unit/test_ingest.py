"""Ingest: formats, labels, every reject reason, file-level errors, splits, sampling and the fingerprint."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softprompt.config import JobConfig, ModelConfig, config_from_dict, load_config
from softprompt.dataset import SPLITS, read_manifest, read_split
from softprompt.errors import DataError
from softprompt.ingest import REJECTS_FILE, IngestResult, check_sources, run
from softprompt.modeling import load_tokenizer
from softprompt.tasks import encode_input, encode_target
from softprompt.testing import build_tiny_model

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LABELS = ["negative", "positive"]
TASK = {
    "name": "sent",
    "labels": LABELS,
    "verbalizer": {"negative": [" negative"], "positive": [" positive"]},
}
BINARY = {"0": "negative", "1": "positive"}
TASK_TEMPLATE = "{text}\nAnswer:"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    return load_tokenizer(ModelConfig(name=str(folder)))


def make_cfg(train: Path | str, task: dict[str, Any] | None = None, **data: Any) -> JobConfig:
    raw: dict[str, Any] = {"task": task or TASK, "data": {"train": str(train), **data}}
    if task is not None and task.get("kind") == "generation":
        raw["prompt"] = {"init": "text"}
        raw["evaluate"] = {"calibrate": False}
    return config_from_dict(raw)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def csv_rows(rows: list[tuple[str, str]], header: str = "text,label") -> str:
    body = "".join(f'"{t}",{label}\n' for t, label in rows)
    return (header + "\n" if header else "") + body


def good(n: int, label: str, start: int = 0) -> list[tuple[str, str]]:
    return [(f"{label} review number {i}", label) for i in range(start, start + n)]


def rejects(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / REJECTS_FILE).read_text(encoding="utf-8").splitlines()]


def reasons_by_line(out: Path) -> dict[int, str]:
    return {r["line"]: r["reason"] for r in rejects(out)}


def assert_counts_match(result: IngestResult, out: Path) -> None:
    found = Counter(r["reason"] for r in rejects(out))
    assert result.rejects_by_reason == dict(found)
    assert read_manifest(out)["rejects_by_reason"] == dict(found)
    assert result.rejected == sum(found.values())


# --------------------------------------------------------------------------------------------------
# Formats


def test_csv_with_header_writes_the_prepared_dataset(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.csv", csv_rows(good(20, "negative") + good(20, "positive")))
    out = tmp_path / "out"
    result = run(make_cfg(train, eval_fraction=0.2), out, tokenizer=tok)

    assert sorted(p.name for p in out.iterdir()) == [
        "eval.parquet",
        "ingest_result.json",
        "rejects.jsonl",
        "train.parquet",
    ]
    assert result.counts == {"train": 32, "eval": 8}
    assert result.label_counts == {
        "train": {"negative": 16, "positive": 16},
        "eval": {"negative": 4, "positive": 4},
    }
    assert result.rejected == 0 and result.rejects_file is None and result.warnings == []
    assert (out / REJECTS_FILE).read_text() == ""
    split = read_split(out, "train")
    assert split.input_ids[0] == encode_input(tok, TASK_TEMPLATE, split.texts[0])
    assert split.label_ids[0] == LABELS.index(split.labels[0])
    assert sorted(split.rows + read_split(out, "eval").rows) == list(range(2, 42))  # line 1: header
    manifest = read_manifest(out)
    assert manifest["format_version"] == 1
    assert manifest["fingerprint"] == result.fingerprint
    assert manifest["task"] == {
        "name": "sent",
        "kind": "classification",
        "template": TASK_TEMPLATE,
        "labels": LABELS,
    }
    assert manifest["sources"] == [
        {
            "split": "train",
            "uri": str(train),
            "sha256": manifest["sources"][0]["sha256"],
            "rows_read": 40,
            "rows_kept": 40,
            "rows_rejected": 0,
        }
    ]
    assert len(manifest["sources"][0]["sha256"]) == 64
    assert set(manifest["token_lengths"]["train"]) == {"min", "mean", "p50", "p95", "max"}
    assert manifest["tokenizer"]["vocab_size"] == len(tok)
    assert manifest["split"] == {"eval_from": "train", "eval_fraction": 0.2, "split_seed": 0}
    assert "train" in result.summary() and "no rows rejected" in result.summary()


def test_the_result_file_reads_back_as_what_run_returned(tmp_path: Path, tok: Any) -> None:
    rows = good(20, "negative") + good(20, "positive") + [("", "positive")]
    train = write(tmp_path / "train.csv", csv_rows(rows))
    test = write(tmp_path / "test.csv", csv_rows(good(3, "negative", 50) + good(3, "positive", 50)))
    out = tmp_path / "out"
    result = run(make_cfg(train, test=str(test), max_train_rows=20), out, tokenizer=tok)
    assert result.rejects_by_reason == {"missing_text": 1} and result.sampling["train"]["rows_after"] == 20
    assert [s.split for s in result.sources] == ["train", "test"]

    again = IngestResult.read(out)
    assert again == result
    assert again.rejected == 1 and again.rejects_file == out / REJECTS_FILE
    assert again.summary() == result.summary()


def test_a_folder_from_an_earlier_release_reads_its_dataset_manifest(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.csv", csv_rows(good(10, "negative") + good(10, "positive")))
    out = tmp_path / "out"
    result = run(make_cfg(train), out, tokenizer=tok)
    # Earlier releases wrote the same contents under the old name.
    (out / "ingest_result.json").rename(out / "dataset_manifest.json")

    assert read_manifest(out)["fingerprint"] == result.fingerprint
    legacy = IngestResult.read(out)
    assert legacy.result_path == out / "dataset_manifest.json"
    assert replace(legacy, result_path=result.result_path) == result

    run(make_cfg(train), out, tokenizer=tok)  # ingest again: only the new name is left
    assert (out / "ingest_result.json").is_file() and not (out / "dataset_manifest.json").exists()


def test_a_folder_without_a_result_file_says_to_run_ingest(tmp_path: Path) -> None:
    for read in (read_manifest, IngestResult.read):
        with pytest.raises(DataError, match=r"ingest_result\.json does not exist; run `softprompt ingest` first"):
            read(tmp_path)


def test_tsv_without_header_by_index(tmp_path: Path, tok: Any) -> None:
    lines = [f'{i % 2}\tfilm {i} with a "stray quote\n' for i in range(30)]
    train = write(tmp_path / "train.tsv", "".join(lines))
    # Index overrides arrive as strings ("1") from YAML; they must still select by position.
    cfg = load_config(
        None,
        overrides=[
            f"data.train={train}",
            "data.text_column=1",
            "data.label_column=0",
            "data.label_map={0: negative, 1: positive}",
            "task.labels=[negative, positive]",
            "task.verbalizer={negative: [' negative'], positive: [' positive']}",
        ],
    )
    out = tmp_path / "out"
    result = run(cfg, out, tokenizer=tok)
    assert result.rejected == 0
    assert sum(result.counts.values()) == 30
    split = read_split(out, "train")
    i = split.texts.index('film 0 with a "stray quote')
    assert split.labels[i] == "negative" and split.rows[i] == 1


def test_jsonl_objects_and_bad_lines(tmp_path: Path, tok: Any) -> None:
    lines = [json.dumps({"text": t, "label": label, "extra": 1}) for t, label in good(10, "negative")]
    lines += [json.dumps({"label": label, "text": t}) for t, label in good(10, "positive")]
    lines += ["", "{not json", json.dumps({"text": 5, "label": "positive"}), json.dumps("just a string")]
    train = write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = run(make_cfg(train, max_reject_fraction=0.5), out, tokenizer=tok)
    assert sum(result.counts.values()) == 20
    got = {r["line"]: r for r in rejects(out)}
    assert {n: r["reason"] for n, r in got.items()} == {22: "bad_row", 23: "bad_row", 24: "bad_row"}
    assert "not valid JSON" in got[22]["detail"]
    assert "is a number" in got[23]["detail"] and "not a string" in got[23]["detail"]
    assert "JSON string" in got[24]["detail"]
    assert_counts_match(result, out)


def test_jsonl_arrays_by_index_with_int_labels(tmp_path: Path, tok: Any) -> None:
    lines = [json.dumps([i % 2, f"text number {i}"]) for i in range(20)]
    train = write(tmp_path / "train.ndjson", "\n".join(lines))
    result = run(
        make_cfg(train, text_column=1, label_column=0, label_map=BINARY), tmp_path / "out", tokenizer=tok
    )
    assert result.rejected == 0 and sum(result.counts.values()) == 20


def test_json_array_document_is_refused_with_a_fix(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.json", json.dumps([{"text": "a", "label": "positive"}] * 3, indent=1))
    with pytest.raises(DataError, match=r"one JSON array, not JSON Lines.*jq"):
        run(make_cfg(train), tmp_path / "out", tokenizer=tok)


def test_parquet_with_int_labels_and_slices(tmp_path: Path, tok: Any) -> None:
    texts = [f"parquet row {i}" for i in range(20)]
    table = pa.table(
        {
            "id": list(range(20)),
            "text": texts,
            "label": [i % 2 for i in range(20)],
            "group": ["a" if i < 10 else "b" for i in range(20)],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    out = tmp_path / "out"
    cfg = make_cfg(tmp_path / "train.parquet", label_map=BINARY, slice_column="group")
    result = run(cfg, out, tokenizer=tok)
    assert result.rejected == 0
    split = read_split(out, "train")
    i = split.texts.index("parquet row 3")
    assert (split.labels[i], split.slices[i], split.rows[i]) == ("positive", "a", 4)


def test_auto_format_refuses_unknown_extension(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.txt", csv_rows(good(20, "negative") + good(20, "positive")))
    with pytest.raises(DataError, match=r"train\.txt.*'\.txt'.*set data\.format"):
        run(make_cfg(train), tmp_path / "out", tokenizer=tok)
    result = run(make_cfg(train, format="csv"), tmp_path / "out", tokenizer=tok)
    assert sum(result.counts.values()) == 40


def test_bom_is_stripped(tmp_path: Path, tok: Any) -> None:
    train = tmp_path / "train.csv"
    train.write_bytes(b"\xef\xbb\xbf" + csv_rows(good(10, "negative") + good(10, "positive")).encode())
    assert run(make_cfg(train), tmp_path / "out", tokenizer=tok).rejected == 0


def test_quoted_csv_fields_and_line_numbers(tmp_path: Path, tok: Any) -> None:
    text = (
        "text,label\n"  # 1
        '"hello, world",positive\n'  # 2
        '"multi\nline, text",negative\n'  # 3-4
        '"",positive\n'  # 5: empty text
        '"say ""hi"" twice",negative\n'  # 6
        + csv_rows(good(10, "negative") + good(10, "positive"), header="")  # 7-26
        + '"never closed,positive\nlast,negative\n'  # 27-28: one unterminated record
    )
    train = write(tmp_path / "train.csv", text)
    out = tmp_path / "out"
    result = run(make_cfg(train, eval_fraction=0.1, max_reject_fraction=0.2), out, tokenizer=tok)
    assert reasons_by_line(out) == {5: "missing_text", 27: "bad_row"}
    assert "unclosed quote" in rejects(out)[1]["detail"]
    rows: dict[str, int] = {}
    for split in ("train", "eval"):
        s = read_split(out, split)
        rows.update(zip(s.texts, s.rows, strict=True))
    assert rows["hello, world"] == 2
    assert rows["multi\nline, text"] == 3
    assert rows['say "hi" twice'] == 6
    assert rows["negative review number 0"] == 7
    assert_counts_match(result, out)


# --------------------------------------------------------------------------------------------------
# Labels and row checks


def test_label_map_and_unknown_labels(tmp_path: Path, tok: Any) -> None:
    rows = [(t, "0") for t, _ in good(10, "negative")] + [(t, "1") for t, _ in good(10, "positive")]
    rows += [("what label is this", "7"), ("a label name works too", "positive")]
    train = write(tmp_path / "train.csv", csv_rows(rows))
    out = tmp_path / "out"
    result = run(make_cfg(train, label_map=BINARY, max_reject_fraction=0.1), out, tokenizer=tok)
    (bad,) = rejects(out)
    assert (bad["reason"], bad["line"], bad["text"]) == ("unknown_label", 22, "what label is this")
    assert "['negative', 'positive']" in bad["detail"] and "data.label_map" in bad["detail"]
    assert sum(result.counts.values()) == 21
    assert sum(result.label_counts[s]["positive"] for s in result.counts) == 11


def test_every_row_reject_reason(tmp_path: Path, tok: Any) -> None:
    header_and_bad = (
        "text,label\n"  # 1
        "nice film one,1\n"  # 2
        "bad film two,0\n"  # 3
        ",1\n"  # 4 missing_text
        "   ,1\n"  # 5 missing_text (whitespace)
        "some text,\n"  # 6 missing_label
        "other text,7\n"  # 7 unknown_label
        '"Nice  Film\tONE ",1\n'  # 8 duplicate of 2 (normalized)
        "bad film two,1\n"  # 9 conflicting_label with 3
        + "x" * 150
        + ",1\n"  # 10 too_long_chars
        + "ж" * 60
        + ",1\n"  # 11 too_long_tokens
        "a,b,c\n"  # 12 bad_row
    )
    body = "".join(
        f"{t},{'0' if lab == 'negative' else '1'}\n" for t, lab in good(8, "negative") + good(8, "positive")
    )
    raw = header_and_bad.encode() + b"caf\xe9 latin1,1\n" + body.encode()  # 13 undecodable
    train = tmp_path / "train.csv"
    train.write_bytes(raw)
    out = tmp_path / "out"
    cfg = make_cfg(train, label_map=BINARY, max_text_chars=100, max_tokens=40, max_reject_fraction=0.5)
    result = run(cfg, out, tokenizer=tok)
    assert reasons_by_line(out) == {
        4: "missing_text",
        5: "missing_text",
        6: "missing_label",
        7: "unknown_label",
        8: "duplicate",
        9: "conflicting_label",
        10: "too_long_chars",
        11: "too_long_tokens",
        12: "bad_row",
        13: "undecodable",
    }
    details = {r["line"]: r for r in rejects(out)}
    assert "line 2" in details[8]["detail"]
    assert "line 3" in details[9]["detail"] and "'negative'" in details[9]["detail"]
    assert "3 fields, expected 2" in details[12]["detail"]
    assert "\ufffd" in details[13]["text"]
    assert len(details[10]["text"]) == 150 and all(r["file"] == str(train) for r in details.values())
    assert_counts_match(result, out)
    assert read_manifest(out)["sources"][0]["rows_rejected"] == 10
    assert "rejected 10 rows" in result.summary()


def test_reject_text_is_truncated(tmp_path: Path, tok: Any) -> None:
    rows = [*good(30, "negative"), *good(30, "positive"), ("y" * 500, "unknown")]
    train = write(tmp_path / "train.csv", csv_rows(rows))
    out = tmp_path / "out"
    run(make_cfg(train), out, tokenizer=tok)
    assert len(rejects(out)[0]["text"]) == 200


def test_leakage_drops_train_and_eval_rows_keeps_test(tmp_path: Path, tok: Any) -> None:
    train = write(
        tmp_path / "train.csv",
        csv_rows(
            [
                *good(20, "negative"),
                *good(20, "positive"),
                ("Seen In Eval", "positive"),
                ("seen in test", "negative"),
            ]
        ),
    )
    eval_ = write(
        tmp_path / "eval.csv",
        csv_rows(
            [
                *good(5, "negative", 100),
                ("seen in eval", "positive"),
                ("also in test", "positive"),
                *good(5, "positive", 100),
            ]
        ),
    )
    test = write(
        tmp_path / "test.csv",
        csv_rows(
            [
                ("Seen  in test", "negative"),
                ("also in test", "positive"),
                *good(5, "negative", 200),
                *good(5, "positive", 200),
            ]
        ),
    )
    out = tmp_path / "out"
    result = run(
        make_cfg(train, eval=str(eval_), test=str(test), max_reject_fraction=0.1), out, tokenizer=tok
    )
    leaks = {(r["file"], r["line"]): r["detail"] for r in rejects(out)}
    assert set(leaks) == {(str(train), 42), (str(train), 43), (str(eval_), 8)}
    assert "eval file" in leaks[(str(train), 42)] and "line 7" in leaks[(str(train), 42)]
    assert "test file" in leaks[(str(eval_), 8)]
    assert result.counts == {"train": 40, "eval": 11, "test": 12}
    assert result.rejects_by_reason == {"leakage": 3}
    assert read_manifest(out)["split"]["eval_from"] == "file"


# --------------------------------------------------------------------------------------------------
# File-level errors


def test_missing_column_names_the_columns_found(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine film\t1\n")
    with pytest.raises(DataError) as err:
        run(make_cfg(train), tmp_path / "out", tokenizer=tok)
    message = str(err.value)
    assert str(train) in message and "no column 'text'" in message
    assert "['sentence', 'label']" in message and "data.text_column" in message

    headerless = write(tmp_path / "h.csv", "1,fine film\n0,bad film\n")
    with pytest.raises(DataError, match=r"data\.text_column=5 but its rows have 2 fields"):
        run(make_cfg(headerless, text_column=5, label_column=0), tmp_path / "out", tokenizer=tok)
    with pytest.raises(DataError, match=r"data\.header=false"):
        run(make_cfg(headerless, header=False), tmp_path / "out", tokenizer=tok)


def test_missing_jsonl_key(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.jsonl", json.dumps({"sentence": "a", "label": "positive"}) + "\n")
    with pytest.raises(
        DataError, match=r"no line has the key 'text' \(data\.text_column\); keys found: \['sentence'"
    ):
        run(make_cfg(train), tmp_path / "out", tokenizer=tok)


@pytest.mark.parametrize(
    ("content", "expected"), [("", "is empty"), ("text,label\n", "header row but no data rows")]
)
def test_empty_file(tmp_path: Path, tok: Any, content: str, expected: str) -> None:
    train = write(tmp_path / "train.csv", content)
    with pytest.raises(DataError, match=expected):
        run(make_cfg(train), tmp_path / "out", tokenizer=tok)


def test_nonexistent_files_are_all_named_before_the_model_loads(tmp_path: Path) -> None:
    raw = {"task": TASK, "model": {"name": str(tmp_path / "no-model")}}
    raw["data"] = {"train": str(tmp_path / "nope.csv"), "eval": str(tmp_path / "gone.csv")}
    cfg = config_from_dict(raw)
    with pytest.raises(DataError) as err:  # a ModelError would mean the tokenizer was loaded first
        run(cfg, tmp_path / "out")
    message = str(err.value)
    assert "2 problems" in message
    assert f"data.train file {tmp_path / 'nope.csv'} does not exist" in message
    assert f"data.eval file {tmp_path / 'gone.csv'} does not exist" in message
    assert check_sources(cfg) == [line.removeprefix("  - ") for line in message.splitlines()[1:]]


def test_check_sources_passes_a_good_config_and_names_missing_columns(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", csv_rows(good(3, "negative")))
    assert check_sources(make_cfg(train)) == []
    (problem,) = check_sources(make_cfg(train, text_column="sentence"))
    assert "no column 'sentence'" in problem


def test_too_many_bad_rows_raises_after_writing_rejects(tmp_path: Path, tok: Any) -> None:
    rows = [*good(4, "negative"), *good(3, "positive"), ("x", "maybe"), ("y", "perhaps"), ("", "positive")]
    train = write(tmp_path / "train.csv", csv_rows(rows))
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        run(make_cfg(train), out, tokenizer=tok)
    message = str(err.value)
    assert f"data.train file {train}: 3 of 10 rows rejected (30.0%" in message
    assert "unknown_label 2 (e.g. line 9:" in message and "missing_text 1 (e.g. line 11:" in message
    assert str(out / REJECTS_FILE) in message and "raise data.max_reject_fraction" in message
    assert [r["line"] for r in rejects(out)] == [9, 10, 11]
    assert not (out / "ingest_result.json").exists() and not (out / "train.parquet").exists()


def test_no_usable_rows(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.csv", csv_rows([("a", "x"), ("b", "y")]))
    with pytest.raises(DataError, match=r"no usable rows: all 2 rows were rejected: unknown_label 2"):
        run(make_cfg(train, max_reject_fraction=1.0), tmp_path / "out", tokenizer=tok)


def test_header_row_read_as_data_gets_a_warning(tmp_path: Path, tok: Any) -> None:
    text = "sentence\tlabel\n" + "".join(
        f"{t}\t{'0' if lab == 'negative' else '1'}\n"
        for t, lab in good(20, "negative") + good(20, "positive")
    )
    train = write(tmp_path / "train.tsv", text)
    result = run(
        make_cfg(train, text_column=0, label_column=1, label_map=BINARY), tmp_path / "out", tokenizer=tok
    )
    assert result.rejects_by_reason == {"unknown_label": 1}
    assert any("set data.header=true" in w for w in result.warnings)


def test_stale_files_of_an_earlier_run_are_removed(tmp_path: Path, tok: Any) -> None:
    data = csv_rows(good(10, "negative") + good(10, "positive"))
    train = write(tmp_path / "train.csv", data)
    test = write(tmp_path / "test.csv", csv_rows(good(3, "negative", 50) + good(3, "positive", 50)))
    out = tmp_path / "out"
    run(make_cfg(train, test=str(test)), out, tokenizer=tok)
    assert (out / "test.parquet").exists()
    run(make_cfg(train), out, tokenizer=tok, progress=True)
    assert not (out / "test.parquet").exists()


# --------------------------------------------------------------------------------------------------
# Splits, sampling, fingerprint


def skewed(tmp_path: Path, pos: int = 80, neg: int = 20) -> Path:
    return write(tmp_path / "train.csv", csv_rows(good(pos, "positive") + good(neg, "negative")))


def test_stratified_split_is_deterministic_and_proportional(tmp_path: Path, tok: Any) -> None:
    train = skewed(tmp_path)
    first = run(make_cfg(train, eval_fraction=0.2, split_seed=3), tmp_path / "a", tokenizer=tok)
    again = run(make_cfg(train, eval_fraction=0.2, split_seed=3), tmp_path / "b", tokenizer=tok)
    other = run(make_cfg(train, eval_fraction=0.2, split_seed=4), tmp_path / "c", tokenizer=tok)
    assert first.label_counts["eval"] == {"negative": 4, "positive": 16}
    assert first.label_counts["train"] == {"negative": 16, "positive": 64}
    a, b, c = (read_split(tmp_path / d, "eval").texts for d in "abc")
    assert a == b and a != c
    train_texts = read_split(tmp_path / "a", "train").texts
    assert not set(a) & set(train_texts) and len(set(a) | set(train_texts)) == 100
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_every_label_with_two_rows_reaches_eval(tmp_path: Path, tok: Any) -> None:
    result = run(
        make_cfg(skewed(tmp_path, pos=40, neg=2), eval_fraction=0.1), tmp_path / "out", tokenizer=tok
    )
    assert result.label_counts["eval"] == {"negative": 1, "positive": 4}
    assert "label 'negative' has only 1 row in the eval split" in result.warnings
    assert "label 'negative' has only 1 row in the train split" in result.warnings
    assert read_manifest(tmp_path / "out")["warnings"] == result.warnings


def test_missing_label_warns(tmp_path: Path, tok: Any) -> None:
    train = write(tmp_path / "train.csv", csv_rows(good(20, "positive")))
    result = run(make_cfg(train), tmp_path / "out", tokenizer=tok)
    assert "label 'negative' has no rows in the train split" in result.warnings


def test_max_rows_sampling_keeps_proportions(tmp_path: Path, tok: Any) -> None:
    train = skewed(tmp_path)
    test = write(tmp_path / "test.csv", csv_rows(good(30, "positive", 500) + good(10, "negative", 500)))
    cfg = make_cfg(
        train, test=str(test), eval_fraction=0.2, max_train_rows=10, max_eval_rows=5, max_test_rows=8
    )
    result = run(cfg, tmp_path / "a", tokenizer=tok)
    assert result.label_counts == {
        "train": {"negative": 2, "positive": 8},
        "eval": {"negative": 1, "positive": 4},
        "test": {"negative": 2, "positive": 6},
    }
    again = run(cfg, tmp_path / "b", tokenizer=tok)
    for split in SPLITS:
        assert read_split(tmp_path / "a", split).texts == read_split(tmp_path / "b", split).texts
    rows = read_split(tmp_path / "a", "train").rows
    assert rows == sorted(rows)  # file order is kept
    assert read_manifest(tmp_path / "a")["sampling"]["train"] == {
        "rows_before": 80,
        "rows_after": 10,
        "option": "data.max_train_rows",
    }
    assert again.fingerprint == result.fingerprint


def test_fingerprint_changes_with_the_data(tmp_path: Path, tok: Any) -> None:
    rows = good(10, "negative") + good(10, "positive")
    first = run(make_cfg(write(tmp_path / "a.csv", csv_rows(rows))), tmp_path / "a", tokenizer=tok)
    moved = run(make_cfg(write(tmp_path / "b.csv", csv_rows(rows))), tmp_path / "b", tokenizer=tok)
    rows[0] = ("a different text", "negative")
    changed = run(make_cfg(write(tmp_path / "c.csv", csv_rows(rows))), tmp_path / "c", tokenizer=tok)
    retemplated = run(
        make_cfg(tmp_path / "a.csv", task={**TASK, "template": "Review: {text}\nSentiment:"}),
        tmp_path / "d",
        tokenizer=tok,
    )
    assert first.fingerprint == moved.fingerprint  # content, not paths
    assert len({first.fingerprint, changed.fingerprint, retemplated.fingerprint}) == 3


def test_generation_targets(tmp_path: Path, tok: Any) -> None:
    task = {"name": "qa", "kind": "generation", "template": "Q: {text}\nA:"}
    rows = [(f"question {i}", f"answer {i}") for i in range(20)]
    rows += [("question 0", "another answer 0"), ("Question  0", "Answer 0")]  # lines 22, 23
    train = write(tmp_path / "train.csv", csv_rows(rows))
    out = tmp_path / "out"
    result = run(make_cfg(train, task=task, max_reject_fraction=0.1), out, tokenizer=tok)
    assert reasons_by_line(out) == {23: "duplicate"}
    assert result.label_counts == {"train": {}, "eval": {}}
    assert sum(result.counts.values()) == 21
    split = read_split(out, "train")
    assert set(split.label_ids) == {-1}
    i = split.labels.index("answer 3")
    assert split.target_ids[i] == encode_target(tok, "answer 3")
    assert split.input_ids[i] == encode_input(tok, "Q: {text}\nA:", "question 3")


def test_real_trec_head(tmp_path: Path, tok: Any) -> None:
    source = SHARED_DATA / "trec" / "train.csv"
    if not source.is_file():
        pytest.skip(f"{source} is not available")
    with source.open(encoding="utf-8", newline="") as f:
        head = "".join(line for _, line in zip(range(300), f, strict=False))
    train = write(tmp_path / "train.csv", head)
    names = ["description", "entity", "abbreviation", "human", "location", "number"]
    task = {"name": "trec", "labels": names, "verbalizer": {n: [f" {n}"] for n in names}}
    cfg = make_cfg(
        train, task=task, text_column=1, label_column=0, label_map={str(i): n for i, n in enumerate(names)}
    )
    result = run(cfg, tmp_path / "out", tokenizer=tok)
    assert sum(result.counts.values()) + result.rejected == 300
    assert set(result.rejects_by_reason) <= {"duplicate"}
    assert result.label_counts["train"]["description"] > 0
    assert min(read_split(tmp_path / "out", "train").rows + read_split(tmp_path / "out", "eval").rows) == 1
