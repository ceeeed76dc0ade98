#!/usr/bin/env python3
"""Serving throughput and latency: mixed-prompt batches vs one prompt per batch, and `softprompt serve`.

    python benchmarks/serving.py                        # SmolLM2-135M (embedded), 1024 rows, batch 32
    python benchmarks/serving.py --quick --threads 1    # 32 rows, batch 8: a smoke run, steadier on a busy box
    python benchmarks/serving.py --rows 2048 --batch-size 64 --json benchmarks/results/serving.json

Four prompts of 10, 20, 20 and 30 virtual tokens serve four tasks with the shipped configs' templates
and label words (SST-2, AG News, TREC, support intent), each on its own task's texts. The prompts are
not trained: each is vocabulary embeddings sampled from the 5000 most frequent tokens plus noise,
the `init: vocab` starting point, so norms are realistic. A forward pass costs the same whatever
the values are; only the predicted labels would differ.

Throughput: the same rows (interleaved over the four prompts) run through `predict_rows` at the
same batch size, mixed (every batch holds rows of all four prompts, each row gathering its own
prompt) and grouped (one prompt per batch), their batches interleaved in time (see `throughput`). The
target is a mixing cost of at most 10%. CPU time and padded token positions (a cost no other
process can disturb) are reported beside the wall-clock figure.

Latency: `softprompt serve` runs in this process on 127.0.0.1 (port 0); clients use urllib, one
connection per request (HTTP/1.0), so client, server and model share this process and its GIL.
Reported: single-row requests one after another, requests of `--request-rows` mixed rows, and
`--clients` concurrent single-row clients (where micro-batching pays), p50/p95 in ms.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softprompt import predict, serve  # noqa: E402
from softprompt.config import ModelConfig, load_config  # noqa: E402
from softprompt.modeling import load_model  # noqa: E402
from softprompt.tasks import build_verbalizer, encode_input  # noqa: E402

PROMPTS = (("sst2", 10), ("agnews", 20), ("trec", 20), ("demo", 30))  # shipped config, virtual tokens


def build_table(model: str, device: str | None) -> tuple[predict.PromptTable, dict[str, list[str]]]:
    """The model, four untrained prompts (one per shipped task config), and each task's texts."""
    loaded = load_model(ModelConfig(name=model), device=device)
    vocab = loaded.model.get_input_embeddings().weight.detach()
    table = predict.PromptTable(loaded)
    texts = {}
    g = torch.Generator().manual_seed(0)
    for name, n in PROMPTS:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"model.name={model}"])
        verbalizer = build_verbalizer(cfg.task, loaded.tokenizer)
        assert verbalizer.single_token, f"{name}: label words are not single tokens; the benchmark wants the batched path"
        ids = torch.randint(0, min(5000, vocab.shape[0]), (n,), generator=g)
        embeds = (vocab[ids].float().cpu() + 0.01 * torch.randn(n, vocab.shape[1], generator=g)).to(vocab.device)
        table.prompts[name] = predict.TunedPrompt(name, embeds, cfg, verbalizer, f"random:{name}")
        texts[name] = read_texts(cfg)
    return table, texts


def read_texts(cfg: Any) -> list[str]:
    """The text column of a config's test file (else train), as the config describes it."""
    d = cfg.data
    path = Path(d.test or d.train)
    path = path if path.is_absolute() else ROOT / path
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        rows = list(reader)
    if isinstance(d.text_column, str):  # a named column: the first row is the header
        col, rows = rows[0].index(d.text_column), rows[1:]
    else:
        col, rows = d.text_column, rows[1:] if d.header else rows
    return [r[col] for r in rows if len(r) > col and r[col].strip()]


