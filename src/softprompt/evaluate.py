"""Evaluate (`softprompt evaluate`): the tuned prompt against zero-shot and few-shot baselines.

All methods are scored on the same split with the same template and label words. The result is the
artifact folder that `publish` pushes: the adapter files, `metrics.json`, `run_manifest.json` and a
self-contained `report.html`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softprompt import dataset as ds
from softprompt.config import JobConfig
from softprompt.demos import (
    cost_tokens,
    demonstration_ids,
    fixed_demonstrations,
    sentence_embeddings,
    similar_demonstrations,
)
from softprompt.manifest import run_manifest
from softprompt.metrics import (
    SIGNIFICANCE_LEVEL,
    SIGNIFICANCE_TEST,
    ClassificationMetrics,
    Comparison,
    bootstrap_ci,
    classification_metrics,
    compare,
    verdict_sentence,
)
from softprompt.modeling import LoadedModel
from softprompt.outcome import TrainOutcome
from softprompt.prompts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_prompt_embeddings
from softprompt.report import ReportInputs, write_report
from softprompt.scoring import (
    calibration_offsets,
    few_shot_text,
    score_split,
    shared_prefix,
    text_embeds,
    to_probs,
)
from softprompt.tasks import Verbalizer, build_verbalizer

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.safetensors"
"""Written when a prompt ensemble wins: every member's `[n, d]` prompt, keys `member_<i>`."""

METHOD_NAMES = {"tuned": "tuned prompt", "ensemble": "prompt ensemble", "zero_shot": "zero-shot", "few_shot": "few-shot"}


@dataclass(frozen=True)
class EvaluateResult:
    """What `run` produced."""

    artifact_dir: Path
    results: dict[str, ClassificationMetrics]
    primary_metric: str
    split: str
    beats_baselines: bool
    verdict: str
    metrics: dict[str, Any]

    def table(self) -> str:
        """A plain-text results table (one row per method)."""
        if self.metrics.get("task_kind") == "generation":
            lines = [f"{'method':<16}{'exact match':>12}{'target loss':>12}", "-" * 40]
            for name in ("tuned", "zero_shot", "few_shot"):
                if name in self.metrics:
                    m = self.metrics[name]
                    lines.append(f"{METHOD_NAMES[name]:<16}{m['exact_match'] * 100:>11.1f}%{m['loss']:>12.4f}")
            return "\n".join(lines)
        costs = self.metrics.get("cost_tokens_per_row") or {}
        lines = [f"{'method':<22}{'accuracy':>10}{'macro-F1':>10}{'ECE':>8}{'tokens/row':>12}", "-" * 62]
        for name, m in self.results.items():
            ece = f"{m.ece:.3f}" if m.ece is not None else "-"
            cost = f"{costs[name]:.0f}" if name in costs else "-"
            lines.append(f"{_method_name(name):<22}{m.accuracy * 100:>9.1f}%{m.macro_f1 * 100:>9.1f}%{ece:>8}{cost:>12}")
        return "\n".join(lines)


