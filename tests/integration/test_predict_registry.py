"""`softprompt predict` with prompts pulled from the registry: S3 (moto on loopback) and a local folder.

Two tiny prompts of different lengths are trained and evaluated for real, published, one promoted;
predict then resolves `champion` and explicit versions, and mixes both prompts in one batch.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from softprompt import dataset as ds
from softprompt import evaluate, ingest, train
from softprompt.cli import main
from softprompt.config import load_config
from softprompt.modeling import load_model
from softprompt.outcome import TrainOutcome
from softprompt.registry import Gate, promote, publish
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import LocalStore
from softprompt.testing import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO = REPO_ROOT / "src" / "softprompt" / "demo"
TEXTS = ["I was charged twice for one order.", "My parcel has not arrived yet.", "How do I reset my password?", "refund please"]


@dataclass(frozen=True)
class Trained:
    """Two evaluated artifact folders (prompts of 4 and 8 virtual tokens) for one tiny model."""

    short: Path
    long: Path
    task: str
    model_key: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("predict-registry")
    base = load_config(DEMO_CONFIG, [f"data.train={DEMO / 'train.csv'}"])
    with (DEMO / "train.csv").open(encoding="utf-8", newline="") as f:
        texts = [base.task.template.replace("{text}", r["text"]) + base.task.verbalizer[r["label"]][0] for r in csv.DictReader(f)]
    model_dir = build_tiny_model(root / "tiny", texts, vocab_size=1000)
    overrides = [
        f"model.name={model_dir}", "model.device=cpu", f"model.cache_dir={root / 'cache'}",
        f"data.train={DEMO / 'train.csv'}", f"data.test={DEMO / 'test.csv'}",
        "data.max_train_rows=48", "data.max_eval_rows=16", "data.max_test_rows=16",
        "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=3", "train.eval_max_rows=16",
        "evaluate.baselines=[zero_shot]", f"workdir={root}", "tune.num_samples=0",
    ]
    cfg = load_config(DEMO_CONFIG, overrides)
    data = ingest.run(cfg, root / "data").output_dir
    loaded = load_model(cfg.model)
    folders = []
    for name, n, seed in (("short", 4, 1), ("long", 8, 2)):
        run_cfg = load_config(DEMO_CONFIG, [*overrides, f"prompt.num_virtual_tokens={n}", f"train.seed={seed}"])
        tr = train.run(run_cfg, loaded, ds.read_split(data, "train"), ds.read_split(data, "eval"), root / name / "train")
        outcome = TrainOutcome("in-process", tr.output_dir, (tr.adapter_dir,), run_cfg, tr.history, tr.summary())
        folders.append(evaluate.run(run_cfg, loaded, data, outcome, root / name / "artifact").artifact_dir)
    manifest = json.loads((folders[0] / "run_manifest.json").read_text())
    return Trained(folders[0], folders[1], cfg.task.name, manifest["base_model"]["name"].lower())


@pytest.fixture()
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four texts, alternately routed to prompts `a` and `b`; downloads are cached under tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "p": "ab"[i % 2]}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _predict(capsys: pytest.CaptureFixture[str], inputs: Path, *args: str) -> list[dict[str, object]]:
    capsys.readouterr()
    code = main(["predict", "--input", str(inputs), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def _same(got: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert [(g["text"], g["label"]) for g in got] == [(w["text"], w["label"]) for w in want]
    for g, w in zip(got, want, strict=True):
        assert isinstance(g["scores"], dict) and isinstance(w["scores"], dict)
        assert list(g["scores"].values()) == pytest.approx(list(w["scores"].values()), abs=1e-5)


def test_predict_resolves_champion_and_versions_on_s3(
    trained: Trained, s3_endpoint: str, s3_bucket: str, inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3Store(s3_bucket, "registry", endpoint_url=s3_endpoint)
    short, long = publish(store, trained.short), publish(store, trained.long)
    assert short.version != long.version and (short.task, short.base_model) == (long.task, long.base_model)
    promote(store, short.task, short.base_model, short.version)
    prefix = f"s3://{s3_bucket}/registry/{short.task}/{short.base_model}"
    endpoint = ["--s3-endpoint", s3_endpoint]

    local_short = _predict(capsys, inputs, "--artifact", f"a={trained.short}")
    local_long = _predict(capsys, inputs, "--artifact", f"a={trained.long}")
    _same(_predict(capsys, inputs, "--artifact", f"a={prefix}/champion", *endpoint), local_short)
    _same(_predict(capsys, inputs, "--artifact", f"a={prefix}/{long.version}", *endpoint), local_long)

    # Mixed batch: rows alternate between the champion (4 tokens) and a version (8 tokens).
    mixed = _predict(capsys, inputs, "--artifact", f"a={prefix}/champion", "--artifact", f"b={prefix}/{long.version}", "--prompt-column", "p", "--batch-size", "4", *endpoint)
    assert [r["prompt"] for r in mixed] == ["a", "b", "a", "b"]
    alone = [local_short[i] if i % 2 == 0 else local_long[i] for i in range(len(TEXTS))]
    _same(mixed, alone)

    # The alias follows the pointer: after promoting the other version, champion serves it.
    promote(store, long.task, long.base_model, long.version, gate=Gate(min_delta=0.0), force=True, reason="test")
    _same(_predict(capsys, inputs, "--artifact", f"a={prefix}/champion", *endpoint), local_long)


def test_predict_resolves_a_local_registry_champion(trained: Trained, tmp_path: Path, inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(tmp_path / "registry")
    pub = publish(store, trained.long)
    promote(store, pub.task, pub.base_model, pub.version)
    champion = tmp_path / "registry" / pub.task / pub.base_model / "champion"
    _same(_predict(capsys, inputs, "--artifact", f"a={champion}"), _predict(capsys, inputs, "--artifact", f"a={trained.long}"))


def test_predict_explains_a_missing_champion_or_version(
    trained: Trained, s3_endpoint: str, s3_bucket: str, inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = publish(S3Store(s3_bucket, "registry", endpoint_url=s3_endpoint), trained.short)
    prefix = f"s3://{s3_bucket}/registry/{pub.task}/{pub.base_model}"
    for ref, fragment in (
        ("champion", "has no champion yet"),
        ("0123456789abcdef", f"published versions: {pub.version}"),
        ("latest", "not a registry version id"),
    ):
        assert main(["predict", "--input", str(inputs), "--artifact", f"{prefix}/{ref}", "--s3-endpoint", s3_endpoint]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
    assert main(["predict", "--input", str(inputs), "--artifact", str(inputs.parent / "nowhere" / "champion")]) == 2
    assert "not found" in capsys.readouterr().err
