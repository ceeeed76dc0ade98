#!/usr/bin/env python3
"""GPU smoke test: a few training steps in bf16 on CUDA, checked against the CPU path, in one call.

    python benchmarks/gpu_smoke.py                        # tiny random Llama, then SmolLM2 if it loads
    python benchmarks/gpu_smoke.py --device cuda:0 --steps 6 --no-smollm2

For each model (a tiny random Llama built here, and SmolLM2-135M when `softprompt.modeling` can
load it on this machine) it:
1. trains `--steps` steps on the demo task on CPU (fp32) and checks the CPU path against itself:
   label scores through the cached shared prefix equal those of the prefix as embeddings;
2. when CUDA is present, trains the same steps on the GPU (bf16 frozen weights) with
   `torch.cuda.set_sync_debug_mode("warn")`, counting the host syncs it warns about, and checks
   the first step's loss and the CPU-trained prompt's label probabilities against the CPU run
   within `--tolerance`; prints throughput, `torch.cuda.max_memory_allocated` and process RSS.
Without CUDA it runs the CPU half and says that the GPU half was skipped (exit 0). Any mismatch
exits 1. It needs torch, transformers and peft only: no Ray, kfp or boto3 (run as a script, it
makes them unimportable so an import that creeps in fails here, not on the GPU machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CLUSTER_PACKAGES = ("ray", "kfp", "boto3", "botocore", "kubernetes")
if __name__ == "__main__":  # the GPU machine has none of them: make an import of one fail here too
    for _name in CLUSTER_PACKAGES:
        sys.modules.setdefault(_name, None)  # type: ignore[assignment]

from softprompt import train  # noqa: E402
from softprompt.config import ModelConfig, load_config  # noqa: E402
from softprompt.dataset import Split  # noqa: E402
from softprompt.engine import Prefix, cache_prefix, label_scores  # noqa: E402
from softprompt.errors import ModelError  # noqa: E402
from softprompt.modeling import LoadedModel, load_model  # noqa: E402
from softprompt.prompts import load_prompt_embeddings  # noqa: E402
from softprompt.tasks import build_verbalizer, encode_input  # noqa: E402
from softprompt.testing import build_tiny_model  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"
DEMO_TRAIN = ROOT / "src" / "softprompt" / "demo" / "train.csv"


@dataclass
class Check:
    """One model's results: figures to print and the mismatches found (empty: it passed)."""

    model: str
    figures: dict[str, Any] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="the GPU to check (cuda or cuda:N)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=32, help="training rows (and label-score rows)")
    ap.add_argument("--tiny-model", type=Path, help="a tiny model folder to use instead of building one")
    ap.add_argument("--no-smollm2", action="store_true", help="check the tiny model only")
    ap.add_argument("--tolerance", type=float, default=0.05, help="bf16 vs fp32: relative on the loss, absolute on probabilities")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and torch.device(args.device).type == "cuda"
    models: list[tuple[str, str]] = [("tiny-random-llama", str(args.tiny_model or _tiny_model()))]
    if not args.no_smollm2:
        models.append(("smollm2-135m", "smollm2-135m"))
    checks = []
    for label, name in models:
        try:
            cpu = load_model(ModelConfig(name=name, device="cpu", dtype="float32"))
        except (ModelError, ImportError, OSError) as exc:
            print(f"[{label}] skipped: it does not load here ({exc})")
            continue
        checks.append(_check(label, name, cpu, args, gpu))
    for c in checks:
        print(json.dumps({"model": c.model, **c.figures, "mismatches": c.mismatches}))
    if not gpu:
        print(f"GPU half SKIPPED: no CUDA device ({args.device}) on this machine; only the CPU half ran")
    failed = [c.model for c in checks if c.mismatches]
    print("FAILED: " + ", ".join(failed) if failed else "OK: every check passed")
    return 1 if failed else 0