def run(
    cfg: JobConfig,
    loaded: LoadedModel,
    data_dir: str | Path,
    outcome: TrainOutcome,
    artifact_dir: str | Path,
    *,
    progress: bool = False,
) -> EvaluateResult:
    """Score the trained prompt(s) and the baselines, and write the artifact folder.

    Args:
        cfg: The job configuration; its `evaluate` section says how to evaluate. Everything else
            (task, prompt, ...) comes from `outcome.config`, the configuration the prompt trained with.
        loaded: The frozen base model.
        data_dir: The prepared dataset (ingest output).
        outcome: What training produced: the winners (the first is the single best; with more
            than one, their ensemble of mean label log-probabilities is scored too), the history
            for the report's curves and the summary the run manifest records.
        artifact_dir: Output folder (the adapter files of the winner are copied in).
        progress: Show progress bars.
    """
    cfg = dataclasses.replace(outcome.config, evaluate=cfg.evaluate)
    adapter_dirs = list(outcome.winners)
    history, train_summary = outcome.history, outcome.summary
    ev = cfg.evaluate
    split_name = ev.split if (ev.split == "eval" or ds.has_split(data_dir, "test")) else "eval"
    rows = ds.read_split(data_dir, split_name)
    train_rows = ds.read_split(data_dir, "train")
    dataset_manifest = ds.read_manifest(data_dir)
    if cfg.task.kind == "generation":
        return _run_generation(cfg, loaded, rows, train_rows, adapter_dirs[0], Path(artifact_dir), split_name, dataset_manifest, train_summary)
    model, tok = loaded.model, loaded.tokenizer
    verbalizer = build_verbalizer(cfg.task, tok)
    labels = list(verbalizer.labels)
    bar = _bar(progress, len(rows) * (len(adapter_dirs) + len(ev.baselines) + max(0, len(ev.few_shot_strategies) - 1)))
    tick = bar.update if bar is not None else None

    def score(embeds: torch.Tensor | None) -> np.ndarray:
        return score_split(model, shared_prefix(model, embeds), rows.input_ids, verbalizer, tok.pad_token_id, ev.batch_size, tick)

    scores: dict[str, np.ndarray] = {}
    members = [load_prompt_embeddings(d).to(loaded.device) for d in adapter_dirs]
    prompt_scores = [score(e) for e in members]
    scores["tuned"] = prompt_scores[0]
    if len(prompt_scores) > 1:
        scores["ensemble"] = np.mean([_log_normalize(s) for s in prompt_scores], axis=0)
    if "zero_shot" in ev.baselines:
        zs = score(None)
        if ev.calibrate_zero_shot:
            zs = zs - calibration_offsets(model, shared_prefix(model, None), tok, cfg.task.template, verbalizer)
        scores["zero_shot"] = zs
    demo_text = ""
    lengths = [len(ids) for ids in rows.input_ids]
    costs = {"tuned": cost_tokens(int(members[0].shape[0]), lengths), "zero_shot": cost_tokens(0, lengths),
             "ensemble": sum(cost_tokens(int(e.shape[0]), lengths) for e in members)}  # each member is a pass of its own
    if "few_shot" in ev.baselines:
        k = ev.few_shot_k or max(4, len(labels))
        embedded: list[np.ndarray] = []  # the training rows' embeddings, made once for `similar` and `diverse`

        def train_embeddings() -> np.ndarray:
            if not embedded:
                embedded.append(sentence_embeddings(model, train_rows.input_ids, tok.pad_token_id))
            return embedded[0]

        for n, strategy in enumerate(ev.few_shot_strategies):
            name = "few_shot" if n == 0 else f"few_shot_{strategy}"
            fs, text, costs[name] = _few_shot(cfg, loaded, rows, lengths, train_rows, train_embeddings, verbalizer, strategy, k, score, tick)
            demo_text = demo_text or text
            scores[name] = fs
    if bar is not None:
        bar.close()

    results = {name: _metrics(s, rows, labels, ev.ece_bins) for name, s in scores.items()}
    # The ensemble wins only if it is significantly better than the best single prompt on the eval
    # split: choosing on the split we report would flatter it.
    winner, selection = ("tuned", None)
    if len(members) > 1:
        winner, selection = _choose_on_eval(cfg, loaded, data_dir, members, verbalizer)
    verdict, beats, comparisons = _verdict(results, scores, rows, winner, ev.primary_metric)
    fingerprint = eval_fingerprint(rows, cfg.task.template, labels)
    metrics = {
        "primary_metric": ev.primary_metric,
        "split": split_name,
        "eval_fingerprint": fingerprint,
        "winner": winner,
        "beats_baselines": beats,
        "verdict": verdict,
        "significance": {"test": SIGNIFICANCE_TEST, "alpha": SIGNIFICANCE_LEVEL},
        "comparisons": comparisons,
        "few_shot_prefix": demo_text,
        "few_shot_strategies": list(ev.few_shot_strategies) if "few_shot" in ev.baselines else [],
        "cost_tokens_per_row": {name: round(c, 1) for name, c in costs.items() if name in scores},
        "ensemble_selection": selection,
        **{name: m.to_dict() for name, m in results.items()},
    }
    # The published prompt is the winner's score: an ensemble publishes its best member's adapter
    # and records the ensemble's members (serving several prompts is what `predict` does).
    metrics["tuned"] = results[winner].to_dict() | {"method": winner}
    out = Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(Path(adapter_dirs[0]) / name, out / name)
    if winner == "ensemble":
        # One flat file (registry versions hold only regular files); `predict` averages the members.
        from safetensors.torch import save_file

        save_file({f"member_{i}": e.detach().float().cpu().contiguous() for i, e in enumerate(members)}, str(out / ENSEMBLE_FILE))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    manifest = _manifest(cfg, loaded, dataset_manifest, train_summary)
    (out / "run_manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    write_report(
        ReportInputs(
            title=f"softprompt: {cfg.task.name}",
            task=cfg.task.name,
            labels=labels,
            primary_metric=ev.primary_metric,
            results=results,
            history=history or [],
            manifest=manifest,
            verdict=verdict,
            comparisons=comparisons,
            intervals={name: bootstrap_ci((s.argmax(1) == np.asarray(rows.label_ids)).tolist()) for name, s in scores.items()},
            notes=[f"Evaluated on the {split_name} split ({len(rows)} rows, fingerprint {fingerprint[:12]}).",
                   "Token positions the model runs per scored row (a shared prefix counted once): "
                   + ", ".join(f"{_method_name(n)} {c:.0f}" for n, c in costs.items() if n in scores) + "."],
        ),
        out / "report.html",
    )
    return EvaluateResult(out, results, ev.primary_metric, split_name, beats, verdict, metrics)


