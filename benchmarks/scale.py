#!/usr/bin/env python3
"""The frozen base sharded (fsdp) against a whole copy per worker (ddp), and the memory planner against
measured peaks, on this CPU with gloo (no Ray: the same ranks `torchrun -m softprompt.torchrun` runs).

    python benchmarks/scale.py                # SmolLM2-135M (embedded), SST-2, 2 ranks, 30 steps per strategy
    python benchmarks/scale.py --quick        # tiny random model, 4 steps: a smoke run

Part 1, same global batch, 2 ranks each: per-rank frozen-weight bytes, RSS after loading and peak RSS,
real tokens/s summed over the ranks, and the eval accuracy at the end (both strategies train the
same prompt). fsdp ranks build the model empty and read only their shards (`load_sharded`).
Part 2: six configurations (strategy x rows per rank x activation checkpointing), 3 steps each in
fresh processes, on rows cut to one length (the data's 75th percentile) so every batch is the one
planned; measured = a rank's peak RSS minus its RSS after imports, the tokenizer and the data, and
predicted = `softprompt.plan.estimate` for that batch (fp32 on CPU). The planner's
constants are the committed ones (src/softprompt/plan.py); nothing here tunes them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from softprompt import dataset as ds  # noqa: E402
from softprompt import ingest, plan  # noqa: E402
from softprompt.config import JobConfig, load_config  # noqa: E402

CONFIGS = [("ddp", 8, False), ("ddp", 16, False), ("ddp", 16, True), ("fsdp", 8, False), ("fsdp", 16, False), ("fsdp", 16, True)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rank(rank: int, world: int, port: int, cfg: JobConfig, data: str, out: str, strategy: str, queue: Any) -> None:
    import torch.distributed as dist

    from softprompt import train
    from softprompt.modeling import load_model, load_tokenizer
    from softprompt.sharding import ShardedHooks, device_mesh, local_parameter_bytes
    from softprompt.torchrun import DDPHooks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for module in ("torch.distributed.fsdp", "torch.nn.parallel", "transformers.models.llama.modeling_llama"):
            importlib.import_module(module)  # imports count as the base, not as the model

        load_tokenizer(cfg.model, cfg.s3)
        train_rows, eval_rows = ds.read_split(data, "train"), ds.read_split(data, "eval")
        base = _rss_mb()
        hooks: Any
        if strategy == "fsdp":
            hooks = ShardedHooks(mesh=device_mesh("fsdp", gpus_per_node=world))
            loaded = hooks.load(cfg.model, device="cpu", s3=cfg.s3)
        else:
            hooks = DDPHooks()
            loaded = load_model(cfg.model, device="cpu", s3=cfg.s3)
        weights = local_parameter_bytes(loaded.model)
        loaded_rss = _rss_mb()
        result = train.run(cfg, loaded, train_rows, eval_rows, Path(out) / f"rank{rank}", resume=False, hooks=hooks)
        queue.put({"rank": rank, "base_mb": base, "loaded_mb": loaded_rss, "weights_mb": weights / 2**20, "peak_mb": result.peak_rss_mb,
                   "tokens_per_second": result.tokens_per_second, "seconds": result.seconds, "eval": result.best_metric})
    finally:
        dist.destroy_process_group()


def run_ranks(cfg: JobConfig, data: Path, out: Path, strategy: str, world: int = 2) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, cfg, str(data), str(out), strategy, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(3600)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{strategy}: a rank failed ({[p.exitcode for p in procs]}; its traceback is above)")
    return sorted((queue.get(timeout=5) for _ in procs), key=lambda r: r["rank"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 4 steps")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per strategy in part 1")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch in part 1")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-scale"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()
    os.chdir(ROOT)
    out = Path(args.out)
    steps = 4 if args.quick else args.steps
    overrides = ["data.max_train_rows=2000", "data.max_eval_rows=200", "data.max_test_rows=64", "train.warmup_steps=2",
                 "train.log_every=5", "train.eval_max_rows=200", f"workdir={out}", "model.device=cpu", "model.dtype=float32"]
    if args.quick:
        from softprompt.testing import build_tiny_model

        tiny = out / "tiny-model"
        if not (tiny / "config.json").is_file():
            build_tiny_model(tiny, ["Review: a fine film\nSentiment: positive negative"])
        overrides.append(f"model.name={tiny}")
    base = load_config(ROOT / "configs" / "sst2.yaml", overrides)
    data = out / "data"
    if not ds.has_split(data, "train"):
        print(ingest.run(base, data).summary(), flush=True)
    report: dict[str, Any] = {"benchmark": "scale", "quick": args.quick, "model": base.model.name, "machine": _machine()}

    part1 = {}
    for strategy in ("ddp", "fsdp"):
        cfg = load_config(ROOT / "configs" / "sst2.yaml", [*overrides, f"train.steps={steps}", f"train.batch_size={args.batch_size}",
                                                             f"train.eval_every={steps}", "train.seed=0"])
        t0 = time.perf_counter()
        ranks = run_ranks(cfg, data, out / f"part1-{strategy}", strategy)
        part1[strategy] = {"wall_s": round(time.perf_counter() - t0, 1), "ranks": ranks,
                           "tokens_per_second": round(sum(r["tokens_per_second"] for r in ranks), 1), "eval_accuracy": ranks[0]["eval"]}
        print(strategy, json.dumps(part1[strategy]), flush=True)
    d, f = part1["ddp"], part1["fsdp"]
    report["part1"] = part1 | {"weights_ratio": round(max(r["weights_mb"] for r in f["ranks"]) / max(r["weights_mb"] for r in d["ranks"]), 3),
                               "peak_ratio": round(max(r["peak_mb"] for r in f["ranks"]) / max(r["peak_mb"] for r in d["ranks"]), 3),
                               "accuracy_points": round(100 * ((f["eval_accuracy"] or 0) - (d["eval_accuracy"] or 0)), 2)}

    from softprompt.modeling import model_config

    shape = plan.ModelShape.from_config(model_config(base.model, base.s3))
    # Rows of one length, so every batch is the batch the planner is asked about: each row's last
    # `length` tokens (the template's end stays), rows shorter than that left out.
    rows = ds.read_split(data, "train")
    length = sorted(rows.lengths)[len(rows.lengths) * 3 // 4]
    keep = [i for i, ids in enumerate(rows.input_ids) if len(ids) >= length]
    fixed = out / "data-fixed-length"
    ds.write_split(fixed, "train", ds.Split(input_ids=[rows.input_ids[i][-length:] for i in keep], label_ids=[rows.label_ids[i] for i in keep]))
    ds.write_split(fixed, "eval", ds.read_split(data, "eval"))
    part2 = []
    for strategy, per_rank, ckpt in CONFIGS[: 2 if args.quick else None]:
        cfg = load_config(ROOT / "configs" / "sst2.yaml", [*overrides, "train.steps=3", f"train.batch_size={2 * per_rank}", "train.eval_every=0",
                                                             f"train.activation_checkpointing={str(ckpt).lower()}"])
        ranks = run_ranks(cfg, fixed, out / f"part2-{strategy}-{per_rank}-{ckpt}", strategy)
        measured = max(r["peak_mb"] - r["base_mb"] for r in ranks)
        est = plan.estimate(shape, plan.Layout(strategy, nodes=1, gpus_per_node=2),  # type: ignore[arg-type]
                            plan.Workload(batch=per_rank, seq_len=length, prompt_tokens=cfg.prompt.num_virtual_tokens, dtype_bytes=4,
                                          checkpointing=ckpt))
        predicted = est.total_bytes / 2**20
        part2.append({"strategy": strategy, "rows_per_rank": per_rank, "checkpointing": ckpt, "measured_mb": round(measured),
                      "predicted_mb": round(predicted), "error": round(predicted / measured - 1, 3),
                      "parts_mb": {k: round(v / 2**20, 1) for k, v in est.parts.items()}})
        print(json.dumps(part2[-1]), flush=True)
    report["part2"] = {"seq_len": length, "configs": part2}

    print()
    print("| strategy | frozen weights per rank | RSS after load | peak RSS per rank | tokens/s (2 ranks) | eval accuracy |")
    print("|---|---|---|---|---|---|")
    for s, r in part1.items():
        w = max(x["weights_mb"] for x in r["ranks"])
        print(f"| {s} | {w:.0f} MiB | {max(x['loaded_mb'] for x in r['ranks']):.0f} MiB | {max(x['peak_mb'] for x in r['ranks']):.0f} MiB | "
              f"{r['tokens_per_second']:.0f} | {100 * (r['eval_accuracy'] or 0):.1f}% |")
    print(f"fsdp / ddp: weights {report['part1']['weights_ratio']}x, peak {report['part1']['peak_ratio']}x, accuracy {report['part1']['accuracy_points']:+} points")
    print()
    print("| strategy | rows per rank | checkpointing | measured peak - base | planner | error |")
    print("|---|---|---|---|---|---|")
    for c in part2:
        print(f"| {c['strategy']} | {c['rows_per_rank']} | {'yes' if c['checkpointing'] else 'no'} | {c['measured_mb']} MiB | {c['predicted_mb']} MiB | {100 * c['error']:+.1f}% |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {args.json}")
    return 0


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