def _check(label: str, name: str, cpu: LoadedModel, args: argparse.Namespace, gpu: bool) -> Check:
    check = Check(label)
    cfg = load_config(DEMO, [
        f"data.train={DEMO_TRAIN}", "tune.num_samples=0", f"model.name={name}", "prompt.num_virtual_tokens=8",
        f"train.steps={args.steps}", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1",
    ])
    split = _split(cfg, cpu.tokenizer, args.rows)
    vb = build_verbalizer(cfg.task, cpu.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        cpu_run = train.run(cfg, cpu, split, None, Path(tmp) / "cpu", resume=False)
        embeds = load_prompt_embeddings(cpu_run.adapter_dir).float()
    cpu_probs = _probs(cpu, embeds, split, vb)
    with torch.inference_mode():
        cached = label_scores(cpu.model, cache_prefix(cpu.model, embeds), split.input_ids, vb, cpu.tokenizer.pad_token_id).softmax(-1)
    cpu_loss = cpu_run.history[0]["train_loss"]
    check.figures.update(cpu_first_loss=cpu_loss, cpu_tokens_per_s=round(cpu_run.tokens_per_second, 1))
    if not torch.isfinite(torch.as_tensor(cpu_loss)):
        check.mismatches.append(f"CPU loss is {cpu_loss}")
    if (gap := float((cached - cpu_probs).abs().max())) > 1e-4:
        check.mismatches.append(f"CPU: cached-prefix probabilities differ from the plain prefix's by {gap:.2e}")
    if not gpu:
        return check
    del cpu
    dev = torch.device(args.device)
    loaded = load_model(ModelConfig(name=name, device=args.device, dtype="bfloat16"))
    torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t0 = time.perf_counter()
            gpu_run = train.run(cfg, loaded, split, None, Path(tmp) / "gpu", resume=False)
            torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    gpu_probs = _probs(loaded, embeds.to(dev), split, vb).cpu()
    gpu_loss = gpu_run.history[0]["train_loss"]
    check.figures.update(
        gpu_first_loss=gpu_loss, gpu_tokens_per_s=round(gpu_run.tokens_per_second, 1), gpu_seconds=round(seconds, 2),
        syncs_per_step=round(len(syncs) / max(1, gpu_run.steps), 1), sync_sites=sorted({str(w.filename).rsplit("/", 1)[-1] + f":{w.lineno}" for w in syncs})[:10],
        max_prob_gap=round(float((gpu_probs - cpu_probs).abs().max()), 4),
        label_agreement=round(float((gpu_probs.argmax(1) == cpu_probs.argmax(1)).float().mean()), 3),
        peak_gpu_mb=round(torch.cuda.max_memory_allocated(dev) / 2**20, 1), peak_rss_mb=round(train.peak_rss_mb(), 1),
    )
    if abs(gpu_loss - cpu_loss) > args.tolerance * abs(cpu_loss):
        check.mismatches.append(f"first-step loss: GPU {gpu_loss:.4f} vs CPU {cpu_loss:.4f} (tolerance {args.tolerance:.0%})")
    if check.figures["max_prob_gap"] > args.tolerance:
        check.mismatches.append(f"label probabilities differ by up to {check.figures['max_prob_gap']} (tolerance {args.tolerance})")
    return check


def _probs(loaded: LoadedModel, embeds: torch.Tensor, split: Split, vb: Any) -> torch.Tensor:
    with torch.inference_mode():
        return label_scores(loaded.model, Prefix(embeds=embeds), split.input_ids, vb, loaded.tokenizer.pad_token_id).softmax(-1)


def _split(cfg: Any, tok: Any, n: int) -> Split:
    with DEMO_TRAIN.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f)][:n]
    labels = list(cfg.task.labels)
    return Split(input_ids=[encode_input(tok, cfg.task.template, r["text"]) for r in rows], label_ids=[labels.index(r["label"]) for r in rows])


def _tiny_model() -> Path:
    cfg = load_config(DEMO, [f"data.train={DEMO_TRAIN}"])
    with DEMO_TRAIN.open(encoding="utf-8", newline="") as f:
        texts = [cfg.task.template.replace("{text}", r["text"]) + cfg.task.verbalizer[r["label"]][0] for r in csv.DictReader(f)]
    return build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-llama-")), texts, vocab_size=1000)


if __name__ == "__main__":
    raise SystemExit(main())