def throughput(table: predict.PromptTable, rows: list[tuple[str, str]], batch_size: int, repeats: int) -> dict[str, Any]:
    """rows/s of mixed batches vs one prompt per batch, the two modes' batches interleaved in time.

    Both modes form their batches as `predict_rows` does (rows sorted by input length, then cut
    into `batch_size`): mixed over all rows, grouped over each prompt's rows. Batches then run one
    mixed, one grouped, and so on, so a burst of other work on a shared machine lands on both modes
    alike. Each mode's time is summed; the best of `repeats` rounds counts, because other work only
    ever adds time.
    """
    mixed = form_batches(table, rows, batch_size)
    grouped = [b for name, _ in PROMPTS for b in form_batches(table, [r for r in rows if r[0] == name], batch_size)]
    plan = {"mixed": mixed, "grouped": grouped}
    predict.predict_rows(table, mixed[0], batch_size)  # warm-up: allocator, kernels
    wall: dict[str, list[float]] = {"mixed": [], "grouped": []}
    cpu: dict[str, list[float]] = {"mixed": [], "grouped": []}
    labels: dict[str, dict[tuple[str, str], str | None]] = {"mixed": {}, "grouped": {}}
    for r in range(repeats):
        spent = {"mixed": [0.0, 0.0], "grouped": [0.0, 0.0]}
        for j in range(max(len(mixed), len(grouped))):
            for mode in ("mixed", "grouped") if (r + j) % 2 == 0 else ("grouped", "mixed"):
                if j < len(plan[mode]):
                    t, c = time.perf_counter(), time.process_time()
                    preds = predict.predict_rows(table, plan[mode][j], batch_size)
                    spent[mode][0] += time.perf_counter() - t
                    spent[mode][1] += time.process_time() - c
                    labels[mode].update({(p.prompt, p.text): p.label for p in preds})
        for mode, (w, c) in spent.items():
            wall[mode].append(w)
            cpu[mode].append(c)
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    slots = {mode: sum(padded_slots(table, b) for b in batches) for mode, batches in plan.items()}
    agree = sum(labels["mixed"][key] == label for key, label in labels["grouped"].items()) / len(labels["grouped"])
    return {
        "rows": len(rows), "batch_size": batch_size, "repeats": repeats,
        "mixed_rows_per_s": round(len(rows) / best["mixed"], 2), "grouped_rows_per_s": round(len(rows) / best["grouped"], 2),
        "mixing_cost": round(best["mixed"] / best["grouped"] - 1, 4),
        "mixing_cost_cpu_time": round(best_cpu["mixed"] / best_cpu["grouped"] - 1, 4),
        "padded_tokens": slots, "mixing_cost_tokens": round(slots["mixed"] / slots["grouped"] - 1, 4),
        "labels_agree": agree,
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in wall.items()},
        "cpu_seconds": {k: [round(v, 3) for v in vs] for k, vs in cpu.items()},
    }


def form_batches(table: predict.PromptTable, rows: list[tuple[str, str]], batch_size: int) -> list[list[tuple[str, str]]]:
    """The batches `predict_rows(table, rows, batch_size)` runs: rows sorted by input length, then cut."""
    tok = table.loaded.tokenizer
    length = {row: len(encode_input(tok, table.prompts[row[0]].cfg.task.template, row[1])) for row in rows}
    order = sorted(rows, key=lambda row: length[row])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_slots(table: predict.PromptTable, batch: list[tuple[str, str]]) -> int:
    """Token positions one forward pass computes, padding included: rows x (longest prompt + longest input).

    A cost no other process can disturb. Mixing pads every row's prompt to the batch's longest.
    """
    tok = table.loaded.tokenizer
    longest_input = max(len(encode_input(tok, table.prompts[name].cfg.task.template, text)) for name, text in batch)
    return len(batch) * (max(int(table.prompts[name].embeds.shape[0]) for name, _ in batch) + longest_input)