def eval_fingerprint(rows: ds.Split, template: str, labels: list[str]) -> str:
    """SHA-256 of what was evaluated: the rows' texts and labels, the template and the label set."""
    h = hashlib.sha256()
    h.update(json.dumps({"template": template, "labels": labels}).encode())
    for text, label in zip(rows.texts, rows.labels, strict=True):
        h.update(json.dumps([text, label]).encode())
    return h.hexdigest()


def promotion_condition(metrics: dict[str, Any], *, require_significance: bool) -> bool:
    """Whether an evaluation lets its prompt be promoted (the pipeline's condition on Promote).

    Args:
        metrics: `metrics.json`'s content.
        require_significance: Demand that the prompt be significantly better than every baseline
            (`beats_baselines`); otherwise a higher score than each baseline is enough.
    """
    if require_significance:
        return bool(metrics.get("beats_baselines"))
    return all(float(c.get("delta_points", 0.0)) > 0 for c in (metrics.get("comparisons") or {}).values())


# --------------------------------------------------------------------------------------------------


def _run_generation(
    cfg: JobConfig,
    loaded: LoadedModel,
    rows: ds.Split,
    train_rows: ds.Split,
    adapter_dir: Path,
    out: Path,
    split_name: str,
    dataset_manifest: dict[str, Any],
    train_summary: dict[str, Any] | None,
) -> EvaluateResult:
    from softprompt.evaluate_generation import evaluate_generation

    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(cfg, loaded, dataset_manifest, train_summary)
    (out / "run_manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    fingerprint = eval_fingerprint(rows, cfg.task.template, [])
    metrics = evaluate_generation(cfg, loaded, rows, train_rows, adapter_dir, out, split_name, fingerprint, manifest)
    return EvaluateResult(out, {}, "accuracy", split_name, metrics["beats_baselines"], metrics["verdict"], metrics)


def _manifest(cfg: JobConfig, loaded: LoadedModel, dataset_manifest: dict[str, Any], train_summary: dict[str, Any] | None) -> dict[str, Any]:
    return run_manifest(
        cfg,
        dataset={"fingerprint": dataset_manifest.get("fingerprint"), "counts": dataset_manifest.get("counts"), "sources": dataset_manifest.get("sources")},
        base_model=loaded.identity,
        train=train_summary,
    )


def _choose_on_eval(
    cfg: JobConfig, loaded: LoadedModel, data_dir: str | Path, members: list[torch.Tensor], verbalizer: Verbalizer
) -> tuple[str, dict[str, Any]]:
    rows = ds.read_split(data_dir, "eval").sample(cfg.train.eval_max_rows, cfg.data.split_seed)  # the rows the trials were ranked on
    model, tok = loaded.model, loaded.tokenizer
    each = [score_split(model, shared_prefix(model, e), rows.input_ids, verbalizer, tok.pad_token_id, cfg.evaluate.batch_size) for e in members]
    labels = list(verbalizer.labels)
    metric = cfg.evaluate.primary_metric
    singles = [getattr(_metrics(s, rows, labels, cfg.evaluate.ece_bins), metric) for s in each]
    ensemble = np.mean([_log_normalize(s) for s in each], axis=0)
    ens = getattr(_metrics(ensemble, rows, labels, cfg.evaluate.ece_bins), metric)
    # More than noise: the ensemble must score higher and be significantly better than the best
    # single prompt on these rows; a tie or a lucky row or two keeps the single prompt.
    y = np.asarray(rows.label_ids)
    test = compare(METHOD_NAMES["tuned"], ensemble.argmax(1) == y, each[0].argmax(1) == y, (ens - singles[0]) * 100)
    winner = "ensemble" if test.outcome == "better" else "tuned"
    return winner, {
        "split": "eval", "rows": len(rows), "metric": metric, "members": singles, "ensemble": ens, "winner": winner,
        "mcnemar_p": test.p_value, "rule": f"the ensemble wins only when significantly better than the best prompt ({SIGNIFICANCE_TEST}, p < {SIGNIFICANCE_LEVEL:g})",
    }


def _log_normalize(scores: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.log(to_probs(scores) + 1e-12)
    return result


def _metrics(scores: np.ndarray, rows: ds.Split, labels: list[str], bins: int) -> ClassificationMetrics:
    slices = rows.slices if any(s is not None for s in rows.slices) else None
    return classification_metrics(
        rows.label_ids, scores.argmax(1).tolist(), to_probs(scores), labels,
        slices=[str(s) for s in slices] if slices else None, ece_bins=bins,
    )


def _verdict(
    results: dict[str, ClassificationMetrics], scores: dict[str, np.ndarray], rows: ds.Split, winner: str, metric: str
) -> tuple[str, bool, dict[str, Any]]:
    y = np.asarray(rows.label_ids)
    ok_w = scores[winner].argmax(1) == y
    mine = getattr(results[winner], metric)
    lo, hi = bootstrap_ci(ok_w.tolist())
    found: dict[str, Comparison] = {}
    baselines = [n for n in ("zero_shot", "few_shot") if n in results] + [n for n in results if n.startswith("few_shot_")]
    for name in baselines:
        delta = (mine - getattr(results[name], metric)) * 100
        found[name] = compare(_method_name(name), ok_w, scores[name].argmax(1) == y, delta)
    # "Beats" only when significantly better than every baseline (nothing to beat counts as beaten).
    beats = all(c.outcome == "better" for c in found.values())
    result = f"{metric} {mine * 100:.1f}% (95% CI {lo * 100:.1f}-{hi * 100:.1f})"
    verdict = verdict_sentence(METHOD_NAMES[winner], result, list(found.values()))
    return verdict, beats, {name: c.to_dict() for name, c in found.items()}


def _method_name(name: str) -> str:
    """`few_shot_similar` -> "few-shot (similar)"; the fixed names from METHOD_NAMES."""
    if name in METHOD_NAMES:
        return METHOD_NAMES[name]
    return f"few-shot ({name.removeprefix('few_shot_')})"


def _few_shot(cfg: JobConfig, loaded: LoadedModel, rows: ds.Split, lengths: list[int], train_rows: ds.Split,
              train_embeddings: Callable[[], np.ndarray], verbalizer: Verbalizer, strategy: str, k: int, score: Any,
              tick: Any) -> tuple[np.ndarray, str, float]:
    """The few-shot baseline with `strategy`'s demonstrations: label scores, the prefix text (a
    fixed strategy's; "" for `similar`) and the token positions per scored row (`lengths`: each
    scored row's input tokens)."""
    model, tok = loaded.model, loaded.tokenizer
    labels = list(verbalizer.labels)
    words = [cfg.task.verbalizer[label][0] for label in labels]
    train_emb = train_embeddings() if strategy in ("similar", "diverse") else None
    if strategy == "similar":
        assert train_emb is not None
        nearest = similar_demonstrations(train_emb, sentence_embeddings(model, rows.input_ids, tok.pad_token_id), k)
        word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
        sep = tok("\n\n", add_special_tokens=False)["input_ids"]
        prefixes = [demonstration_ids(train_rows, idx, word_ids, sep) for idx in nearest]
        seqs = [p + list(ids) for p, ids in zip(prefixes, rows.input_ids, strict=True)]
        fs = score_split(model, shared_prefix(model, None), seqs, verbalizer, tok.pad_token_id, cfg.evaluate.batch_size, tick)
        return fs, "", cost_tokens(0, lengths, per_input_prefix=[len(p) for p in prefixes])
    demos = fixed_demonstrations(strategy, train_rows, num_labels=len(labels), k=k, seed=cfg.train.seed, embeddings=train_emb)
    text = few_shot_text(train_rows, demos, cfg.task.template, words)
    prefix_embeds = text_embeds(model, tok, text)
    fs = score(prefix_embeds)
    if cfg.evaluate.calibrate:
        fs = fs - calibration_offsets(model, shared_prefix(model, prefix_embeds), tok, cfg.task.template, verbalizer)
    return fs, text, cost_tokens(int(prefix_embeds.shape[0]), lengths)


def _bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="row", dynamic_ncols=True)
