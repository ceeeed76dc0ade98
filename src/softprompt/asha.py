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

Time is counted in optimizer steps, from the `step` every report carries: Tune's own
`training_iteration` starts over when a paused function trial resumes.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

log = logging.getLogger(__name__)


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
        """The waiting trial to resume next: the highest rung first, the best there first."""
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
        self.promoted[rung].add(tid)
        self.active.add(tid)

    def start(self, tid: str) -> None:
        """A new trial takes a slot."""
        self.seen.add(tid)
        self.active.add(tid)

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
        self.seen.add(trial.trial_id)
        last = trial.last_result or {}
        if last.get("step") is not None and last.get(self.key) is not None:
            self.rejoin(trial, int(last["step"]), float(last[self.key]))
        elif trial.status in (Trial.PENDING, Trial.RUNNING):
            self.start(trial.trial_id)

    def rejoin(self, trial: Trial, step: int, value: float) -> None:
        """A trial restored by `Tuner.restore` (this scheduler's records are not saved with the sweep):
        it counts at every rung it passed with its last value (its best so far, so at most what it
        had there). Tune re-queues unfinished trials as PENDING; one that stopped exactly at a rung was
        waiting there, so it goes back to PAUSED (set before Tune files the trial by status) instead
        of starting past its slot."""
        tid = trial.trial_id
        for rung in self.rungs:
            if step >= rung:
                self.recorded[rung].setdefault(tid, value)
                if step > rung:
                    self.promoted[rung].add(tid)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        if step in self.rungs:
            trial.set_status(Trial.PAUSED)
            self.waiting[tid] = step
        else:
            self.active.add(tid)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        value, step = result.get(self.key), result.get("step")
        if value is None or step is None:
            return TrialScheduler.CONTINUE
        decision = self.arrive(trial.trial_id, int(step), float(value))
        if decision == TrialScheduler.PAUSE:
            log.info("trial %s waits at step %s (%s %.4f) until it can be judged", trial.trial_id, step, self.key, value)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self.leave(trial.trial_id, int((result or {}).get("step") or 0))

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.leave(trial.trial_id)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.leave(trial.trial_id)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if len(self.active) >= self.max_concurrent:
            return None
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
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
                    controller = getattr(tune_controller, "_tune_controller", tune_controller)
                    mark = getattr(controller, "_mark_trial_to_checkpoint", None)
                    if mark is not None:
                        mark(trial)
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
        # Tune saves the generator's state on its own; the scheduler is restored with the Tuner,
        # and must stay the very object the scheduler slot holds.
        state = super().get_state()
        if isinstance(state, dict):
            state.pop("scheduler", None)
        return state


class GatedSearchGenerator(SearchGenerator):
    """A searcher (Optuna) that is asked for a new trial only when `PromotionScheduler.allow_new_trial`."""

    def __init__(self, searcher: Any, scheduler: PromotionScheduler) -> None:
        super().__init__(searcher)
        self.scheduler = scheduler

    def next_trial(self) -> Any:
        return super().next_trial() if self.scheduler.allow_new_trial() else None
