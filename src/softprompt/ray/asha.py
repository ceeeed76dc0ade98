"""ASHA with promotions (`tune.scheduler: asha_promote`): the rule of the ASHA paper on Ray Tune.

Ray's `ASHAScheduler` stops a trial at a rung when it trails the trials recorded there before it,
and never pauses one: the first trials to reach a rung have nothing to be compared with, so they
go on. With two trials at a time, the first two run to the end whatever they score. The paper's
rule (Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020) instead ends every
trial's job at each rung; a slot that frees up first *promotes* a trial waiting at a rung, one in
the top `1/reduction_factor` of the results there (the highest rung first), and only if there is
none starts a new trial. So a trial goes past a rung only once enough trials have reached it to
place it in their top third.

On Ray Tune that means:

- `PromotionScheduler.on_trial_result` records a trial at each rung (rungs at `grace_period x
  reduction_factor^k` evaluation rounds, below `train.steps`) and PAUSEs it unless it is
  promotable right away; a paused trial frees its Train workers.
- `choose_trial_to_run` resumes a promotable paused trial when a slot is free. The trial's function
  runs again and its Ray Train run (same name, same storage) continues from its last checkpoint.
- The scheduler owns the concurrency limit and counts *running* trials: a searcher's own limit
  (`max_concurrent`, `ConcurrencyLimiter`) counts paused trials too, and two paused trials would
  hold both slots of a two-slot sweep forever. The searcher is wrapped (`gate`) so that it offers
  a new trial only when a slot is free and no paused trial can be promoted into it.
- When every trial has started and none is running or promotable, the ones still waiting are
  stopped: they end at their rung, and their best prompt so far is kept like any stopped trial's.

- A trial's Train workers wait after each rung report until the scheduler says go (`wait_for_go`,
  through Ray's internal key-value store; every private Ray API in `internals.py`): Ray Train would otherwise train on while Tune pauses
  the trial, and a paused trial could checkpoint (and later resume from) a step past its rung.

Time is counted in optimizer steps, from the `step` every report carries: Tune's own
`training_iteration` starts over when a paused function trial resumes. The rung records are saved
with the searcher's state at every experiment checkpoint, so `Tuner.restore` continues them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

from softprompt.ray import internals

log = logging.getLogger(__name__)

PARKED = 0
"""`waiting` value of a trial that is not judged at a rung but waits for a slot (after a restore)."""
GO_NAMESPACE = "softprompt_asha"
GO_TIMEOUT_S = 900.0
"""How long workers wait for the scheduler's go at a rung before going on regardless (a warning)."""


def train_run_name(trial_id: str) -> str:
    """A trial's Ray Train run name: Tune's trial id, so a resumed trial finds its run's checkpoints."""
    return f"trial-{trial_id}"


def signal_go(run_name: str, step: int) -> None:
    """Tell the workers of Train run `run_name`, held after their report at `step`, to go on."""
    internals.kv_put(f"{run_name}/{step}", b"go", GO_NAMESPACE)  # [ray] the cluster's key-value store (GCS)


def wait_for_go(run_name: str, step: int, timeout_s: float = GO_TIMEOUT_S) -> bool:
    """In a Train worker: wait until the scheduler lets run `run_name` go on past `step` (a paused
    trial is stopped while it waits). False when `timeout_s` passed without an answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if internals.kv_get(f"{run_name}/{step}", GO_NAMESPACE) is not None:
            return True
        time.sleep(0.1)
    log.warning("%s: no decision from the scheduler %.0f s after the report at step %d; going on", run_name, timeout_s, step)
    return False


def rungs(steps: int, eval_every: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The steps at which trials are compared: `grace_period x reduction_factor^k` evaluation rounds,
    strictly below `steps` (a trial reaching `steps` has finished)."""
    if eval_every < 1 or grace_period < 1 or reduction_factor < 2:
        raise ValueError(f"rungs need eval_every >= 1, grace_period >= 1 and reduction_factor >= 2 "
                         f"(got {eval_every}, {grace_period}, {reduction_factor})")
    out, rounds = [], grace_period
    while rounds * eval_every < steps:
        out.append(rounds * eval_every)
        rounds *= reduction_factor
    return out


