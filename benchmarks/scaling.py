#!/usr/bin/env python3
"""Ray Train scaling on CPU: training throughput with 1 and 2 workers, same global batch.

    python benchmarks/scaling.py             # smollm2-135m (embedded), SST-2 sentences, 40 steps
    python benchmarks/scaling.py --quick     # smoke run: tiny random model, 10 steps

Each case is one `softprompt.distributed.fit` (DDP over gloo, Ray Data shards) on a local Ray:
  1 worker x 1 thread, 1 worker x 2 threads, 2 workers x 1 thread.
The global batch stays `train.batch_size` (each of N workers takes batch_size / N rows per step),
so every case does the same work per step. Reported per case: real tokens per second (virtual and
non-pad input tokens, summed over workers, over the training loop only), the wall time of the whole
run including Ray's worker start-up, and each worker's peak RSS (model copy and Ray included).
The throughput ratio is 2 workers over 1 worker x 1 thread; on a 2-core machine 2.0 is the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softprompt import ingest  # noqa: E402
from softprompt.config import load_config  # noqa: E402
from softprompt.ray import cluster  # noqa: E402
from softprompt.ray import train as distributed  # noqa: E402

CASES = [("1 worker x 1 thread", 1, 1), ("1 worker x 2 threads", 1, 2), ("2 workers x 1 thread", 2, 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random model, 10 steps")
    p.add_argument("--steps", type=int, help="optimizer steps per case (default 40; quick 10)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over the workers)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-scaling"), help="work folder")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/scaling[_quick].json)")
    args = p.parse_args()
    os.chdir(ROOT)
    out = Path(args.out) / ("quick" if args.quick else "full")
    steps = args.steps or (10 if args.quick else 40)
    overrides = [
        f"train.steps={steps}", f"train.batch_size={args.batch_size}", "train.warmup_steps=0", "train.eval_every=0",
        "train.eval_max_rows=16",  # the loop's one evaluation (at the last step) stays small
        "data.max_train_rows=2000", "data.max_eval_rows=64", "data.max_test_rows=64", f"workdir={out}",
        "ray.max_failures=0", f"ray.num_cpus={max(2, os.cpu_count() or 2)}",
    ]
    if args.quick:
        from softprompt.testing import build_tiny_model

        tiny = out / "tiny-model"
        if not (tiny / "config.json").is_file():
            build_tiny_model(tiny, ["Review: a fine film\nSentiment: positive negative"])
        overrides.append(f"model.name={tiny}")
    cfg = load_config(ROOT / "configs" / "sst2.yaml", overrides)
    print(ingest.run(cfg, out / "data").summary())
    print(cluster.init_ray(cfg.ray, tuning=False))
    rows = []
    for label, workers, threads in CASES:
        case = load_config(ROOT / "configs" / "sst2.yaml", [*overrides, f"ray.num_workers={workers}", f"ray.cpus_per_worker={threads}"])
        run_dir = out / f"w{workers}t{threads}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
        t0 = time.perf_counter()
        result = distributed.fit(case, out / "data", run_dir)
        wall = time.perf_counter() - t0
        w = sorted(result.workers, key=lambda x: x["rank"])
        rows.append({
            "case": label, "workers": workers, "threads_per_worker": threads,
            "tokens_per_second": round(sum(x["tokens_per_second"] for x in w), 1),
            "train_seconds": round(max(x["seconds"] for x in w), 2), "wall_seconds": round(wall, 1),
            "peak_rss_mb_per_worker": [round(x["peak_rss_mb"]) for x in w],
        })
        print(f"{label}: {rows[-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    base = rows[0]["tokens_per_second"]
    print()
    print("| case | tokens/s | vs 1x1 | train loop | wall (incl. start-up) | peak RSS per worker |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rss = ", ".join(f"{m} MiB" for m in r["peak_rss_mb_per_worker"])
        print(f"| {r['case']} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / base:.2f}x | {r['train_seconds']:.1f}s | {r['wall_seconds']:.0f}s | {rss} |")
    report = {"benchmark": "scaling", "quick": args.quick, "machine": _machine(), "model": cfg.model.name, "steps": steps,
              "global_batch": args.batch_size, "cases": rows}
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"scaling{'_quick' if args.quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"results: {path}")
    return 0


def _machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
