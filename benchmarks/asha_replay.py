#!/usr/bin/env python3
"""Replay async ASHA on the recorded curves of a sweep that ran every trial to the end.

    python benchmarks/asha_replay.py runs/bench-tune/full/none/ray/tune

Training is deterministic on CPU, so a trial's per-evaluation curve (`best_metric` per
`training_iteration` in each trial's `result.json`) is what any scheduler would have seen up to
where it stops the trial. This applies Ray's `AsyncHyperBandScheduler` rule to those curves: at a
rung, a trial goes on only if its value is at least the (1 - 1/reduction_factor) percentile of the
values recorded at that rung before it. Trials start in id order, `--concurrent` at a time, all at
the same speed. Printed per setting: the share of the full sweep's steps ASHA would spend and how
many points its best trails the full sweep's best. A model of the run, not a measurement: report
ordering in a real sweep depends on timing (`benchmarks/tune_efficiency.py` measures).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def load_curves(experiment: Path) -> dict[str, list[float]]:
    """Trial id -> best-so-far eval metric after each evaluation round."""
    curves = {}
    for trial in sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "result.json").is_file()):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        curves[trial.name] = [float(r["best_metric"]) for r in sorted(rows, key=lambda r: r["training_iteration"])]
    if not curves:
        raise SystemExit(f"{experiment} holds no trial folders with result.json")
    return curves


def replay(curves: dict[str, list[float]], reduction_factor: int, grace: int, concurrent: int) -> tuple[float, float, dict[str, int]]:
    """(steps share, points behind the full best, rounds each trial ran) under async ASHA."""
    rounds = max(len(c) for c in curves.values())
    max_t = rounds + 1  # as softprompt.tune derives it
    n = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    milestones = sorted({grace * reduction_factor**k for k in range(n)}, reverse=True)
    recorded: dict[int, dict[str, float]] = {m: {} for m in milestones}
    pending, running, ran, now = sorted(curves), {}, {}, 0
    while pending or running:
        while pending and len(running) < concurrent:
            running[pending.pop(0)] = (now, 0)  # (start time, rounds reported); a round takes 1
        tid = min(running, key=lambda k: (sum(running[k]) + 1, k))
        start, it = running[tid][0], running[tid][1] + 1
        now = start + it
        value, stop = curves[tid][it - 1], False
        for m in milestones:
            if it < m or tid in recorded[m]:
                continue
            earlier = list(recorded[m].values())
            stop = bool(earlier) and value < float(np.nanpercentile(earlier, (1 - 1 / reduction_factor) * 100))
            recorded[m][tid] = value
            break
        if stop or it == len(curves[tid]):
            ran[tid] = it
            del running[tid]
        else:
            running[tid] = (start, it)
    share = sum(ran.values()) / sum(len(c) for c in curves.values())
    behind = (max(max(c) for c in curves.values()) - max(max(curves[t][: ran[t]]) for t in ran)) * 100
    return share, behind, ran


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path, help="the full sweep's Tune experiment folder (<run>/ray/tune)")
    args = p.parse_args()
    curves = load_curves(args.experiment)
    print("| grace (rounds) | reduction factor | trials at a time | steps vs full | points behind |")
    print("|---|---|---|---|---|")
    for grace in (1, 2, 3):
        for rf in (2, 3, 4, 5, 6):
            for concurrent in (1, 2, 3):
                share, behind, _ = replay(curves, rf, grace, concurrent)
                print(f"| {grace} | {rf} | {concurrent} | {share:.0%} | {behind:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
