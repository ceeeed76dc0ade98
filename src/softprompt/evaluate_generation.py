"""Evaluate generation tasks: exact match and target loss, tuned prompt vs zero-shot and few-shot.

Same contract as classification (`softprompt.evaluate.run` dispatches here): an artifact folder with
the adapter files, `metrics.json` (the primary metric `accuracy` is exact-match accuracy),
`run_manifest.json` and a self-contained `report.html`.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import torch

from softprompt import dataset as ds
from softprompt.config import JobConfig
from softprompt.engine import Prefix, greedy_generate, target_loss
from softprompt.metrics import SIGNIFICANCE_LEVEL, SIGNIFICANCE_TEST, compare, verdict_sentence
from softprompt.modeling import LoadedModel
from softprompt.prompts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_prompt_embeddings
from softprompt.scoring import text_embeds
from softprompt.tasks import render


def evaluate_generation(
    cfg: JobConfig,
    loaded: LoadedModel,
    rows: ds.Split,
    train_rows: ds.Split,
    adapter_dir: Path,
    out: Path,
    split_name: str,
    fingerprint: str,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Score every method on `rows`, write the artifact folder, and return `metrics.json`'s content."""
    model, tok = loaded.model, loaded.tokenizer
    prefixes: dict[str, torch.Tensor | None] = {"tuned": load_prompt_embeddings(adapter_dir).to(loaded.device)}
    if "zero_shot" in cfg.evaluate.baselines:
        prefixes["zero_shot"] = None
    demo_text = ""
    if "few_shot" in cfg.evaluate.baselines and len(train_rows):
        k = min(cfg.evaluate.few_shot_k or 4, len(train_rows))
        demo_text = "".join(render(cfg.task.template, train_rows.texts[i]) + " " + train_rows.labels[i] + "\n\n" for i in range(k))
        prefixes["few_shot"] = text_embeds(model, tok, demo_text)
    results: dict[str, dict[str, Any]] = {}
    correct: dict[str, list[bool]] = {}
    samples: list[dict[str, str]] = []
    for name, prefix in prefixes.items():
        generated, loss = _generate_and_score(cfg, loaded, prefix, rows)
        hits = [_normalize(g) == _normalize(t) for g, t in zip(generated, rows.labels, strict=True)]
        em = sum(hits) / max(1, len(hits))
        correct[name] = hits
        results[name] = {"accuracy": em, "exact_match": em, "loss": loss, "n": len(rows)}
        if name == "tuned":
            samples = [{"input": rows.texts[i], "target": rows.labels[i], "generated": generated[i]} for i in range(min(10, len(rows)))]
    mine = results["tuned"]["accuracy"]
    found = {
        name: compare(name.replace("_", "-"), correct["tuned"], correct[name], (mine - r["accuracy"]) * 100)
        for name, r in results.items()
        if name != "tuned"
    }
    beats = all(c.outcome == "better" for c in found.values())
    verdict = verdict_sentence("tuned prompt", f"exact match {mine * 100:.1f}%", list(found.values()))
    metrics = {
        "primary_metric": "accuracy",
        "task_kind": "generation",
        "split": split_name,
        "eval_fingerprint": fingerprint,
        "winner": "tuned",
        "beats_baselines": beats,
        "verdict": verdict,
        "significance": {"test": SIGNIFICANCE_TEST, "alpha": SIGNIFICANCE_LEVEL},
        "comparisons": {name: c.to_dict() for name, c in found.items()},
        "few_shot_prefix": demo_text,
        "samples": samples,
        **results,
    }
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(adapter_dir / fname, out / fname)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.html").write_text(_report(cfg, metrics, manifest), encoding="utf-8")
    return metrics


def _generate_and_score(cfg: JobConfig, loaded: LoadedModel, prefix: torch.Tensor | None, rows: ds.Split) -> tuple[list[str], float]:
    model, tok = loaded.model, loaded.tokenizer
    bs = cfg.evaluate.batch_size
    generated: list[str] = []
    total = 0.0
    with torch.inference_mode():
        for s in range(0, len(rows), bs):
            idx = list(range(s, min(len(rows), s + bs)))
            inputs = [rows.input_ids[i] for i in idx]
            outs = greedy_generate(model, prefix, inputs, max_new_tokens=cfg.task.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            generated += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
            pre = Prefix.none() if prefix is None else Prefix(embeds=prefix)
            total += float(target_loss(model, pre, inputs, [rows.target_ids[i] for i in idx], tok.pad_token_id)) * len(idx)
    return generated, total / max(1, len(rows))


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def _report(cfg: JobConfig, metrics: dict[str, Any], manifest: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(n)}</td><td>{m['exact_match'] * 100:.1f}%</td><td>{m['loss']:.4f}</td></tr>"
        for n, m in metrics.items()
        if isinstance(m, dict) and "exact_match" in m
    )
    samples = "".join(
        f"<tr><td>{e(s['input'])}</td><td>{e(s['target'])}</td><td>{e(s['generated'])}</td></tr>" for s in metrics["samples"]
    )
    config = e(json.dumps(manifest.get("config", {}), indent=1))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>softprompt: "
        f"{e(cfg.task.name)}</title><style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px}}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>softprompt: {e(cfg.task.name)} (generation)</h1><p><b>{e(metrics['verdict'])}</b></p>"
        f"<h2>Methods on the {e(metrics['split'])} split</h2><table><tr><th>method</th><th>exact match</th><th>target loss</th></tr>{rows}</table>"
        f"<h2>Samples (tuned prompt)</h2><table><tr><th>input</th><th>target</th><th>generated</th></tr>{samples}</table>"
        f"<h2>Provenance</h2><p>git {e(str(manifest.get('git', {}).get('sha')))}, base model {e(str(manifest.get('base_model', {}).get('name')))}</p>"
        f"<details><summary>resolved config</summary><pre>{config}</pre></details></body></html>"
    )
