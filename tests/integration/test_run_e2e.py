"""End to end on a tiny random Llama: `softprompt run` from the demo config, publish, predict, validate.

The CLI runs in-process (`softprompt.cli.main`), which is what the console script calls.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from softprompt import dataset as ds
from softprompt import ingest, predict, train
from softprompt.cli import main
from softprompt.config import ModelConfig, load_config
from softprompt.manifest import run_manifest
from softprompt.modeling import load_model
from softprompt.prompts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from softprompt.testing import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO = REPO_ROOT / "src" / "softprompt" / "demo"
ARTIFACT_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "metrics.json", "run_manifest.json", "report.html"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(DEMO_CONFIG, [f"data.train={DEMO / 'train.csv'}"])
    with (DEMO / "train.csv").open(encoding="utf-8", newline="") as f:
        texts = [cfg.task.template.replace("{text}", r["text"]) + cfg.task.verbalizer[r["label"]][0] for r in csv.DictReader(f)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), texts, vocab_size=1000)


def _overrides(tiny_dir: Path, work: Path) -> list[str]:
    return [
        f"model.name={tiny_dir}",
        f"model.cache_dir={work / 'cache'}",
        f"data.train={DEMO / 'train.csv'}",
        f"data.test={DEMO / 'test.csv'}",
        "data.max_train_rows=200",
        "data.max_test_rows=70",
        "prompt.num_virtual_tokens=6",
        "tune.num_samples=0",  # the demo tunes through Ray; this is the in-process path
        "train.steps=6",
        "train.batch_size=8",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.eval_max_rows=35",
        f"workdir={work}",
        f"publish.registry={work / 'registry'}",
        "run_name=e2e",
    ]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_run_publish_predict(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "runs"
    assert main(["run", "--no-progress", "-c", str(DEMO_CONFIG), *_overrides(tiny_dir, work)]) == 0
    out = capsys.readouterr().out
    run_dir = work / "e2e"
    for step in ("[1/4] ingest", "[2/4] train", "[3/4] evaluate", "[4/4] publish"):
        assert step in out
    assert "tuned prompt" in out and "zero-shot" in out and "few-shot" in out

    assert _files(run_dir / "data") == {"train.parquet", "eval.parquet", "test.parquet", "ingest_result.json", "rejects.jsonl"}
    assert _files(run_dir / "train") == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
        "checkpoint/state.json", "checkpoint/state.safetensors", "train_history.json", "train_result.json",
    }
    assert _files(run_dir / "artifact") == ARTIFACT_FILES

    published = Path(re.search(r"^published: (.+)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert published.is_relative_to(work / "registry" / "support-intent")
    assert _files(published) == ARTIFACT_FILES | {"MANIFEST.json"}
    for name in ARTIFACT_FILES:
        assert (published / name).read_bytes() == (run_dir / "artifact" / name).read_bytes()
    metrics = json.loads((published / "metrics.json").read_text())
    manifest = json.loads((published / "run_manifest.json").read_text())
    assert metrics["split"] == "test" and metrics["tuned"]["n"] == 70
    assert manifest["dataset"]["fingerprint"] == ds.read_manifest(run_dir / "data")["fingerprint"]
    assert manifest["train"]["steps"] == 6 and manifest["base_model"]["weights_sha256"]

    # Publishing the same run again is a no-op that says so.
    assert main(["publish", str(run_dir / "artifact"), "--registry", str(work / "registry")]) == 0
    assert "already exists" in capsys.readouterr().out
    assert _files(published) == ARTIFACT_FILES | {"MANIFEST.json"}

    # Predict with the published folder.
    inputs = tmp_path / "inputs.jsonl"
    texts = ["I was charged twice for one order.", "My parcel has not arrived yet.", "How do I reset my password?"]
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preds_file = tmp_path / "preds.jsonl"
    assert main(["predict", "--artifact", str(published), "--input", str(inputs), "--output", str(preds_file)]) == 0
    rows = [json.loads(line) for line in preds_file.read_text().splitlines()]
    labels = load_config(DEMO_CONFIG, [f"data.train={DEMO / 'train.csv'}"]).task.labels
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert r["label"] in labels and list(r["scores"]) == labels
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-4)

    # The published prompt, served by predict on the test split, scores what metrics.json says.
    test = ds.read_split(run_dir / "data", "test")
    table = predict.PromptTable(load_model(ModelConfig(name=str(tiny_dir), device="cpu")))
    table.add("p", published)
    preds = predict.predict_rows(table, [("p", t) for t in test.texts], batch_size=16)
    served = sum(p.label == y for p, y in zip(preds, test.labels, strict=True)) / len(test)
    assert served == pytest.approx(metrics["tuned"]["accuracy"])


@pytest.mark.slow
def test_stage_commands_one_by_one(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "by-hand"
    common = ["--no-progress", "--run-dir", str(run_dir), "-c", str(DEMO_CONFIG), *_overrides(tiny_dir, tmp_path), "train.steps=2"]
    assert main(["ingest", *common]) == 0
    assert main(["train", *common]) == 0
    assert main(["evaluate", *common, "evaluate.baselines=[zero_shot]"]) == 0
    out = capsys.readouterr().out
    assert f"adapter: {run_dir / 'train' / 'adapter'}" in out and f"artifact: {run_dir / 'artifact'}" in out
    assert _files(run_dir / "artifact") == ARTIFACT_FILES
    metrics = json.loads((run_dir / "artifact" / "metrics.json").read_text())
    assert "zero_shot" in metrics and "few_shot" not in metrics
    # The report's curves come from the training history next to the adapter.
    history = json.loads((run_dir / "train" / "train_history.json").read_text())
    assert history[-1]["step"] == 2 and "train_loss" in history[-1]


def test_validate_lists_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "task:\n  labels: [a]\n  templat: 'x {text}'\ndata:\n  train: x.csv\ntrain:\n  lr: fast\n  stpes: 3\nprompt:\n  num_virtual_tokens: 0\n",
        encoding="utf-8",
    )
    assert main(["validate", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    for fragment in ("unknown key task.templat", "did you mean 'template'", "unknown key train.stpes", "did you mean 'steps'", "train.lr='fast' must be a number", "num_virtual_tokens=0", "at least 2 labels", "no label words"):
        assert fragment in err, fragment
    assert "Traceback" not in err

    # A valid config whose files are missing: every missing file is named.
    assert main(["validate", "-c", str(DEMO_CONFIG), f"data.train={tmp_path / 'no-train.csv'}", f"data.test={tmp_path / 'no-test.csv'}"]) == 2
    err = capsys.readouterr().err
    assert "no-train.csv" in err and "no-test.csv" in err

    assert main(["validate", "-c", str(DEMO_CONFIG), f"data.train={DEMO / 'train.csv'}", f"data.test={DEMO / 'test.csv'}"]) == 0
    assert "ok:" in capsys.readouterr().out


def _generation_data(path: Path) -> Path:
    """Rows `a b` -> `b a`: input to target text."""
    rng = random.Random(0)
    words = ["cat", "dog", "bird", "fish", "horse", "cow", "sheep", "goat"]
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(40):
            a, b = rng.sample(words, 2)
            w.writerow([f"{a} {b} {i}", f"{b} {a}"])
    return path


GENERATION = [
    "task.name=swap",
    "task.kind=generation",
    'task.template="Swap: {text}\\nResult:"',  # YAML double quotes: \n is a newline
    "task.labels=[]",
    "task.verbalizer={}",
    "task.max_new_tokens=5",
    "prompt.init=text",
    "prompt.init_text=Swap the two words.",
    "evaluate.calibrate=false",
    "data.test=null",
    "data.max_test_rows=null",
    "data.eval_fraction=0.2",
]


@pytest.mark.slow
def test_generation_task_trains_and_predicts(tiny_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "runs"
    overrides = [*_overrides(tiny_dir, work), f"data.train={_generation_data(tmp_path / 'swap.csv')}", *GENERATION]
    cfg = load_config(DEMO_CONFIG, overrides)
    assert cfg.task.kind == "generation" and cfg.task.template == "Swap: {text}\nResult:"
    loaded = load_model(ModelConfig(name=str(tiny_dir), device="cpu"))
    data = ingest.run(cfg, work / "data", tokenizer=loaded.tokenizer)
    assert data.counts == {"train": 32, "eval": 8} and data.label_counts == {"train": {}, "eval": {}}
    trn, ev = ds.read_split(work / "data", "train"), ds.read_split(work / "data", "eval")
    assert all(ids[-1] == loaded.tokenizer.eos_token_id for ids in trn.target_ids)  # the model learns to stop

    result = train.run(cfg, loaded, trn, ev, work / "train")
    evals = [h for h in result.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6] and all(h["eval_loss"] > 0 for h in evals)
    assert result.best_metric == max(-h["eval_loss"] for h in evals)

    # A predict-ready folder as evaluate would write it: adapter files plus the run manifest.
    artifact = work / "artifact"
    artifact.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (artifact / name).write_bytes((result.adapter_dir / name).read_bytes())
    manifest: dict[str, Any] = run_manifest(cfg, dataset={"fingerprint": data.fingerprint}, base_model=loaded.identity)
    (artifact / "run_manifest.json").write_text(json.dumps(manifest, default=str))
    table = predict.PromptTable(loaded)
    table.add("swap", artifact)
    preds = predict.predict_rows(table, [("swap", "cat dog 99"), ("swap", "fish goat 7")])
    assert [p.text for p in preds] == ["cat dog 99", "fish goat 7"]
    assert all(isinstance(p.generated, str) and p.label is None for p in preds)


def test_run_chains_a_generation_task(tiny_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "runs"
    overrides = [*_overrides(tiny_dir, work), f"data.train={_generation_data(tmp_path / 'swap.csv')}", "data.test=null", *GENERATION, "train.steps=2", "train.eval_every=0"]
    assert main(["run", "--no-progress", "-c", str(DEMO_CONFIG), *overrides]) == 0
    artifact = next(work.glob("*/artifact"))
    assert {p.name for p in artifact.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_manifest.json", "report.html"}
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["task_kind"] == "generation" and set(metrics) >= {"tuned", "zero_shot", "few_shot"}
    assert 0.0 <= metrics["tuned"]["exact_match"] <= 1.0 and metrics["tuned"]["loss"] > 0
    assert len(metrics["samples"]) > 0 and "generated" in metrics["samples"][0]
    versions = [p for p in (work / "registry").rglob("MANIFEST.json")]
    assert len(versions) == 1
