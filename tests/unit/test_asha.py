"""The promotion rule of `tune.scheduler=asha_promote` (softprompt.asha), without Ray running:
trials wait at a rung until it can judge them, a free slot promotes before it starts a new trial,
and a sweep always runs one trial to the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from softprompt.ray.asha import PARKED, GatedVariantGenerator, PromotionScheduler, rungs

CONTINUE, PAUSE = "CONTINUE", "PAUSE"


def scheduler(*, samples: int = 12, concurrent: int = 2, rf: int = 3) -> PromotionScheduler:
    # 9 rounds of 10 steps: rungs after rounds 1 and 3.
    return PromotionScheduler(metric="best_metric", steps=90, eval_every=10, grace_period=1, reduction_factor=rf,
                              max_concurrent=concurrent, num_samples=samples)


def test_rungs_fall_at_grace_times_powers_of_the_reduction_factor_below_the_last_step() -> None:
    assert rungs(216, 24, 1, 3) == [24, 72]
    assert rungs(216, 24, 2, 2) == [48, 96, 192]
    assert rungs(24, 24, 1, 3) == []  # one round: nothing to compare before the end
    with pytest.raises(ValueError, match="reduction_factor >= 2"):
        rungs(100, 10, 1, 1)


def test_the_first_trials_at_a_rung_wait_until_the_rung_can_judge_them() -> None:
    s = scheduler()
    for tid in "abc":
        s.start(tid)
    # Ray's ASHAScheduler would let a and b go on (nothing recorded before them); here they wait.
    assert s.arrive("a", 10, 0.80) == PAUSE
    assert s.arrive("b", 10, 0.70) == PAUSE
    assert s.active == {"c"} and s.waiting == {"a": 10, "b": 10}
    # With three results the top third (one trial) may go on: a, not c, so c waits too ...
    assert s.arrive("c", 10, 0.75) == PAUSE
    assert s.next_promotion() == ("a", 10)
    assert not s.allow_new_trial()  # ... and the free slot promotes a before any new trial starts
    s.promote("a", 10)
    assert s.active == {"a"} and s.next_promotion() is None and s.allow_new_trial()
    # a's next report (past the rung it was judged at) goes on.
    assert s.arrive("a", 20, 0.82) == CONTINUE


def test_a_trial_in_the_top_third_on_arrival_goes_on_without_pausing() -> None:
    s = scheduler()
    for tid, value in (("a", 0.6), ("b", 0.7)):
        s.start(tid)
        assert s.arrive(tid, 10, value) == PAUSE
    s.start("c")
    assert s.arrive("c", 10, 0.9) == CONTINUE
    assert s.promoted[10] == {"c"} and "c" in s.active


def test_a_free_slot_promotes_from_the_highest_rung_first() -> None:
    s = scheduler(concurrent=1)
    # Rung 10: x is in the top third of three; it was promoted and reached rung 30 before y.
    s.recorded[10] = {"x": 0.9, "p": 0.5, "q": 0.4}
    s.promoted[10] = {"x"}
    s.recorded[30] = {"x": 0.91, "y": 0.8, "z": 0.7}  # x tops rung 30 and waits there
    s.waiting = {"x": 30}
    s.recorded[10].update({"r": 0.95, "s": 0.3, "t": 0.2})  # now r also tops rung 10, and waits
    s.waiting["r"] = 10
    assert s.next_promotion() == ("x", 30)


def test_with_every_trial_started_and_none_promotable_the_best_waiting_trial_still_runs_to_the_end() -> None:
    s = scheduler(samples=2, concurrent=2)  # too few trials for a rung of three to promote anyone
    for tid, value in (("a", 0.6), ("b", 0.7)):
        s.start(tid)
        assert s.arrive(tid, 10, value) == PAUSE
    assert s.next_promotion() is None and s.last_chance() == ("b", 10)
    s.promote("b", 10)
    s.leave("b", 90)
    assert s.finished == 1 and s.last_chance() is None  # one full trial is enough: a ends at its rung


@dataclass
class _Restored:
    """What `Tuner.restore` hands the scheduler: a trial with its last result, re-queued as PENDING."""

    trial_id: str
    last_result: dict[str, Any]
    status: str = "PENDING"
    changes: list[str] = field(default_factory=list)

    def set_status(self, status: str) -> None:
        self.status = status
        self.changes.append(status)


def test_restored_trials_rejoin_their_rungs_and_one_that_was_waiting_stays_paused() -> None:
    s = scheduler()
    waiting = _Restored("w", {"step": 10, "best_metric": 0.7})
    running = _Restored("r", {"step": 20, "best_metric": 0.8})
    done = _Restored("d", {"step": 90, "best_metric": 0.9}, status="TERMINATED")
    for trial in (waiting, running, done):
        s.on_trial_add(None, trial)  # type: ignore[arg-type]
    assert waiting.status == "PAUSED" and s.waiting == {"w": 10}  # judged at its rung first
    assert s.active == {"r"}
    assert s.recorded[10] == {"w": 0.7, "r": 0.8, "d": 0.9} and s.recorded[30] == {"d": 0.9}
    assert s.promoted[10] == {"r", "d"}


def test_asha_promote_needs_evaluations_to_compare_trials_at() -> None:
    from softprompt.config import load_config
    from softprompt.errors import ConfigError

    base = ["data.train=x.csv", "task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "tune.num_samples=4"]
    assert load_config(None, [*base, "tune.scheduler=asha_promote"]).tune.scheduler == "asha_promote"
    with pytest.raises(ConfigError, match=r"tune\.scheduler=asha_promote compares trials at evaluations"):
        load_config(None, [*base, "tune.scheduler=asha_promote", "train.eval_every=0"])


def test_the_last_report_of_a_trial_is_never_paused() -> None:
    s = scheduler()
    s.start("a")
    # A trial whose reports skipped the rungs (evaluated elsewhere) ends at its last step.
    assert s.arrive("a", 90, 0.5) == CONTINUE and s.waiting == {}


def test_a_restored_trial_that_was_running_waits_for_a_free_slot() -> None:
    s = scheduler(concurrent=1)
    first = _Restored("r1", {"step": 20, "best_metric": 0.8})
    second = _Restored("r2", {"step": 40, "best_metric": 0.7})
    for trial in (first, second):
        s.on_trial_add(None, trial)  # type: ignore[arg-type]
    # Tune would start every PENDING trial at once: the one past the slot limit is parked ...
    assert first.status == "PENDING" and second.status == "PAUSED"
    assert s.active == {"r1"} and s.waiting == {"r2": PARKED}
    # ... and resumes first when a slot frees, before any promotion or new trial.
    s.recorded[10].update({"a": 0.9, "b": 0.1, "c": 0.2})
    s.waiting["a"] = 10
    s.leave("r1")
    assert s.next_promotion() == ("r2", PARKED)


def test_the_slots_follow_tune_s_trial_statuses() -> None:
    s = scheduler()
    for tid in "abc":
        s.start(tid)
    assert s.arrive("a", 10, 0.5) == PAUSE
    # Tune ended b without telling the scheduler (the experiment stopped); a is pausing (still RUNNING).
    s.reconcile({"a": "RUNNING", "b": "TERMINATED", "c": "RUNNING", "d": "PENDING"})
    assert s.active == {"c", "d"} and s.waiting == {"a": 10}
    s.reconcile({"a": "ERROR", "c": "RUNNING", "d": "PENDING"})
    assert s.waiting == {}


def test_a_trial_requeued_after_a_failure_keeps_its_slot() -> None:
    s = scheduler()
    trial = _Restored("a", {})
    s.on_trial_add(None, trial)  # type: ignore[arg-type]
    assert s.arrive("a", 10, 0.5) == PAUSE
    # Tune re-adds a failed trial it retries: it is already filed PENDING, so no status change here.
    s.on_trial_add(None, _Restored("a", {"step": 10, "best_metric": 0.5}))  # type: ignore[arg-type]
    assert s.active == {"a"} and s.waiting == {}


def test_the_rung_records_travel_with_the_search_generator_s_saved_state() -> None:
    s = scheduler()
    for tid, value in (("a", 0.6), ("b", 0.7), ("c", 0.9)):
        s.start(tid)
        s.arrive(tid, 10, value)
    s.leave("c", 90)
    saved = GatedVariantGenerator(s, random_state=0).get_state()
    assert "scheduler" not in saved  # the scheduler is restored with the Tuner, not from here

    fresh = scheduler()
    GatedVariantGenerator(fresh, random_state=0).set_state(dict(saved))
    assert fresh.recorded == s.recorded and fresh.promoted == s.promoted and fresh.finished == 1
    assert fresh.waiting == {} and fresh.active == set()  # these come from the restored trials' statuses
