#!/usr/bin/env python3
"""Training throughput: softprompt's loop vs PEFT's usual prompt-tuning recipe, same process, same data.

    python benchmarks/throughput.py                       # SmolLM2-135M (embedded), SST-2 lengths
    python benchmarks/throughput.py --steps 20 --batch-size 16 --max-length 128
    python benchmarks/throughput.py --device cuda:1 --quick   # a couple of minutes on a 2-core CPU

The baseline is the recipe most PEFT prompt-tuning scripts use: `get_peft_model` + the model's own
forward with `labels` (fp32 weights, bf16 autocast on GPU), every batch padded to `--max-length`,
logits over the full vocabulary at every position. Ours is `softprompt.train.run` itself (the
product's loop: bf16 frozen weights on GPU, length-grouped batches padded to the longest row, the
LM head only at the label position, loss = cross-entropy over the label set).

Both see the same SST-2 training sentences with the same template and label words; tokens/s counts
real tokens (virtual + non-pad input tokens) per second of training. Both are timed the same way:
`--warmup` steps first (kernel loads, allocator growth), then each step from the end of the one
before to its own end, synchronized on CUDA, batch building included; `step_ms` is the median.
Ours is timed through the loop's `on_step` hook, so what runs is still `train.run`. Peak memory is measured per
case: process RSS (sampled) and, on CUDA, `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softprompt import train  # noqa: E402
from softprompt.config import load_config  # noqa: E402
from softprompt.dataset import Split  # noqa: E402
from softprompt.modeling import load_model  # noqa: E402
from softprompt.tasks import encode_input  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = [" negative", " positive"]


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak_mb` is the max seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def read_sst2(path: Path, limit: int) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return [(t, int(y)) for t, y in rows[:limit]]


def peft_usual(args: argparse.Namespace, model_cfg: Any, rows: list[tuple[str, int]]) -> dict[str, Any]:
    """PEFT's usual recipe: padded to max_length, full-vocabulary LM loss via `labels`."""
    import random

    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    loaded = load_model(model_cfg, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    if _is_cuda(args.device):  # the usual recipe keeps fp32 weights and autocasts
        model.float()
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.virtual_tokens, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="Classify the sentiment of this movie review as positive or negative.",
        tokenizer_name_or_path=loaded.identity["local_path"],
    )
    pm = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    data = []
    for text, y in rows:
        prompt = encode_input(tok, TEMPLATE, text)
        answer = tok(WORDS[y], add_special_tokens=False)["input_ids"]
        data.append((prompt + answer, [-100] * len(prompt) + answer))
    order = list(range(len(data)))
    random.Random(1).shuffle(order)
    times, real = [], 0
    if _is_cuda(args.device):
        torch.cuda.reset_peak_memory_stats(args.device)
    with PeakRSS() as rss:
        _sync(args.device)
        t = time.perf_counter()
        for step in range(args.warmup + args.steps):
            batch = [data[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
            ids = torch.full((len(batch), args.max_length), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), args.max_length), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), args.max_length), dtype=torch.long)
            for i, (x, lab) in enumerate(batch):
                x, lab = x[: args.max_length], lab[: args.max_length]
                ids[i, : len(x)] = torch.tensor(x)
                labels[i, : len(lab)] = torch.tensor(lab)
                mask[i, : len(x)] = 1
            ids, labels, mask = ids.to(args.device), labels.to(args.device), mask.to(args.device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=_is_cuda(args.device)):
                loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            real_step = int(mask.sum()) + args.virtual_tokens * len(batch)  # also synchronizes
            _sync(args.device)
            now = time.perf_counter()
            if step >= args.warmup:
                times.append(now - t)
                real += real_step
            t = now
    result = {
        "case": "peft-usual", "steps": len(times), "step_ms": round(1000 * statistics.median(times), 1),
        "real_tok_s": round(real / sum(times), 1), "peak_rss_mb": round(rss.peak_mb), "peak_gpu_mb": _gpu_peak(args.device),
        "dtype": "float32" + ("+bf16-autocast" if _is_cuda(args.device) else ""),
    }
    pm.unload() if hasattr(pm, "unload") else None
    del pm, model, opt
    return result


