#!/usr/bin/env python3
"""Quality: tuned prompt vs zero-shot and few-shot baselines on SST-2, TREC and AG News.

    python benchmarks/quality.py                          # all three, configs/<task>.yaml
    python benchmarks/quality.py --tasks sst2 train.steps=300

Each task runs the product's own stages (ingest -> train -> evaluate) from `configs/<task>.yaml`
with the embedded default model (SmolLM2-135M-Instruct), on the data in ../shared/data. Trailing
`key=value` arguments override every task's config. Prints one JSON line per task and a markdown
table last; `--json` writes the results too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softprompt import dataset as ds  # noqa: E402
from softprompt import evaluate, ingest, train  # noqa: E402
from softprompt.config import load_config  # noqa: E402
from softprompt.modeling import load_model  # noqa: E402
from softprompt.outcome import TrainOutcome  # noqa: E402


def run_task(task: str, overrides: list[str], workdir: Path) -> dict[str, Any]:
    cfg = load_config(ROOT / "configs" / f"{task}.yaml", overrides)
    run_dir = workdir / task
    t0 = time.perf_counter()
    ing = ingest.run(cfg, run_dir / "data")
    loaded = load_model(cfg.model)
    tr = train.run(cfg, loaded, ds.read_split(run_dir / "data", "train"), ds.read_split(run_dir / "data", "eval"), run_dir / "train", resume=False)
    t1 = time.perf_counter()
    outcome = TrainOutcome("in-process", tr.output_dir, (tr.adapter_dir,), cfg, tr.history, tr.summary())
    ev = evaluate.run(cfg, loaded, run_dir / "data", outcome, run_dir / "artifact")
    t2 = time.perf_counter()
    res = {name: {"accuracy": round(m.accuracy * 100, 1), "macro_f1": round(m.macro_f1 * 100, 1), "ece": m.ece} for name, m in ev.results.items()}
    best_base = max(res[b]["accuracy"] for b in ("zero_shot", "few_shot") if b in res)
    return {
        "task": task, "split": ev.split, "test_rows": ev.results["tuned"].n, "train_rows": ing.counts.get("train"),
        **res, "margin_over_best_baseline": round(res["tuned"]["accuracy"] - best_base, 1),
        "beats_baselines": ev.beats_baselines, "verdict": ev.verdict,
        "train_steps": tr.steps, "best_step": tr.best_step, "train_seconds": round(tr.seconds), "train_tok_s": round(tr.tokens_per_second),
        "eval_seconds": round(t2 - t1), "total_seconds": round(t2 - t0), "peak_rss_mb": round(train.peak_rss_mb()),
        "config": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "virtual_tokens": cfg.prompt.num_virtual_tokens, "init": cfg.prompt.init},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="sst2,trec,agnews")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"))
    ap.add_argument("--json", help="write results here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch

    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    results = []
    for task in args.tasks.split(","):
        r = run_task(task, args.overrides, Path(args.workdir))
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\n| task | test rows | zero-shot acc / F1 | few-shot acc / F1 | tuned acc / F1 | margin | train | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[m]['accuracy']:.1f} / {r[m]['macro_f1']:.1f}" if m in r else "-" for m in ("zero_shot", "few_shot", "tuned")]
        print(f"| {r['task']} | {r['test_rows']} | {' | '.join(cells)} | {r['margin_over_best_baseline']:+.1f} | "
              f"{r['train_steps']} steps, {r['train_seconds']} s, {r['train_tok_s']} tok/s | {r['peak_rss_mb']} MiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["beats_baselines"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
