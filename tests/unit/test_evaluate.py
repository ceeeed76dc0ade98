"""Evaluate: the artifact folder's exact contents, metrics, provenance, baselines, slices, ensembles."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from softprompt import dataset as ds
from softprompt import evaluate, ingest, train
from softprompt.config import JobConfig, replace, to_dict
from softprompt.modeling import LoadedModel, weights_sha256
from softprompt.outcome import TrainOutcome
from softprompt.scoring import calibration_offsets, choose_demonstrations, shared_prefix, text_embeds
from softprompt.tasks import build_verbalizer

ARTIFACT_FILES = {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_manifest.json", "report.html"}
DemoCfg = Callable[..., JobConfig]


def _adapter(cfg: JobConfig, loaded: LoadedModel, data_dir: Path, out: Path, seed: int = 0) -> Path:
    return train.run(replace(cfg, [f"train.seed={seed}"]), loaded, ds.read_split(data_dir, "train"), None, out).adapter_dir


def _outcome(cfg: JobConfig, *adapters: Path, history: list[dict[str, float]] | None = None, summary: dict[str, int] | None = None) -> TrainOutcome:
    """What a trainer would hand evaluate: these adapters, best first, trained with `cfg`."""
    return TrainOutcome("in-process", adapters[0].parent, tuple(adapters), cfg, list(history or []), dict(summary or {"steps": 2}))


@pytest.fixture()
def evaluated(tiny: LoadedModel, demo_cfg: DemoCfg, demo_data: Path, tmp_path: Path) -> tuple[JobConfig, evaluate.EvaluateResult]:
    cfg = demo_cfg("train.steps=2", "train.eval_every=0")
    adapter = _adapter(cfg, tiny, demo_data, tmp_path / "train")
    result = evaluate.run(cfg, tiny, demo_data, _outcome(cfg, adapter, history=[{"step": 1, "train_loss": 1.0}]), tmp_path / "artifact")
    return cfg, result


def test_artifact_folder_holds_exactly_the_published_files(evaluated: tuple[JobConfig, evaluate.EvaluateResult]) -> None:
    _, result = evaluated
    assert {p.name for p in result.artifact_dir.iterdir()} == ARTIFACT_FILES
    assert result.split == "test"
    html = (result.artifact_dir / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "support-intent" in html


def test_metrics_have_every_method_and_the_fingerprint(evaluated: tuple[JobConfig, evaluate.EvaluateResult], demo_data: Path) -> None:
    cfg, result = evaluated
    metrics = json.loads((result.artifact_dir / "metrics.json").read_text())
    test_rows = ds.read_split(demo_data, "test")
    for method in ("tuned", "zero_shot", "few_shot"):
        m = metrics[method]
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
        assert len(m["confusion"]) == len(cfg.task.labels) and sum(map(sum, m["confusion"])) == len(test_rows)
        assert m["labels"] == cfg.task.labels and m["ece"] is not None
    assert metrics["eval_fingerprint"] == evaluate.eval_fingerprint(test_rows, cfg.task.template, cfg.task.labels)
    assert re.fullmatch(r"[0-9a-f]{64}", metrics["eval_fingerprint"])
    assert metrics["primary_metric"] == "accuracy" and metrics["split"] == "test"
    assert metrics["tuned"]["method"] == "tuned" and isinstance(metrics["beats_baselines"], bool)
    assert set(metrics["comparisons"]) == {"zero_shot", "few_shot"}
    assert result.verdict == metrics["verdict"] and "zero-shot" in result.verdict
    # Honest wording: "beats" only when significantly better than every baseline (McNemar's exact test).
    assert metrics["significance"] == {"test": "McNemar's exact test", "alpha": 0.05}
    assert metrics["beats_baselines"] == all(c["outcome"] == "better" for c in metrics["comparisons"].values())
    assert ("beats" in result.verdict) == metrics["beats_baselines"]
    for name, c in metrics["comparisons"].items():
        assert {"delta_points", "mcnemar_p", "outcome", "significant"} <= set(c)
        shown = {"better": "significantly better than", "worse": "significantly worse than", "not_significant": "not significantly better than"}
        assert f"{shown[c['outcome']]} {evaluate.METHOD_NAMES[name]} ({c['delta_points']:+.1f} points, p={c['mcnemar_p']:.2g})" in result.verdict
    assert "tuned prompt" in result.table() and "few-shot" in result.table()


def test_run_manifest_records_provenance(evaluated: tuple[JobConfig, evaluate.EvaluateResult], demo_data: Path, tiny_model_dir: Path) -> None:
    cfg, result = evaluated
    manifest = json.loads((result.artifact_dir / "run_manifest.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["sha"]) and isinstance(manifest["git"]["dirty"], bool)
    for package in ("softprompt", "python", "torch", "transformers", "peft", "safetensors"):
        assert manifest["packages"][package], package
    assert manifest["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert manifest["dataset"]["fingerprint"] == ds.read_manifest(demo_data)["fingerprint"]
    assert manifest["dataset"]["counts"] == ds.read_manifest(demo_data)["counts"]
    assert manifest["base_model"]["weights_sha256"] == weights_sha256(tiny_model_dir)
    assert manifest["base_model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["train"] == {"steps": 2}


def test_few_shot_demonstrations_cover_every_label(evaluated: tuple[JobConfig, evaluate.EvaluateResult], demo_data: Path) -> None:
    cfg, result = evaluated
    prefix = json.loads((result.artifact_dir / "metrics.json").read_text())["few_shot_prefix"]
    shown = re.findall(r"The message is about( \w+)", prefix)
    assert sorted(shown) == sorted(cfg.task.verbalizer[label][0] for label in cfg.task.labels)

    train_rows = ds.read_split(demo_data, "train")
    for k in (3, 7, 10):
        chosen = choose_demonstrations(train_rows, 7, k, seed=0)
        labels = [train_rows.label_ids[i] for i in chosen]
        assert len(chosen) == len(set(chosen)) == k
        assert len(set(labels)) == min(k, 7)  # every label before any label twice
    assert choose_demonstrations(train_rows, 7, 7, seed=0) == choose_demonstrations(train_rows, 7, 7, seed=0)


def test_calibration_changes_scores(tiny: LoadedModel, demo_cfg: DemoCfg, demo_data: Path, tmp_path: Path) -> None:
    cfg = demo_cfg("train.steps=2", "train.eval_every=0", "evaluate.baselines=[few_shot]")
    vb = build_verbalizer(cfg.task, tiny.tokenizer)
    prefix = shared_prefix(tiny.model, text_embeds(tiny.model, tiny.tokenizer, "Customer message: hi\nThe message is about billing\n\n"))
    offsets = calibration_offsets(tiny.model, prefix, tiny.tokenizer, cfg.task.template, vb)
    assert offsets.shape == (7,) and np.all(offsets < 0)
    assert float(np.ptp(offsets)) > 1e-4  # not a constant shift: calibrated predictions can differ

    adapter = _adapter(cfg, tiny, demo_data, tmp_path / "train")
    on = evaluate.run(cfg, tiny, demo_data, _outcome(cfg, adapter), tmp_path / "on")
    off = evaluate.run(demo_cfg("evaluate.baselines=[few_shot]", "evaluate.calibrate=false"), tiny, demo_data, _outcome(cfg, adapter), tmp_path / "off")
    assert on.metrics["few_shot"] != off.metrics["few_shot"]
    assert on.metrics["tuned"] == off.metrics["tuned"]
    assert "zero_shot" not in on.metrics


def _with_slices(tmp_path: Path) -> Path:
    with (Path(__file__).resolve().parents[2] / "src/softprompt/demo/train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:210]
    path = tmp_path / "sliced.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "channel"])
        for i, r in enumerate(rows):
            w.writerow([r["text"], r["label"], ("email", "chat", "phone")[i % 3]])
    return path


def test_slices_are_reported_when_the_data_has_a_slice_column(tiny: LoadedModel, demo_cfg: DemoCfg, tmp_path: Path) -> None:
    cfg = demo_cfg(f"data.train={_with_slices(tmp_path)}", "data.test=null", "data.slice_column=channel", "evaluate.baselines=[zero_shot]", "train.steps=2", "train.eval_every=0")
    data_dir = ingest.run(cfg, tmp_path / "data", tokenizer=tiny.tokenizer).output_dir
    adapter = _adapter(cfg, tiny, data_dir, tmp_path / "train")
    result = evaluate.run(cfg, tiny, data_dir, _outcome(cfg, adapter), tmp_path / "artifact")
    assert result.split == "eval"  # no test file: the eval split is reported
    for method in ("tuned", "zero_shot"):
        m = result.metrics[method]
        assert set(m["slices"]) == {"email", "chat", "phone"}
        assert sum(s["n"] for s in m["slices"].values()) == m["n"]
        assert m["slice_gap"] == pytest.approx(max(s["accuracy"] for s in m["slices"].values()) - min(s["accuracy"] for s in m["slices"].values()))


def test_no_slices_without_a_slice_column(evaluated: tuple[JobConfig, evaluate.EvaluateResult]) -> None:
    assert evaluated[1].metrics["tuned"]["slices"] is None


def test_an_ensemble_of_two_adapters_is_scored(tiny: LoadedModel, demo_cfg: DemoCfg, demo_data: Path, tmp_path: Path) -> None:
    cfg = demo_cfg("train.steps=2", "train.eval_every=0", "evaluate.baselines=[]")
    a = _adapter(cfg, tiny, demo_data, tmp_path / "a")
    b = _adapter(cfg, tiny, demo_data, tmp_path / "b", seed=1)
    result = evaluate.run(cfg, tiny, demo_data, _outcome(cfg, a, b), tmp_path / "artifact")
    assert set(result.results) == {"tuned", "ensemble"}
    assert result.metrics["winner"] in ("tuned", "ensemble")
    assert result.metrics["tuned"]["method"] == result.metrics["winner"]
    selection = result.metrics["ensemble_selection"]
    # The winner is chosen on the eval split, not on the split the report shows.
    assert selection["split"] == "eval" and selection["winner"] == result.metrics["winner"]
    # More than noise: only a significantly better ensemble (McNemar on the eval rows) replaces the single prompt.
    significant = selection["ensemble"] > selection["members"][0] and selection["mcnemar_p"] < 0.05
    assert significant == (result.metrics["winner"] == "ensemble") and "significantly better" in selection["rule"]
    # The published adapter is the first (single best) prompt; an ensemble winner ships every
    # member in one flat file (registry versions hold regular files only).
    assert (result.artifact_dir / "adapter_model.safetensors").read_bytes() == (a / "adapter_model.safetensors").read_bytes()
    ensemble_file = result.artifact_dir / "ensemble.safetensors"
    assert ensemble_file.is_file() == (result.metrics["winner"] == "ensemble")
    if ensemble_file.is_file():
        from safetensors.torch import load_file

        members = load_file(str(ensemble_file))
        for i, member in enumerate((a, b)):
            assert torch.equal(members[f"member_{i}"], load_file(str(member / "adapter_model.safetensors"))["prompt_embeddings"])


def test_predict_serves_a_winning_ensemble_as_the_mean_of_its_members(
    tiny: LoadedModel, demo_cfg: DemoCfg, demo_data: Path, tmp_path: Path
) -> None:
    from softprompt import predict
    from softprompt.prompts import load_prompt_embeddings
    from softprompt.scoring import score_split, shared_prefix, to_probs
    from softprompt.tasks import build_verbalizer

    cfg = demo_cfg("train.steps=2", "train.eval_every=0", "evaluate.baselines=[]")
    a = _adapter(cfg, tiny, demo_data, tmp_path / "a")
    b = _adapter(cfg, tiny, demo_data, tmp_path / "b", seed=1)
    result = evaluate.run(cfg, tiny, demo_data, _outcome(cfg, a, b), tmp_path / "artifact")
    # Force the ensemble path whatever the tiny model scored, to test serving it.
    metrics = json.loads((result.artifact_dir / "metrics.json").read_text())
    metrics["winner"] = "ensemble"
    (result.artifact_dir / "metrics.json").write_text(json.dumps(metrics))
    if not (result.artifact_dir / "ensemble.safetensors").is_file():
        from safetensors.torch import save_file

        save_file({f"member_{i}": load_prompt_embeddings(m) for i, m in enumerate((a, b))}, str(result.artifact_dir / "ensemble.safetensors"))
    table = predict.PromptTable(tiny)
    table.add("ens", result.artifact_dir)
    texts = ["my card was charged twice", "where is my parcel"]
    preds = predict.predict_rows(table, [("ens", t) for t in texts])
    vb = build_verbalizer(cfg.task, tiny.tokenizer)
    seqs = [predict.encode_input(tiny.tokenizer, cfg.task.template, t) for t in texts]
    each = [np.log(to_probs(score_split(tiny.model, shared_prefix(tiny.model, load_prompt_embeddings(m)), seqs, vb, tiny.tokenizer.pad_token_id))) for m in (a, b)]
    expected = to_probs(np.mean(each, axis=0))
    for pred, row in zip(preds, expected, strict=True):
        assert [pred.scores[label] for label in vb.labels] == pytest.approx(row.tolist(), abs=1e-5)


def test_every_few_shot_strategy_is_a_baseline_with_its_cost_and_the_verdict_weighs_them_all(
    tiny: LoadedModel, demo_cfg: DemoCfg, demo_data: Path, tmp_path: Path
) -> None:
    cfg = demo_cfg("train.steps=2", "train.eval_every=0", "evaluate.baselines=[few_shot]",
                   "evaluate.few_shot_strategies=[balanced, similar, diverse, random]")
    adapter = _adapter(cfg, tiny, demo_data, tmp_path / "train")
    metrics = evaluate.run(cfg, tiny, demo_data, _outcome(cfg, adapter), tmp_path / "artifact").metrics
    methods = ("few_shot", "few_shot_similar", "few_shot_diverse", "few_shot_random")
    assert set(metrics["comparisons"]) == set(methods) and metrics["few_shot_strategies"] == ["balanced", "similar", "diverse", "random"]
    assert all(0 <= metrics[m]["accuracy"] <= 1 for m in methods)
    cost = metrics["cost_tokens_per_row"]
    assert cost["tuned"] < cost["few_shot"] < cost["few_shot_similar"]  # a shared prefix is paid once, a per-input one by every row
    assert "few-shot (similar)" in metrics["verdict"] or metrics["beats_baselines"]
    with pytest.raises(Exception, match="few_shot_strategies"):
        demo_cfg("evaluate.few_shot_strategies=[nearest]")
