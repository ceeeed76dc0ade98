"""Same config and seed, same prompt: this tree against an earlier commit, on this CPU.

    python benchmarks/parity.py --base 98c578d                 # runs both (a git worktree for the base)
    python benchmarks/parity.py --base-run A --new-run B       # compares two finished run folders

Each side runs `softprompt run -c configs/demo.yaml tune.num_samples=0 train.steps=N --no-publish`
(SmolLM2-135M, in-process, CPU: bitwise deterministic) from its own source tree and config, and the
script compares the tuned adapters (max abs difference of every tensor) and every number of
metrics.json (tuned prompt and baselines). It exits 1 when the adapters differ by more than
`--atol` or a metric differs at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("tuned", "zero_shot", "few_shot")
NUMBERS = ("accuracy", "macro_f1", "ece", "n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="commit to compare against (a temporary git worktree is made for it)")
    ap.add_argument("--base-run", help="an existing run folder of the base (skips running it)")
    ap.add_argument("--new-run", help="an existing run folder of this tree (skips running it)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "parity"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "parity.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    timings: dict[str, float] = {}
    base_run = Path(args.base_run) if args.base_run else None
    if base_run is None:
        if not args.base:
            ap.error("pass --base COMMIT or --base-run DIR")
        with tempfile.TemporaryDirectory(prefix="softprompt-parity-") as tmp:
            tree = Path(tmp) / "base"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.base], check=True, capture_output=True)
            try:
                base_run, timings["base_seconds"] = _run(tree, work / "base", args.steps)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)
    new_run = Path(args.new_run) if args.new_run else None
    if new_run is None:
        new_run, timings["new_seconds"] = _run(ROOT, work / "new", args.steps)
    report = compare(base_run, new_run)
    report.update(base=args.base, steps=args.steps, atol=args.atol, **timings)
    ok = report["adapter_max_abs_diff"] <= args.atol and not report["metric_differences"]
    report["verdict"] = "same" if ok else "DIFFERENT"
    print(f"adapter tensors: {report['adapter_tensors']}, max abs diff {report['adapter_max_abs_diff']:.3g} (atol {args.atol:g})")
    for method in METHODS:
        b, n = report["metrics"]["base"].get(method, {}), report["metrics"]["new"].get(method, {})
        print(f"{method:<10} base " + " ".join(f"{k}={b.get(k)}" for k in NUMBERS) + " | new " + " ".join(f"{k}={n.get(k)}" for k in NUMBERS))
    print(f"metric differences: {report['metric_differences'] or 'none'}")
    print(f"verdict: {report['verdict']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if ok else 1


def compare(base_run: Path, new_run: Path) -> dict[str, Any]:
    """Adapters and metrics of two run folders."""
    from safetensors.torch import load_file

    a = load_file(str(base_run / "artifact" / "adapter_model.safetensors"))
    b = load_file(str(new_run / "artifact" / "adapter_model.safetensors"))
    if set(a) != set(b):
        raise SystemExit(f"the adapters hold different tensors: {sorted(a)} vs {sorted(b)}")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    metrics = {side: _numbers(json.loads((run / "artifact" / "metrics.json").read_text())) for side, run in (("base", base_run), ("new", new_run))}
    differences = [f"{m}.{k}: {metrics['base'][m].get(k)} vs {metrics['new'][m].get(k)}"
                   for m in METHODS for k in NUMBERS if metrics["base"].get(m, {}).get(k) != metrics["new"].get(m, {}).get(k)]
    return {"base_run": str(base_run), "new_run": str(new_run), "adapter_tensors": sorted(a), "adapter_max_abs_diff": diff,
            "metrics": metrics, "metric_differences": differences}


def _numbers(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m: {k: metrics[m].get(k) for k in NUMBERS} for m in METHODS if m in metrics}


def _run(tree: Path, run_dir: Path, steps: int) -> tuple[Path, float]:
    command = [sys.executable, "-m", "softprompt.cli", "run", "-c", "configs/demo.yaml", "tune.num_samples=0",
               f"train.steps={steps}", "--run-dir", str(run_dir.resolve()), "--no-publish", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    print(f"running {tree.name}: {' '.join(command[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, cwd=tree, env=env, check=True)
    return run_dir, round(time.perf_counter() - t0, 1)


if __name__ == "__main__":
    raise SystemExit(main())
