"""Predict: labels and scores from an artifact, mixed-prompt batches, generation, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from softprompt import checkpoint, predict, prompts
from softprompt.cli import main
from softprompt.config import JobConfig, config_from_dict, to_dict
from softprompt.engine import Prefix, greedy_generate, label_scores
from softprompt.errors import DataError, ModelError
from softprompt.inputs import read_inputs
from softprompt.modeling import LoadedModel
from softprompt.scoring import to_probs
from softprompt.tasks import encode_input

TEXTS = [
    "I was billed twice this month.",
    "Where is my parcel?",
    "Please close my account",
    "The app crashes whenever I open the settings page on my phone.",
    "refund",
    "My order says delivered but nothing arrived at the door, what now?",
]


def _cfg(model_dir: Path, task: dict[str, Any], n: int, kind: str = "classification") -> JobConfig:
    raw: dict[str, Any] = {
        "task": {**task, "kind": kind},
        "data": {"train": "unused.csv"},
        "model": {"name": str(model_dir), "device": "cpu"},
        "prompt": {"num_virtual_tokens": n, "init": "vocab"},
    }
    if kind == "generation":
        raw["evaluate"] = {"calibrate": False}
    return config_from_dict(raw)


INTENT = {  # single-token label words (the tiny tokenizer learned them)
    "name": "intent",
    "template": "Customer message: {text}\nThe message is about",
    "labels": ["billing", "delivery", "account", "technical"],
    "verbalizer": {"billing": [" billing"], "delivery": [" delivery"], "account": [" account"], "technical": [" technical"]},
}
SENTIMENT = {  # multi-token label words, another template and label set
    "name": "sentiment",
    "template": "Review: {text}\nSentiment:",
    "labels": ["negative", "positive"],
    "verbalizer": {"negative": [" negative", " no"], "positive": [" positive"]},
}
URGENT = {  # single-token words again, a third template
    "name": "urgent",
    "template": "{text} Urgent?",
    "labels": ["no", "yes"],
    "verbalizer": {"no": [" refund"], "yes": [" product"]},
}
ECHO = {"name": "echo", "template": "Q: {text}\nA:", "max_new_tokens": 6}


def _artifact(loaded: LoadedModel, cfg: JobConfig, out: Path, seed: int) -> Path:
    """A published-style folder: PEFT adapter files plus a run manifest holding the config."""
    prompt = prompts.create(cfg.prompt, cfg.task, loaded.model, loaded.tokenizer, seed=seed)
    g = torch.Generator().manual_seed(seed)
    embeds = prompt.embeddings().detach() + 0.1 * torch.randn(cfg.prompt.num_virtual_tokens, loaded.model.config.hidden_size, generator=g)
    checkpoint.write_adapter(prompt, embeds, out)
    (out / "run_manifest.json").write_text(json.dumps({"config": to_dict(cfg)}))
    return out


@pytest.fixture()
def table(tiny_ctx: LoadedModel, tiny_model_dir: Path, tmp_path: Path) -> predict.PromptTable:
    t = predict.PromptTable(tiny_ctx)
    for name, task, n, kind in (("intent", INTENT, 4, "classification"), ("sentiment", SENTIMENT, 7, "classification"), ("urgent", URGENT, 2, "classification"), ("echo", ECHO, 3, "generation")):
        t.add(name, _artifact(tiny_ctx, _cfg(tiny_model_dir, task, n, kind), tmp_path / name, seed=len(t.prompts)))
    return t


def test_one_artifact_gives_labels_and_scores(table: predict.PromptTable) -> None:
    preds = predict.predict_rows(table, [("intent", t) for t in TEXTS], batch_size=4)
    p = table.prompts["intent"]
    assert p.verbalizer is not None
    seqs = [encode_input(table.loaded.tokenizer, INTENT["template"], t) for t in TEXTS]
    with torch.no_grad():
        want = to_probs(label_scores(table.loaded.model, Prefix(embeds=p.embeds), seqs, p.verbalizer, table.loaded.tokenizer.pad_token_id).double().numpy())
    assert [x.text for x in preds] == TEXTS  # input order, though batches are sorted by length
    for pred, probs in zip(preds, want, strict=True):
        assert pred.prompt == "intent" and pred.scores is not None
        assert list(pred.scores) == INTENT["labels"]
        assert pred.label == INTENT["labels"][int(probs.argmax())]
        assert sum(pred.scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(pred.scores.values()) == pytest.approx(probs.tolist(), abs=1e-5)
        assert set(pred.to_dict()) == {"prompt", "text", "label", "scores"}


def test_mixed_prompts_in_one_batch_equal_each_prompt_alone(table: predict.PromptTable) -> None:
    names = ["intent", "sentiment", "urgent", "echo"]
    rows = [(names[i % 4], t) for i, t in enumerate(TEXTS * 2)]
    mixed = predict.predict_rows(table, rows, batch_size=5)
    alone = [predict.predict_rows(table, [row], batch_size=1)[0] for row in rows]
    assert len({p.embeds.shape[0] for p in table.prompts.values()}) == 4  # four prompt lengths
    for m, a, (name, text) in zip(mixed, alone, rows, strict=True):
        assert (m.prompt, m.text) == (name, text)
        assert m.label == a.label and m.generated == a.generated
        if m.scores is not None:
            assert a.scores is not None and list(m.scores) == list(a.scores)
            assert list(m.scores.values()) == pytest.approx(list(a.scores.values()), abs=1e-5)
    assert {m.label for m in mixed if m.prompt == "sentiment"} <= {"negative", "positive"}


def test_generation_prompt_returns_text(table: predict.PromptTable) -> None:
    tok = table.loaded.tokenizer
    (pred,) = predict.predict_rows(table, [("echo", "What is the capital of France ?")])
    p = table.prompts["echo"]
    ids = encode_input(tok, ECHO["template"], "What is the capital of France ?")
    want = greedy_generate(table.loaded.model, p.embeds, [ids], max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)[0]
    assert pred.generated == tok.decode(want, skip_special_tokens=True)
    assert pred.generated and pred.label is None and pred.scores is None
    assert set(pred.to_dict()) == {"prompt", "text", "generated"}


def test_cli_predict_writes_jsonl(table: predict.PromptTable, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[:3])))
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--artifact", f"intent={tmp_path / 'intent'}", "--input", str(inputs), "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in lines] == TEXTS[:3]
    assert all(r["prompt"] == "intent" and r["label"] in INTENT["labels"] and set(r["scores"]) == set(INTENT["labels"]) for r in lines)
    assert "wrote 3 predictions" in capsys.readouterr().err


def test_cli_predict_logs_each_prediction_under_the_id_it_prints(table: predict.PromptTable, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from softprompt.predlog import read_records
    from softprompt.registry.store import LocalStore

    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(TEXTS[:4]) + "\n")
    argv = ["predict", "--artifact", f"intent={tmp_path / 'intent'}", "--artifact", f"echo={tmp_path / 'echo'}", "--input", str(inputs)]
    assert main([*argv, "--prediction-log", str(tmp_path / "registry"), "--log-inputs", "false"]) == 0
    out = capsys.readouterr()
    answers = [json.loads(line) for line in out.out.splitlines()]
    logged = {r["id"]: r for r in read_records(LocalStore(tmp_path / "registry"), "intent")}
    assert list(logged) == [a["id"] for a in answers]  # a run folder has no version: logged as "local", answered as null
    assert all(logged[a["id"]]["label"] == a["label"] and logged[a["id"]]["input"] is None and a["version"] is None for a in answers)
    assert f"prediction log: 4 records written to {tmp_path / 'registry'}" in out.err

    assert main([*argv, "--prediction-log", "auto"]) == 0  # a run folder is in no registry: ids, no log
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len({a["id"] for a in answers}) == 4 and len(list(read_records(LocalStore(tmp_path / "registry"), "intent"))) == 4


def test_cli_predict_routes_rows_by_prompt_column(table: predict.PromptTable, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in.csv"
    inputs.write_text("task,message\nintent,Where is my parcel?\nsentiment,great phone\n")
    code = main(["predict", "--artifact", f"intent={tmp_path / 'intent'}", "--artifact", f"sentiment={tmp_path / 'sentiment'}", "--input", str(inputs), "--text-column", "message", "--prompt-column", "task"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["label"] in (INTENT if r["prompt"] == "intent" else SENTIMENT)["labels"]) for r in lines] == [("intent", True), ("sentiment", True)]


def _raises(path: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as exc:
        read_inputs(path)
    for fragment in (str(path), *fragments):
        assert fragment in str(exc.value), (fragment, str(exc.value))


def test_bad_input_files_name_the_file_and_row(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.jsonl", "does not exist")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    _raises(bad_json, "line 2 is not valid JSON")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "a"}\n\n{"text": "b"}\n{"body": "c"}\n')
    _raises(no_field, "line 4 has no 'text' field", "'body'", "--text-column")  # file lines, blank ones counted
    not_object = tmp_path / "strings.jsonl"
    not_object.write_text('{"text": "a"}\n"just the text"\n')
    _raises(not_object, "line 2 is a JSON str, not an object")
    null_text = tmp_path / "null.jsonl"
    null_text.write_text('{"text": "a"}\n{"text": null}\n')
    _raises(null_text, "line 2 has an empty or non-text 'text' value (None)")
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("message\nhello\n")
    _raises(csv_file, "row 1 has no 'text' field")
    short_row = tmp_path / "short.csv"
    short_row.write_text("id,text\n1,hello\n2\n")
    _raises(short_row, "row 2 has an empty or non-text 'text' value")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text\nok\ncaf\xe9\n".encode("latin-1"))
    _raises(latin1, "line 3 is not valid UTF-8", "save the file as UTF-8")
    not_parquet = tmp_path / "in.parquet"
    not_parquet.write_text("not parquet")
    _raises(not_parquet, "is not a readable Parquet file")


def test_input_files_in_every_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufefftext,task\nhello,a\n\"two, lines\nhere\",\n".encode())
    assert read_inputs(bom, prompt_column="task", default_prompt="p") == [("a", "hello"), ("p", "two, lines\nhere")]
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\tx\nhi there\t1\n")
    assert read_inputs(tsv) == [("", "hi there")]
    pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2]}), tmp_path / "in.parquet")
    assert read_inputs(tmp_path / "in.parquet", default_prompt="p") == [("p", "a"), ("p", "b")]
    plain = tmp_path / "in.txt"
    plain.write_text("first\n\nsecond\n")
    assert read_inputs(plain, default_prompt="p") == [("p", "first"), ("p", "second")]
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 42}\n')
    assert read_inputs(numbers) == [("", "42")]


def test_cli_reports_a_bad_input_file_before_loading_the_model(table: predict.PromptTable, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import softprompt.modeling

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the input file was checked")

    monkeypatch.setattr(softprompt.modeling, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["predict", "--artifact", str(tmp_path / "intent"), "--input", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad} line 1 is not valid JSON" in err and "Traceback" not in err


def test_unknown_prompt_names_and_foreign_prompts_are_refused(table: predict.PromptTable, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\['other'\].*loaded: \['echo', 'intent', 'sentiment', 'urgent'\]"):
        predict.predict_rows(table, [("other", "hi")])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / prompts.ADAPTER_CONFIG).write_text((tmp_path / "intent" / prompts.ADAPTER_CONFIG).read_text())
    save_file({"prompt_embeddings": torch.zeros(4, 32)}, str(foreign / prompts.ADAPTER_WEIGHTS))
    with pytest.raises(ModelError, match="width 32"):
        table.add("foreign", foreign)
    with pytest.raises(ModelError, match=r"no adapter_model\.safetensors"):
        table.add("empty", tmp_path / "does-not-exist")


def test_forward_chunks_sort_by_size_and_on_a_cpu_split_where_padding_would_pass_the_slack() -> None:
    sizes = [40, 12, 11, 10, 41, 90]
    assert predict.forward_chunks(sizes, batch_size=4) == [[3, 2, 1, 0], [4, 5]]  # one pass per batch_size rows, sorted
    chunks = predict.forward_chunks(sizes, batch_size=32, padding_slack=1.25)
    assert chunks == [[3, 2, 1], [0, 4], [5]]
    for chunk in chunks:  # padded positions within the slack of the real ones
        assert len(chunk) * max(sizes[i] for i in chunk) <= 1.25 * sum(sizes[i] for i in chunk)