def softprompt_loop(args: argparse.Namespace, rows: list[tuple[str, int]], dtype: str, tmp: Path) -> dict[str, Any]:
    """softprompt's own loop (`train.run`), each step timed through its `on_step` hook."""
    cfg = load_config(
        None,
        [
            "data.train=unused", "task.name=sst2", f"task.template={json.dumps(TEMPLATE)}",
            "task.labels=[negative, positive]", "task.verbalizer={negative: [' negative'], positive: [' positive']}",
            f"prompt.num_virtual_tokens={args.virtual_tokens}", "prompt.init=text",
            "prompt.init_text='Classify the sentiment of this movie review as positive or negative.'",
            f"train.steps={args.warmup + args.steps}", f"train.batch_size={args.batch_size}", "train.warmup_steps=1",
            "train.eval_every=0", f"model.dtype={dtype}", f"model.device={args.device}",
        ],
    )
    loaded = load_model(cfg.model, device=args.device)
    tok = loaded.tokenizer
    split = Split(input_ids=[encode_input(tok, TEMPLATE, t) for t, _ in rows], label_ids=[y for _, y in rows])
    if _is_cuda(args.device):
        torch.cuda.reset_peak_memory_stats(args.device)
    timer = _StepTimer(args.device, args.warmup)
    with PeakRSS() as rss:
        _sync(args.device)
        timer.last = time.perf_counter()
        train.run(cfg, loaded, split, None, tmp / f"ours-{dtype}", resume=False, hooks=timer)
    return {
        "case": f"softprompt ({dtype})", "steps": len(timer.times), "step_ms": round(1000 * statistics.median(timer.times), 1),
        "real_tok_s": round(timer.tokens / sum(timer.times), 1), "peak_rss_mb": round(rss.peak_mb), "peak_gpu_mb": _gpu_peak(args.device),
        "dtype": str(loaded.model.dtype).replace("torch.", ""),
    }


class _StepTimer:
    """`train.TrainHooks` for one process that only times steps: the same clock as `peft_usual`."""

    rank, world_size, presharded = 0, 1, False

    def __init__(self, device: str, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.times: list[float] = []
        self.tokens = 0
        self.last = 0.0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        pass

    def on_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if step > self.warmup:
            self.times.append(now - self.last)
            self.tokens += tokens
        self.last = now


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _gpu_peak(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if _is_cuda(device) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--cases", default="peft-usual,ours", help="peft-usual, ours, ours-bf16 (CPU bf16 weights)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + 3 steps of 8 rows, max length 64")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.steps, args.batch_size, args.max_length = 1, 3, 8, 64
    import tempfile

    from softprompt.config import ModelConfig

    torch.manual_seed(0)
    n = (args.warmup + args.steps) * args.batch_size
    rows = read_sst2(Path(args.data), n)
    header = {
        "machine": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "device": args.device, "gpu": torch.cuda.get_device_name(args.device) if _is_cuda(args.device) else None,
        "warmup": args.warmup, "timing": "median synchronized step after warm-up, batch building included",
        "model": args.model, "batch_size": args.batch_size, "steps": args.steps, "max_length": args.max_length,
    }
    print(json.dumps(header), flush=True)
    results = []
    tmp = Path(tempfile.mkdtemp())
    for case in args.cases.split(","):
        if case == "peft-usual":
            r = peft_usual(args, ModelConfig(name=args.model), rows)
        elif case == "ours":
            r = softprompt_loop(args, rows, "auto", tmp)
        elif case == "ours-bf16":
            r = softprompt_loop(args, rows, "bfloat16", tmp)
        else:
            raise SystemExit(f"unknown case {case!r}")
        results.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in results if r["case"] == "peft-usual"), None)
    print(f"\n{'case':<26}{'dtype':<24}{'step ms':>9}{'real tok/s':>12}{'speedup':>9}{'peak RSS MiB':>14}{'peak GPU MiB':>14}")
    for r in results:
        speed = f"{r['real_tok_s'] / base['real_tok_s']:.2f}x" if base else "-"
        print(f"{r['case']:<26}{r['dtype']:<24}{r['step_ms']:>9}{r['real_tok_s']:>12}{speed:>9}{r['peak_rss_mb']:>14}{r['peak_gpu_mb'] or '-'!s:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
