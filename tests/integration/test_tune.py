"""Ray Tune on a real local Ray, every trial a two-worker Ray Train run: trials side by side with the
top-k prompts exported for an ensemble (the RayTuneTrainer's train_result.json); ASHA stopping a
trial while the next one still starts; and a stopped driver resumed by `Tuner.restore` without
redoing finished trials."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from softprompt.config import load_config
from softprompt.errors import ConfigError
from softprompt.job import Models
from softprompt.outcome import TrainOutcome
from softprompt.prompts import ADAPTER_WEIGHTS
from softprompt.ray import tune
from softprompt.ray.sweep_state import TamperedSweepError
from softprompt.ray.trainers import RayTuneTrainer
from softprompt.ray.view import LiveView

if TYPE_CHECKING:
    from conftest import TinyTask

pytestmark = pytest.mark.slow

GOOD, BAD = 0.3, 0.00001
"""Learning rates: GOOD learns the label prior in 4 steps (eval 0.8); BAD stays at the start (0.2)."""


def test_the_search_space_is_checked_before_any_trial_runs() -> None:
    base = ["data.train=x.csv", "task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}", "tune.num_samples=4"]
    assert load_config(None, base).tune.search_space["train.lr"] == {"type": "loguniform", "low": 1e-3, "high": 3e-1}
    with pytest.raises(ConfigError) as info:
        load_config(None, [*base, "train.steps=8", "ray.controller_failure_limit=-1",
                           "tune.search_space={train.lrate: {type: uniform, low: 0.1, high: 0.2}, "
                           "train.warmup_steps: {type: choice, values: [0, 10]}, prompt.init: {type: choice, values: [words]}, "
                           "train.lr: {type: loguniform, low: 0, high: 0.3}}"])
    text = str(info.value)
    assert "tune.search_space.train.lrate: not a tunable key; use one of" in text and "train.lr," in text
    assert "tune.search_space.train.warmup_steps: value 10 gives train.warmup_steps=10 must be in [0, train.steps=8)" in text
    assert "tune.search_space.prompt.init: value 'words' must be one of" in text
    assert "tune.search_space.train.lr: type loguniform needs low > 0" in text
    assert "ray.controller_failure_limit=-1 must be 0 or more" in text
    domains = tune.search_space({"a.b": {"type": "int", "low": 1, "high": 3}, "c.d": {"type": "choice", "values": ["x"]}})
    assert {domains["a.b"].sample() for _ in range(50)} == {1, 2, 3} and domains["c.d"].sample() == "x"


def test_a_restored_live_view_times_the_new_driver() -> None:
    view = LiveView("accuracy", 2, 12)
    view.started -= 10_000  # as if pickled by a driver that started long ago (or in another process)
    restored = pickle.loads(pickle.dumps(view))
    assert 0 <= time.monotonic() - restored.started < 60
    assert (restored.metric, restored.total, restored.steps) == ("accuracy", 2, 12)


def test_two_trials_of_two_workers_run_side_by_side(
    tiny_task: TinyTask, ray_session: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_task.config(
        "tune.num_samples=2", "tune.scheduler=none", "tune.top_k_ensemble=2",
        "tune.search_space={train.lr: {type: loguniform, low: 0.05, high: 0.3}, prompt.num_virtual_tokens: {type: choice, values: [4, 8]}}",
    )
    assert tune.max_concurrent_trials(cfg) == 2  # 5 CPUs // (2 workers x 1 CPU + a trial's 0.01)

    outcome = RayTuneTrainer(echo=print).train(cfg, tiny_task.data_dir, tmp_path / "run", Models(cfg))
    sweep = outcome.summary["tune"]
    trials = sweep["all"]

    assert [t["status"] for t in trials] == ["finished", "finished"]
    assert [t["workers"] for t in trials] == [2, 2]
    assert sweep["total_steps"] == 2 * cfg.train.steps
    assert trials[0]["best_metric"] >= trials[1]["best_metric"]
    # The top-2 trials' prompts, best first, exported from their last reported checkpoints.
    assert sweep["winners"] == [t["trial_id"] for t in trials]
    assert outcome.winners == tuple(tmp_path / "run" / "train" / "winners" / f"{i:02d}" / "adapter" for i in range(2))
    assert all((d / ADAPTER_WEIGHTS).is_file() for d in outcome.winners)
    assert outcome.config.train.lr == trials[0]["params"]["train.lr"]
    assert TrainOutcome.read(tmp_path / "run" / "train") == outcome
    captured = capsys.readouterr()
    out = captured.out
    assert "started" in out and "finished at step 12" in out and "best accuracy" in out
    # ray.train_log_level (WARNING) silences Ray Train's per-report INFO lines from the workers.
    assert "Reporting training result" not in out + captured.err
    # The trials gauge reaches Prometheus as ray_softprompt_trials{state=...}.
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline and 'ray_softprompt_trials{' not in text:
        time.sleep(2)
        text = urllib.request.urlopen(ray_session["metrics_url"], timeout=5).read().decode()
    assert 'state="finished"' in text


def test_asha_stops_a_trial_the_next_starts_and_a_stopped_driver_resumes(
    tiny_task: TinyTask, ray_session: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seed 1 draws GOOD, BAD, BAD: trial 1 sets the bar at the first rung, trial 2 falls below it.
    overrides = [
        *tiny_task.overrides, "tune.num_samples=3", "tune.max_concurrent_trials=1", "tune.reduction_factor=2",
        "tune.grace_period=1", "tune.seed=1", "tune.top_k_ensemble=2",
        f"tune.search_space={{train.lr: {{type: choice, values: [{GOOD}, {BAD:.5f}]}}}}",
    ]
    run_dir = tmp_path / "run"
    # A driver of its own, stopped with Ctrl-C once trial 3 has started: by then ASHA has stopped trial 2.
    returncode, out = _interrupted_tune_driver(overrides, tiny_task.data_dir, run_dir, "_00002 started (")
    assert returncode == 2 and "tune was interrupted with 1 trial(s) unfinished" in out, out[-3000:]
    assert "stopped at step 4" in out  # ASHA stopped trial 2 ...
    assert out.count(" started (") == 3  # ... and trial 3 started after it

    # Tuner.restore would unpickle the saved sweep: a file changed since this job recorded it is refused.
    tuner_pkl = run_dir / "ray" / "tune" / "tuner.pkl"
    original = tuner_pkl.read_bytes()
    tuner_pkl.write_bytes(original + b"\x00")
    with pytest.raises(TamperedSweepError, match=r"changed: tuner\.pkl"):
        tune.run(tiny_task.config(*overrides[len(tiny_task.overrides):]), tiny_task.data_dir, run_dir)
    tuner_pkl.write_bytes(original)
    capsys.readouterr()

    result = tune.run(tiny_task.config(*overrides[len(tiny_task.overrides):]), tiny_task.data_dir, run_dir)  # Tuner.restore
    second = capsys.readouterr().out

    by_id = {t.trial_id.rsplit("_", 1)[-1]: t for t in result.trials}
    assert by_id["00000"].params["train.lr"] == GOOD and by_id["00000"].status == "finished"
    assert by_id["00000"].best_metric == pytest.approx(0.8)
    assert by_id["00001"].params["train.lr"] == BAD and by_id["00001"].status == "stopped"
    assert by_id["00001"].steps == 4  # stopped by ASHA at its first rung
    assert by_id["00002"].steps >= 4
    assert result.best.trial_id == by_id["00000"].trial_id
    assert len(result.winners()) == 2
    # The restored driver ran only the unfinished trial.
    assert "resuming the sweep" in second
    started = [line for line in second.splitlines() if " started (" in line]
    assert len(started) == 1 and by_id["00002"].trial_id in started[0]


def test_asha_promote_pauses_at_rungs_promotes_from_checkpoints_and_survives_a_driver_restore(
    tiny_task: TinyTask, ray_session: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seed 1 draws GOOD, BAD, BAD; one trial at a time, rungs at steps 4 and 8 (rf 2). GOOD waits at
    # step 4 (alone there) and the first driver is stopped once BAD has started. The restored
    # driver keeps GOOD paused (not started past its slot); BAD reaches step 4 below GOOD, so the
    # free slot promotes GOOD before trial 3 starts; GOOD waits again at step 8 (alone there); trial
    # 3 waits at step 4 below GOOD; with nothing left to start or promote and no trial at the end
    # yet, GOOD goes on to step 12 and the two BAD trials end at their rung.
    overrides = [
        "tune.num_samples=3", "tune.scheduler=asha_promote", "tune.max_concurrent_trials=1", "tune.reduction_factor=2",
        "tune.grace_period=1", "tune.seed=1", "tune.top_k_ensemble=1", "ray.num_workers=1",
        f"tune.search_space={{train.lr: {{type: choice, values: [{GOOD}, {BAD:.5f}]}}}}",
    ]
    run_dir = tmp_path / "run"
    returncode, first = _interrupted_tune_driver([*tiny_task.overrides, *overrides], tiny_task.data_dir, run_dir, "_00001 started (")
    assert returncode == 2 and "_00000 waits at step 4 " in first, first[-3000:]

    result = tune.run(tiny_task.config(*overrides), tiny_task.data_dir, run_dir)  # Tuner.restore
    second = capsys.readouterr().out

    by_id = {t.trial_id.rsplit("_", 1)[-1]: t for t in result.trials}
    assert by_id["00000"].params["train.lr"] == GOOD and by_id["00000"].status == "finished" and by_id["00000"].steps == 12
    assert [(by_id[k].status, by_id[k].steps) for k in ("00001", "00002")] == [("stopped", 4), ("stopped", 4)]
    assert result.total_steps == 12 + 4 + 4  # Ray's ASHAScheduler would have run the first trial to the end unjudged
    assert result.best.trial_id == by_id["00000"].trial_id
    # Each promotion restarted GOOD's Ray Train run, which continued from its last checkpoint.
    assert by_id["00000"].checkpoint_uri is not None
    state = json.loads((Path(by_id["00000"].checkpoint_uri) / "state.json").read_text())
    assert state["resumed_at"] == [4, 8]
    # Workers wait at a rung for the scheduler's go: a paused trial never trained (or checkpointed) past it.
    for key in ("00001", "00002"):
        saved = sorted((run_dir / "ray" / f"trial-{by_id[key].trial_id}").glob("checkpoint_0*"))
        assert [p.name for p in saved] == ["checkpoint_000004"]
    assert "resuming the sweep" in second and "_00000 started (" not in second  # kept paused, then promoted
    assert second.count("_00000 resumes from step ") == 2
    lines = second.splitlines()
    first_promotion = next(i for i, line in enumerate(lines) if "_00000 resumes from step 4" in line)
    third_start = next(i for i, line in enumerate(lines) if "_00002 started (" in line)
    assert first_promotion < third_start  # a free slot promotes before it starts a new trial


def test_a_run_that_cannot_fit_the_local_ray_is_refused_with_the_settings_to_change(ray_session: dict[str, str]) -> None:
    from softprompt.config import RayConfig
    from softprompt.errors import SoftpromptError
    from softprompt.ray.cluster import check_fits

    check_fits(RayConfig(num_workers=2, cpus_per_worker=2.0), tuning=True)  # 4.01 of 5 CPUs
    with pytest.raises(SoftpromptError) as err:
        check_fits(RayConfig(num_workers=3, cpus_per_worker=2.0), tuning=True)
    text = str(err.value)
    assert "needs 6.01 logical CPUs" in text and "has 5" in text and "ray.num_cpus" in text and "ray.num_workers" in text


def test_optuna_proposes_trials_from_the_space_and_the_best_is_kept(tiny_task: TinyTask, ray_session: dict[str, str], tmp_path: Path) -> None:
    cfg = tiny_task.config(
        "tune.num_samples=3", "tune.search=optuna", "tune.scheduler=none", "tune.top_k_ensemble=1", "tune.seed=3", "ray.num_workers=1",
        "train.steps=4", f"tune.search_space={{train.lr: {{type: choice, values: [{GOOD}, {BAD:.5f}]}}, prompt.num_virtual_tokens: {{type: int, low: 2, high: 6}}}}",
    )
    outcome = RayTuneTrainer(echo=print).train(cfg, tiny_task.data_dir, tmp_path / "run", Models(cfg))
    result = tune.TuneResult("", "accuracy", [tune.TrialSummary(**t) for t in outcome.summary["tune"]["all"]])

    assert [t.status for t in result.trials] == ["finished"] * 3
    for t in result.trials:
        assert t.params["train.lr"] in (GOOD, BAD) and 2 <= t.params["prompt.num_virtual_tokens"] <= 6
    assert result.best.best_metric == max(t.best_metric for t in result.trials)
    assert outcome.config.prompt.num_virtual_tokens == result.best.params["prompt.num_virtual_tokens"]


def _interrupted_tune_driver(overrides: list[str], data_dir: Path, run_dir: Path, stop_at: str) -> tuple[int, str]:
    """Run `softprompt tune` as a driver of its own (the CLI, joined to the session's Ray) and stop
    it with Ctrl-C once a line containing `stop_at` appears (or after 400 s): its exit code and output."""
    import ray

    command = [sys.executable, "-m", "softprompt.cli", "tune", *overrides, "--data", str(data_dir),
               "--run-dir", str(run_dir), "--ray-address", ray.get_runtime_context().gcs_address]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 400
    assert driver.stdout is not None
    for line in driver.stdout:
        lines.append(line)
        if stop_at in line or time.monotonic() > deadline:
            break
    driver.send_signal(signal.SIGINT)
    lines.append(driver.communicate(timeout=180)[0])
    return driver.returncode, "".join(lines)
