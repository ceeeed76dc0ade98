#!/usr/bin/env python3
"""Replay async ASHA on the recorded curves of a sweep that ran every trial to the end.

    python benchmarks/asha_replay.py runs/bench-tune/full/none/ray/tune
    python benchmarks/asha_replay.py benchmarks/results/tune_efficiency.json   # the curves it recorded

Training is deterministic on CPU, so a trial's per-evaluation curve (`best_metric` per
`training_iteration` in each trial's `result.json`) is what any scheduler would have seen up to
where it stops the trial. This applies Ray's `AsyncHyperBandScheduler` rule to those curves: at a
rung, a trial goes on only if its value is at least the (1 - 1/reduction_factor) percentile of the
values recorded at that rung before it, so the first trials to reach a rung always go on (Ray
stops trials, it never pauses them). Next to it, `promote`: the rule of the ASHA paper (Li et al.,
2020), where a trial reaching a rung with fewer than `reduction_factor` results there waits
(paused, its resources freed for the next trial) until the rung has enough results to judge it.
Trials start in id order, `--concurrent` at a time, all at the same speed. Printed per setting:
the share of the full sweep's steps ASHA would spend, how many points its best trails the full
sweep's best, and the trials it runs to the end. A model of the run, not a measurement: report
ordering in a real sweep depends on timing (`benchmarks/tune_efficiency.py` measures).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def load_curves(experiment: Path) -> dict[str, list[float]]:
    """Trial id -> best-so-far eval metric after each evaluation round, from a Tune experiment
    folder or from the `curves` a `tune_efficiency.py` results file recorded."""
    if experiment.is_file():
        recorded: dict[str, list[float]] = json.loads(experiment.read_text()).get("curves") or {}
        if not recorded:
            raise SystemExit(f"{experiment} records no curves (results from before they were recorded)")
        return recorded
    curves = {}
    for trial in sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "result.json").is_file()):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        curves[trial.name] = [float(r["best_metric"]) for r in sorted(rows, key=lambda r: r["training_iteration"])]
    if not curves:
        raise SystemExit(f"{experiment} holds no trial folders with result.json")
    return curves


def _outcome(curves: dict[str, list[float]], ran: dict[str, int]) -> tuple[float, float, dict[str, int]]:
    """(steps share, points behind the full best, rounds each trial ran) of a replayed sweep."""
    share = sum(ran.values()) / sum(len(c) for c in curves.values())
    behind = (max(max(c) for c in curves.values()) - max(max(curves[t][: ran[t]]) for t in ran)) * 100
    return share, behind, ran


def replay(curves: dict[str, list[float]], reduction_factor: int, grace: int, concurrent: int) -> tuple[float, float, dict[str, int]]:
    """(steps share, points behind the full best, rounds each trial ran) under async ASHA."""
    rounds = max(len(c) for c in curves.values())
    max_t = rounds + 1  # as softprompt.tune derives it
    n = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    milestones = sorted({grace * reduction_factor**k for k in range(n)}, reverse=True)
    recorded: dict[int, dict[str, float]] = {m: {} for m in milestones}
    pending, ran, now = sorted(curves), {}, 0
    running: dict[str, tuple[int, int]] = {}
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
    return _outcome(curves, ran)


def replay_promote(curves: dict[str, list[float]], reduction_factor: int, grace: int, concurrent: int) -> tuple[float, float, dict[str, int]]:
    """Like `replay`, but a trial reaching a rung with fewer than `reduction_factor` results there
    (itself included) pauses until there are enough; when no trial is left to run, the paused ones
    are judged on what their rungs hold."""
    rf = reduction_factor
    rounds = max(len(c) for c in curves.values())
    n = int(math.log((rounds + 1) / grace) / math.log(rf) + 1)
    milestones = sorted({grace * rf**k for k in range(n)})
    recorded: dict[int, dict[str, float]] = {m: {} for m in milestones}
    pending, resume, ran = sorted(curves), [], {}
    running: dict[str, tuple[float, int]] = {}
    paused: dict[str, tuple[int, int]] = {}
    now = 0.0

    def judge(m: int, force: bool) -> None:
        values = list(recorded[m].values())
        if len(values) < rf and not force:
            return
        cutoff = float(np.nanpercentile(values, (1 - 1 / rf) * 100))
        for tid, (rung, it) in list(paused.items()):
            if rung == m:
                del paused[tid]
                if recorded[m][tid] >= cutoff:
                    resume.append((tid, it))
                else:
                    ran[tid] = it

    while pending or running or paused or resume:
        while len(running) < concurrent and (resume or pending):
            tid, it = resume.pop(0) if resume else (pending.pop(0), 0)
            running[tid] = (now, it)
        if not running:
            judge(min(rung for rung, _ in paused.values()), force=True)
            continue
        tid = min(running, key=lambda k: (running[k][0] + 1, k))
        it = running[tid][1] + 1
        now = running[tid][0] + 1
        value, action = curves[tid][it - 1], "go"
        for m in milestones:
            if it == m and tid not in recorded[m]:
                earlier = list(recorded[m].values())
                recorded[m][tid] = value
                if len(earlier) + 1 < rf:
                    action = "pause"
                elif value < float(np.nanpercentile(earlier, (1 - 1 / rf) * 100)):
                    action = "stop"
                break
        del running[tid]
        if action == "stop" or it == len(curves[tid]):
            ran[tid] = it
        elif action == "pause":
            paused[tid] = (m, it)
        else:
            running[tid] = (now, it)
        for m in milestones:
            judge(m, force=False)
    return _outcome(curves, ran)


def replay_scheduler(curves: dict[str, list[float]], reduction_factor: int, grace: int, concurrent: int) -> tuple[float, float, dict[str, int]]:
    """`tune.scheduler=asha_promote`: softprompt's `PromotionScheduler` itself (its decisions, fed
    the curves) under the same equal-speed model. Every trial waits at each rung until it is in the
    top 1/reduction_factor there; a free slot first promotes a waiting trial, else starts a new one."""
    from softprompt.ray.asha import PromotionScheduler

    rounds = max(len(c) for c in curves.values())
    sched = PromotionScheduler(metric="m", steps=rounds, eval_every=1, grace_period=grace, reduction_factor=reduction_factor,
                               max_concurrent=concurrent, num_samples=len(curves))
    pending, ran, now = sorted(curves), {}, 0.0
    running: dict[str, tuple[float, int]] = {}  # trial -> (time of its last report, rounds reported)
    done: dict[str, int] = {}
    while True:
        while len(sched.active) < concurrent:
            nxt = sched.next_promotion() or (sched.last_chance() if not pending and not sched.active else None)
            if nxt is not None:
                sched.promote(*nxt)
                running[nxt[0]] = (now, done.pop(nxt[0]))
            elif pending:
                tid = pending.pop(0)
                sched.start(tid)
                running[tid] = (now, 0)
            else:
                break
        if not running:
            ran.update(done)  # the trials still waiting end at their rungs
            break
        tid = min(running, key=lambda k: (running[k][0] + 1, k))
        now, it = running[tid][0] + 1, running[tid][1] + 1
        decision = sched.arrive(tid, it, curves[tid][it - 1])
        if it == len(curves[tid]):
            del running[tid]
            sched.leave(tid, it)
            ran[tid] = it
        elif decision == "PAUSE":
            del running[tid]
            done[tid] = it
        else:
            running[tid] = (now, it)
    return _outcome(curves, ran)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path, help="the full sweep's Tune experiment folder (<run>/ray/tune) or a tune_efficiency results file")
    args = p.parse_args()
    curves = load_curves(args.experiment)
    print("| rule | grace (rounds) | reduction factor | trials at a time | steps vs full | points behind | run to the end |")
    print("|---|---|---|---|---|---|---|")
    for grace in (1, 2, 3):
        for rf in (2, 3, 4, 5):
            for concurrent in (1, 2, 3):
                for rule, fn in (("Ray (stop)", replay), ("promote", replay_promote), ("asha_promote", replay_scheduler)):
                    share, behind, ran = fn(curves, rf, grace, concurrent)
                    ends = ", ".join(t.split("_")[-1] for t, r in ran.items() if r == len(curves[t]))
                    print(f"| {rule} | {grace} | {rf} | {concurrent} | {share:.0%} | {behind:.1f} | {ends} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
