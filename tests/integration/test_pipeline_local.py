"""`softprompt pipeline run --local`: the whole Kubeflow pipeline on the demo task, executed by
kfp's local SubprocessRunner (every step in a subprocess of this interpreter, no Docker, no
cluster), with a tiny random Llama and a local folder as the registry.

The first run checks every step's artifacts (what the Kubeflow UI would show); with a random
model the tuned prompt does not beat its baselines, so promotion must be skipped. The second run
scores no baselines, which passes the gate, so the promote step must run and move the champion.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import softprompt
from softprompt.cli import main
from softprompt.config import load_config
from softprompt.outcome import TrainOutcome
from softprompt.registry import REQUIRED_FILES
from softprompt.testing import build_tiny_model

pytestmark = pytest.mark.slow
DEMO = Path(softprompt.__file__).parent / "demo"
LABELS = ["account", "billing", "cancellation", "delivery", "product", "refund", "technical"]


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    with (DEMO / "train.csv").open(encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:150]
    model = build_tiny_model(root / "tiny-llama", [*texts, *(f"Intent: {label}" for label in LABELS)])
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump({
        "task": {"name": "demo", "template": "{text}\nIntent:", "labels": LABELS,
                 "verbalizer": {label: [f" {label}"] for label in LABELS}},
        "data": {"train": str(DEMO / "train.csv"), "test": str(DEMO / "test.csv"),
                 "max_train_rows": 32, "max_eval_rows": 8, "max_test_rows": 21},
        "model": {"name": str(model)},
        "prompt": {"num_virtual_tokens": 4},
        "train": {"steps": 2, "batch_size": 8, "warmup_steps": 0, "eval_every": 2},
        "evaluate": {"batch_size": 32},
        # One trial of one Ray Train worker on the local Ray that `softprompt tune` starts.
        "tune": {"num_samples": 0},
        "ray": {"num_workers": 1},
    }))
    return config


def _run(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[Path, Path, dict[str, Any]]:
    registry, root = tmp_path / "registry", tmp_path / "kfp"
    code = main(["pipeline", "run", "--local", "-c", str(config), "--registry", str(registry), "--pipeline-root", str(root), *overrides])
    assert code == 0
    out = capsys.readouterr().out
    found = re.search(r"published version (\w+) at (\S+); the tuned prompt (beats|does not beat)", out)
    assert found, out[-2000:]
    (run_dir,) = root.iterdir()
    summary = {"version": found[1], "uri": found[2], "beats_baselines": found[3] == "beats"}
    return registry, run_dir, summary


def _executor_output(run_dir: Path, task: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / task / "executor_output.json").read_text())
    return data


def _artifact(run_dir: Path, task: str, name: str) -> dict[str, Any]:
    art: dict[str, Any] = _executor_output(run_dir, task)["artifacts"][name]["artifacts"][0]
    return art


def test_local_pipeline_end_to_end(demo_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry, run_dir, summary = _run(demo_config, tmp_path, capsys)
    assert sorted(p.name for p in run_dir.iterdir() if p.name != "promote") == ["evaluate", "ingest", "publish", "tune", "validate"]

    resolved = load_config(run_dir / "validate" / "config")  # the one config every step read
    assert resolved.publish.registry == str(registry) and resolved.model.name == load_config(demo_config).model.name

    dataset = _artifact(run_dir, "ingest", "dataset")
    assert {"train.parquet", "eval.parquet", "test.parquet", "ingest_result.json"} <= {p.name for p in Path(dataset["uri"]).iterdir()}
    assert dataset["metadata"]["counts"] == {"train": 32, "eval": 8, "test": 21}

    tuned = _artifact(run_dir, "tune", "winners")
    winners = TrainOutcome.read(tuned["uri"])
    assert [p.relative_to(tuned["uri"]).as_posix() for p in winners.winners] == ["winners/00/adapter"]
    assert (winners.winners[0] / "adapter_model.safetensors").is_file() and (winners.winners[0].parent / "train_history.json").is_file()
    assert not any(p.name == "checkpoint" for p in Path(tuned["uri"]).rglob("*"))
    assert tuned["metadata"]["launcher"] == "local" and tuned["metadata"]["winners"] == 1
    assert winners.config.train == resolved.train  # one trial: the configured values

    artifact = _artifact(run_dir, "evaluate", "artifact")
    assert set(REQUIRED_FILES) <= {p.name for p in Path(artifact["uri"]).iterdir()}
    metrics = json.loads((Path(artifact["uri"]) / "metrics.json").read_text())
    manifest = json.loads((Path(artifact["uri"]) / "run_manifest.json").read_text())
    assert manifest["train"]["steps"] == resolved.train.steps and manifest["train"]["tune"]["trials"] == 1  # the real train summary
    scalars = _artifact(run_dir, "evaluate", "metrics")["metadata"]
    assert scalars == {f"{m}_{k}": pytest.approx(metrics[m][k]) for m in ("tuned", "zero_shot", "few_shot") for k in ("accuracy", "macro_f1")}
    matrix = _artifact(run_dir, "evaluate", "confusion")["metadata"]["confusionMatrix"]
    assert [s["displayName"] for s in matrix["annotationSpecs"]] == LABELS
    assert [r["row"] for r in matrix["rows"]] == metrics["tuned"]["confusion"]
    assert sum(map(sum, metrics["tuned"]["confusion"])) == 21
    assert Path(_artifact(run_dir, "evaluate", "report")["uri"]).read_text().lstrip().lower().startswith("<!doctype html")
    beats = _executor_output(run_dir, "evaluate")["parameterValues"]["Output"]
    assert beats is metrics["beats_baselines"] is summary["beats_baselines"]

    published = _executor_output(run_dir, "publish")["parameterValues"]
    assert (published["version"], published["uri"]) == (summary["version"], summary["uri"])
    version_dir = Path(published["uri"])
    assert version_dir == registry / "demo" / published["base_model"] / published["version"]
    assert (version_dir / "MANIFEST.json").is_file()
    assert published["eval_fingerprint"] == metrics["eval_fingerprint"]
    # The gate: promote runs only when the tuned prompt beats its baselines.
    assert (run_dir / "promote").exists() is beats
    assert (version_dir.parent / "champion.json").exists() is beats


def test_local_pipeline_promotes_when_the_gate_passes(demo_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry, run_dir, summary = _run(demo_config, tmp_path, capsys, "evaluate.baselines=[]")
    assert summary["beats_baselines"] is True  # nothing to beat
    assert _executor_output(run_dir, "promote")["parameterValues"]["Output"] == "promoted"
    champion = json.loads((Path(summary["uri"]).parent / "champion.json").read_text())
    assert champion["version"] == summary["version"] and champion["reason"].startswith("pipeline run ")
    assert _artifact(run_dir, "evaluate", "metrics")["metadata"].keys() == {"tuned_accuracy", "tuned_macro_f1"}
    assert registry in Path(summary["uri"]).parents


def test_run_requires_local() -> None:
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "run", "-c", "x.yaml"])
    assert info.value.code == 2