def latency(table: predict.PromptTable, rows: list[tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """p50/p95 of `softprompt serve` requests: single rows, batches, and concurrent single rows."""
    cfg = serve.ServeConfig(port=0, max_batch=args.batch_size, max_wait_ms=args.max_wait_ms, max_request_rows=max(256, args.request_rows))
    results = []
    with serve.PromptServer(table, cfg) as server:
        url = f"{server.url}/v1/predict"

        def post(batch: list[tuple[str, str]]) -> float:
            body = json.dumps({"inputs": [{"prompt": p, "text": t} for p, t in batch]}).encode()
            t = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=300) as r:
                r.read()
            return time.perf_counter() - t

        post(rows[:2])  # warm-up
        n = args.requests
        cases = [
            ("single row", 1, [[rows[i % len(rows)]] for i in range(n)]),
            (f"batch of {args.request_rows} rows", 1, [rows[(i * args.request_rows) % len(rows):][: args.request_rows] for i in range(max(2, n // 4))]),
            (f"{args.clients} clients, single rows", args.clients, [[rows[i % len(rows)]] for i in range(n * 2)]),
        ]
        for label, clients, requests in cases:
            before = server.batcher.stats()
            lat, wall = drive(post, requests, clients)
            after = server.batcher.stats()
            q = statistics.quantiles(lat, n=20, method="inclusive")
            results.append({
                "case": label, "requests": len(lat), "p50_ms": round(1000 * statistics.median(lat), 1), "p95_ms": round(1000 * q[18], 1),
                "rows_per_s": round(sum(len(b) for b in requests) / wall, 1),
                "rows_per_batch": round((after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"]), 1),
            })
    return results


def drive(post: Callable[[list[tuple[str, str]]], float], requests: list[list[tuple[str, str]]], clients: int) -> tuple[list[float], float]:
    """Send `requests` from `clients` threads, each taking the next one when done; latencies and wall time."""
    lat: list[float] = []
    todo = iter(requests)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                batch = next(todo, None)
            if batch is None:
                return
            lat.append(post(batch))

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return lat, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--rows", type=int, default=1024, help="rows for the throughput comparison")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (also serve --max-batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100, help="requests per latency case")
    ap.add_argument("--request-rows", type=int, default=16, help="rows per request in the batch case")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    ap.add_argument("--quick", action="store_true", help="32 rows, batch 8, 2 rounds, 12 requests: a smoke run")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.batch_size, args.repeats, args.requests, args.request_rows, args.clients = 32, 8, 2, 12, 8, 4

    if args.threads:
        torch.set_num_threads(args.threads)
    table, texts = build_table(args.model, args.device)
    rng = random.Random(0)
    for t in texts.values():
        rng.shuffle(t)
    names = [name for name, _ in PROMPTS]
    rows = [(names[i % 4], texts[names[i % 4]][i // 4 % len(texts[names[i % 4]])]) for i in range(args.rows)]
    tp = throughput(table, rows, args.batch_size, args.repeats)
    lat = latency(table, rows, args)
    loaded = table.loaded
    result = {
        "benchmark": "serving",
        "model": args.model, "device": str(loaded.device), "dtype": str(loaded.model.dtype).replace("torch.", ""),
        "prompt_tokens": dict(PROMPTS), "throughput": tp, "serve": lat,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if loaded.device.type == "cuda" else None, "load_avg": os.getloadavg()[0],
        },
        "quick": args.quick,
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    tp, m = r["throughput"], r["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, load {m['load_avg']:.1f}"
    print(f"\nserving: {r['model']} ({r['dtype']}) on {r['device']} [{where}]")
    print(f"4 prompts ({'/'.join(str(n) for n in r['prompt_tokens'].values())} virtual tokens), {tp['rows']} rows, batch {tp['batch_size']}, best of {tp['repeats']} rounds")
    print(f"{'mode':<28}{'rows/s':>10}")
    print("-" * 38)
    print(f"{'mixed (4 prompts per batch)':<28}{tp['mixed_rows_per_s']:>10.2f}")
    print(f"{'one prompt per batch':<28}{tp['grouped_rows_per_s']:>10.2f}")
    verdict = "ok" if tp["mixing_cost"] <= 0.10 else "over the 10% target"
    print(f"mixing cost {100 * tp['mixing_cost']:+.1f}% wall-clock ({verdict}); "
          f"CPU time {100 * tp['mixing_cost_cpu_time']:+.1f}%, padded tokens {100 * tp['mixing_cost_tokens']:+.1f}% "
          f"({tp['padded_tokens']['mixed']} vs {tp['padded_tokens']['grouped']})")
    print(f"labels agree on {100 * tp['labels_agree']:.1f}% of rows; peak RSS {r['peak_rss_mb']} MiB")
    print(f"\n`softprompt serve` in-process on 127.0.0.1, max-batch {tp['batch_size']}")
    print(f"{'requests':<26}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'rows/s':>10}{'rows/batch':>12}")
    print("-" * 73)
    for c in r["serve"]:
        print(f"{c['case']:<26}{c['requests']:>5}{c['p50_ms']:>10.1f}{c['p95_ms']:>10.1f}{c['rows_per_s']:>10.1f}{c['rows_per_batch']:>12.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