class PromotionScheduler(TrialScheduler):
    """ASHA by promotion (see the module's docstring). `metric` is maximised."""

    def __init__(self, *, metric: str, steps: int, eval_every: int, grace_period: int, reduction_factor: int,
                 max_concurrent: int, num_samples: int) -> None:
        super().__init__()
        self._supports_buffered_results = False  # judge every report as it comes
        self._metric = metric
        self.key: str = metric
        self.rf = reduction_factor
        self.rungs = rungs(steps, eval_every, grace_period, reduction_factor)
        self.max_concurrent = max(1, max_concurrent)
        self.num_samples = num_samples
        self.recorded: dict[int, dict[str, float]] = {m: {} for m in self.rungs}
        """rung -> trial id -> the metric the trial reached it with (in arrival order)."""
        self.promoted: dict[int, set[str]] = {m: set() for m in self.rungs}
        self.waiting: dict[str, int] = {}
        """Paused trials by id -> the rung they wait at."""
        self.active: set[str] = set()
        """Trials running or about to run (not paused, not ended): what the slots hold."""
        self.seen: set[str] = set()
        self.steps = steps
        self.finished = 0
        """Trials that ran to `steps`."""

    # -- the rule (pure: no Ray calls) ---------------------------------------------------------

    def promotable(self, rung: int) -> list[str]:
        """Trials in the top `1/reduction_factor` of `rung` (by value, ties to the earlier arrival)
        that have not gone past it yet, best first."""
        results = self.recorded[rung]
        order = sorted(results, key=lambda t: -results[t])  # stable: arrival order breaks ties
        return [t for t in order[: len(results) // self.rf] if t not in self.promoted[rung]]

    def next_promotion(self) -> tuple[str, int] | None:
        """The waiting trial to resume next: a parked one first (it was running before a restore),
        then the highest rung first, the best there first."""
        for tid, rung in self.waiting.items():
            if rung == PARKED:
                return tid, PARKED
        for rung in reversed(self.rungs):
            for tid in self.promotable(rung):
                if self.waiting.get(tid) == rung:
                    return tid, rung
        return None

    def last_chance(self) -> tuple[str, int] | None:
        """When the sweep has nothing left to start or promote and no trial has run to the end yet,
        the best trial waiting at the highest rung goes on (as successive halving always keeps at
        least one): small sweeps (fewer than reduction_factor trials at a rung) still finish one."""
        if self.finished:
            return None
        for rung in reversed(self.rungs):
            results = self.recorded[rung]
            for tid in sorted(results, key=lambda t: -results[t]):
                if self.waiting.get(tid) == rung:
                    return tid, rung
        return None

    def allow_new_trial(self) -> bool:
        """A new trial may start: a slot is free and no waiting trial can be promoted into it."""
        return len(self.active) < self.max_concurrent and self.next_promotion() is None

    def arrive(self, tid: str, step: int, value: float) -> str:
        """Record a report; return CONTINUE or PAUSE (the trial waits at its rung)."""
        rung = next((m for m in reversed(self.rungs) if step >= m), None)
        if rung is None or tid in self.recorded[rung] or step >= self.steps:  # (its last report: it ends anyway)
            return TrialScheduler.CONTINUE  # before the first rung, or already judged at this one
        self.recorded[rung][tid] = value
        best = self.next_promotion_including(tid, rung)
        if best == tid:
            self.promoted[rung].add(tid)
            return TrialScheduler.CONTINUE
        self.waiting[tid] = rung
        self.active.discard(tid)
        return TrialScheduler.PAUSE

    def next_promotion_including(self, tid: str, rung: int) -> str | None:
        """What a freed slot would do if `tid` (just recorded at `rung`, still holding its slot) were
        waiting there: the trial it would promote, if any."""
        self.waiting[tid] = rung
        try:
            nxt = self.next_promotion()
        finally:
            del self.waiting[tid]
        return nxt[0] if nxt else None

    def promote(self, tid: str, rung: int) -> None:
        """Resume waiting trial `tid` past `rung` (it takes a slot)."""
        self.waiting.pop(tid)
        if rung != PARKED:
            self.promoted[rung].add(tid)
        self.active.add(tid)

    def start(self, tid: str) -> None:
        """A new trial takes a slot."""
        self.seen.add(tid)
        self.active.add(tid)

    def reconcile(self, statuses: dict[str, str]) -> None:
        """Match the slots to Tune's trial statuses (Tune may end a trial without telling the
        scheduler, e.g. when the experiment stops): a trial holds a slot while it is PENDING or
        RUNNING and not waiting (a trial told to wait stays RUNNING while its pause is saved)."""
        for tid in [t for t in self.waiting if statuses.get(t) in (Trial.TERMINATED, Trial.ERROR)]:
            del self.waiting[tid]
        self.active = {tid for tid, status in statuses.items() if status in (Trial.PENDING, Trial.RUNNING) and tid not in self.waiting}

    def state(self) -> dict[str, Any]:
        """The rung records, saved with the searcher's state at every experiment checkpoint."""
        return {"rungs": self.rungs, "recorded": {str(m): r for m, r in self.recorded.items()},
                "promoted": {str(m): sorted(p) for m, p in self.promoted.items()}, "finished": self.finished}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back `state()` (`Tuner.restore` restores the searcher before it re-adds the trials)."""
        if state.get("rungs") != self.rungs:
            log.warning("the saved rung records are for rungs %s, not %s: rebuilding them from the trials", state.get("rungs"), self.rungs)
            return
        self.recorded = {m: dict(state["recorded"].get(str(m), {})) for m in self.rungs}
        self.promoted = {m: set(state["promoted"].get(str(m), [])) for m in self.rungs}
        self.finished = int(state.get("finished", 0))

    def leave(self, tid: str, step: int = 0) -> None:
        """The trial ended (finished, stopped or errored) at `step`."""
        self.finished += step >= self.steps
        self.active.discard(tid)
        self.waiting.pop(tid, None)

    # -- Ray Tune's scheduler interface ---------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # Refuse (Tune then raises) a sweep ranked on another metric or minimised.
        return not ((metric and metric != self._metric) or (mode and mode != "max"))

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        tid = trial.trial_id
        if tid in self.seen:  # re-queued by Tune after a failure: it restarts from its checkpoint
            self.waiting.pop(tid, None)
            self.active.add(tid)
            return
        self.seen.add(tid)
        last = trial.last_result or {}
        if last.get("step") is not None and last.get(self.key) is not None:
            self.rejoin(trial, int(last["step"]), float(last[self.key]))
        elif trial.status in (Trial.PENDING, Trial.RUNNING):
            self.start(tid)

    def rejoin(self, trial: Trial, step: int, value: float) -> None:
        """A trial restored by `Tuner.restore`. Its rung records come back with the searcher's state;
        any missing are filled with its last value (its best so far: at least what it had at those
        rungs). Tune re-queues unfinished trials as PENDING and would start them all: one that
        stopped exactly at a rung was waiting there and goes back to PAUSED, and one that was
        running goes on only while slots are free, else it is parked (PAUSED, resumed before any
        promotion or new trial). The status is set before Tune files the trial by it."""
        tid = trial.trial_id
        for rung in self.rungs:
            if step >= rung:
                self.recorded[rung].setdefault(tid, value)
                if step > rung:
                    self.promoted[rung].add(tid)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        if step in self.rungs and tid not in self.promoted[step]:
            internals.set_trial_status(trial, Trial.PAUSED)
            self.waiting[tid] = step
        elif len(self.active) >= self.max_concurrent:
            internals.set_trial_status(trial, Trial.PAUSED)
            self.waiting[tid] = PARKED
        else:
            self.active.add(tid)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        value, step = result.get(self.key), result.get("step")
        if value is None or step is None:
            return TrialScheduler.CONTINUE
        decision = self.arrive(trial.trial_id, int(step), float(value))
        if decision == TrialScheduler.PAUSE:
            log.info("trial %s waits at step %s (%s %.4f) until it can be judged", trial.trial_id, step, self.key, value)
        elif int(step) in self.rungs:
            signal_go(train_run_name(trial.trial_id), int(step))  # its workers wait for this
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self.leave(trial.trial_id, int((result or {}).get("step") or 0))

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.leave(trial.trial_id)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.leave(trial.trial_id)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        self.reconcile({tid: t.status for tid, t in trials.items()})
        if len(self.active) >= self.max_concurrent:
            return None
        sweep_over = len(self.seen) >= self.num_samples and not self.active
        nxt = self.next_promotion() or (self.last_chance() if sweep_over else None)
        if nxt is not None:
            tid, rung = nxt
            trial = trials.get(tid)
            if trial is not None and trial.status == Trial.PAUSED:  # not while its pause is still saving
                self.promote(tid, rung)
                log.info("trial %s promoted past step %s", tid, rung)
                return trial
            return None
        if sweep_over:
            for tid in list(self.waiting):
                trial = trials.get(tid)
                if trial is not None and trial.status == Trial.PAUSED:
                    log.info("trial %s ends at its rung (step %s): no slot will promote it", tid, self.waiting[tid])
                    tune_controller.stop_trial(trial)
                    # Ray 2.60 files a stopped trial's new status for the experiment state only if it
                    # had a live actor: mark it, or the saved sweep still lists it as paused
                    # (unfinished) and Tuner.restore would run it again.
                    internals.save_trial_status(tune_controller, trial)
        return None

    def debug_string(self) -> str:
        counts = ", ".join(f"step {m}: {len(self.recorded[m])} judged, {len(self.promoted[m])} promoted" for m in self.rungs)
        return f"ASHA by promotion ({counts}; {len(self.waiting)} waiting, {len(self.active)} running)"


class GatedVariantGenerator(BasicVariantGenerator):
    """Random search that offers a new trial only when `PromotionScheduler.allow_new_trial`."""

    def __init__(self, scheduler: PromotionScheduler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scheduler = scheduler

    def next_trial(self) -> Any:
        return super().next_trial() if self.scheduler.allow_new_trial() else None

    def get_state(self) -> Any:
        # Tune saves the generator's state at every experiment checkpoint: the scheduler's rung
        # records go with it. The scheduler itself is restored with the Tuner and must stay the
        # very object the scheduler slot holds, so it is not pickled here.
        state = super().get_state()
        if isinstance(state, dict):
            state.pop("scheduler", None)
            state["promotion"] = self.scheduler.state()
        return state

    def set_state(self, state: Any) -> None:
        promotion = state.pop("promotion", None)
        super().set_state(state)
        if promotion:
            self.scheduler.load_state(promotion)


class GatedSearchGenerator(SearchGenerator):
    """A searcher (Optuna) that is asked for a new trial only when `PromotionScheduler.allow_new_trial`."""

    def __init__(self, searcher: Any, scheduler: PromotionScheduler) -> None:
        super().__init__(searcher)
        self.scheduler = scheduler

    def next_trial(self) -> Any:
        return super().next_trial() if self.scheduler.allow_new_trial() else None

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "promotion": self.scheduler.state()}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if state.get("promotion"):
            self.scheduler.load_state(state["promotion"])
