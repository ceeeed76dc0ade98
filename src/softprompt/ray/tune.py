"""Tune (`softprompt tune`): a hyperparameter search in which every trial is a Ray Train run.

    result = run(cfg, data_uri, run_dir)    # Tuner -> trials -> ray_train.fit -> TorchTrainer
    result.adapter_dirs                     # the best trial's prompt first, then the next best

Ray 2.60 runs Ray Train V2, where `Tuner(trainer)` no longer works: a trial is a function that
builds and fits a TorchTrainer (`ray_train.fit`), whose TuneReportCallback forwards rank 0's
reports (with the checkpoint's path) to Tune. ASHA compares trials on `best_metric` (the best eval
result so far) after each evaluation round; the search is random or Optuna (TPE).

The winner is chosen on `best_metric`, and its prompt is read from the last checkpoint path the
trial reported: `ResultGrid.get_best_result().checkpoint` is None for function trainables that
only forward paths. Every checkpoint holds the best prompt so far, so the last one suffices, also
for trials that ASHA stopped.

A stopped driver resumes with `Tuner.restore` (rerun the same command): finished trials are kept,
unfinished ones continue from their Ray Train run's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.config import JobConfig, config_from_dict, replace, to_dict
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.ray import asha, dashboard, monitor, sweep_state
from softprompt.ray import train as ray_train
from softprompt.ray.cluster import TRIAL_CPU, run_reservation
from softprompt.ray.storage import checkpoint_uri, storage_location
from softprompt.ray.view import TUNE_METRIC, LiveView, short

log = logging.getLogger(__name__)

EXPERIMENT = "tune"


@dataclass(frozen=True)
class TrialSummary:
    """One trial of the sweep."""

    trial_id: str
    params: dict[str, Any]
    """The sampled values, by `section.key`."""
    status: str
    """`finished` (all steps), `stopped` (ASHA or early stopping ended it sooner), `errored`."""
    best_metric: float | None
    steps: int
    checkpoint_uri: str | None
    workers: int = 0
    """Ray Train workers the trial trained with."""
    error: str | None = None


@dataclass(frozen=True)
class TuneResult:
    """What a sweep produced: every trial, ranked, with where its prompt is."""

    experiment_uri: str
    """Ray Tune's experiment folder (local or `s3://`); rerunning the same command restores it."""
    metric: str
    """The eval metric trials were ranked on (`accuracy` or `macro_f1`)."""
    trials: list[TrialSummary]
    """Every trial, best first (errored ones last)."""
    top_k: int = 1
    """How many trials' prompts are winners (`tune.top_k_ensemble`)."""

    def winners(self) -> list[TrialSummary]:
        """The trials whose prompts are evaluated, best first: the best trial, then (for the
        ensemble) trials that ran to the end, and only when too few did, trials stopped early: a
        prompt ASHA stopped is half-trained and drags an ensemble's mean down. The ensemble must
        still beat the best prompt on the eval split to win."""
        usable = [tr for tr in self.trials if tr.checkpoint_uri is not None and tr.best_metric is not None]
        others = sorted(usable[1:], key=lambda tr: tr.status != "finished")  # stable: rank order kept within each group
        return [usable[0], *others][: self.top_k] if usable else []

    @property
    def best(self) -> TrialSummary:
        """The winning trial."""
        return self.trials[0]

    @property
    def total_steps(self) -> int:
        """Optimizer steps summed over all trials (what ASHA saves on)."""
        return sum(t.steps for t in self.trials)

    def summary(self) -> dict[str, Any]:
        """Tuning facts for the run manifest."""
        return {
            "trials": len(self.trials), "metric": self.metric, "total_steps": self.total_steps,
            "by_status": {s: sum(t.status == s for t in self.trials) for s in ("finished", "stopped", "errored")},
            "best": {"trial_id": self.best.trial_id, "params": self.best.params, "best_metric": self.best.best_metric, "steps": self.best.steps},
            "winners": [w.trial_id for w in self.winners()], "experiment": self.experiment_uri,
            "all": [dataclasses.asdict(tr) for tr in self.trials],
        }

    def table(self) -> str:
        """One line per trial, best first."""
        keys = sorted({k for t in self.trials for k in t.params})
        width = max([len("trial"), *(len(t.trial_id) for t in self.trials)]) + 2
        lines = [f"{'trial':<{width}}{'status':<10}{'steps':>6}{self.metric:>10}  " + "  ".join(k.split('.')[-1] for k in keys)]
        for t in self.trials:
            value = f"{t.best_metric:.4f}" if t.best_metric is not None else "-"
            lines.append(f"{t.trial_id:<{width}}{t.status:<10}{t.steps:>6}{value:>10}  " + "  ".join(short(t.params.get(k)) for k in keys))
        return "\n".join(lines)


def run(
    cfg: JobConfig, data_uri: str | Path, run_dir: str | Path, *, progress: bool = True, echo: Callable[[str], None] = print,
    joined: bool = False,
) -> TuneResult:
    """Search the hyperparameters of `cfg.tune.search_space`, each trial a Ray Train run.

    Needs a connected Ray (`softprompt.ray.cluster.init_ray`). With `tune.num_samples == 0` a single
    trial runs with the configured values.

    Args:
        cfg: The job configuration (`tune`, `ray` and the sections the search space varies).
        data_uri: Ingest's output: a local folder or an `s3://` prefix.
        run_dir: The run folder: Ray's storage defaults to `<run_dir>/ray`, the sweep's settings are
            kept in `<run_dir>/train/sweep_config.json` (a resumed sweep must not change them).
        progress: Print the live view of the trials.
        echo: Receives the sweep's own lines (resuming, starting over, its shape).
        joined: Ray is a cluster this process joined, not a local Ray it started (for
            `max_concurrent_trials`).

    Returns:
        Every trial, ranked, with the checkpoint holding its best prompt.

    Raises:
        SoftpromptError: when the sweep was interrupted (rerun to resume) or no trial produced a prompt.
    """
    import ray.tune

    t = cfg.tune
    # Trials run in their own working directories: every local path they get must be absolute.
    run_dir = Path(run_dir).resolve()
    if cfg.ray.storage_path and "://" not in cfg.ray.storage_path:
        cfg = replace(cfg, [f"ray.storage_path={Path(cfg.ray.storage_path).resolve()}"])
    metric = t.metric or cfg.evaluate.primary_metric
    # Trials keep (and ASHA compares) their best prompt by the metric the sweep ranks on.
    trial_cfg = replace(cfg, [f"evaluate.primary_metric={metric}"])
    concurrency = max_concurrent_trials(cfg, joined=joined)
    storage_path, fs = storage_location(cfg, run_dir)
    experiment_path = f"{storage_path}/{EXPERIMENT}"
    experiment_uri = checkpoint_uri(experiment_path, cfg.ray)
    data = ray_train.open_datasets(cfg, data_uri)
    view = LiveView(metric, max(1, t.num_samples), trial_cfg.train.steps, enabled=progress)
    sweep_file = Path(run_dir) / "train" / "sweep_config.json"
    sweep = {k: v for k, v in to_dict(trial_cfg).items() if k != "ray"}  # where it runs may change, not what
    existing = ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    restore = existing and t.resume
    if restore:
        _check_same_sweep(sweep_file, sweep, experiment_uri)
        # Tuner.restore unpickles the saved sweep: only one whose files this job recorded.
        restore = sweep_state.verify(experiment_path, fs, run_dir, experiment_uri)
        if not restore:
            echo(f"the sweep in {experiment_uri} has no record of its files in this run folder ({sweep_state.RECORD}), so "
                 "it cannot be verified and is not restored; starting over")
    trial_fn = ray.tune.with_parameters(_trial, cfg_dict=to_dict(trial_cfg), run_dir=str(run_dir), data=data)
    # Tune names the trainable, and reprs every trial's actor, after the function: the run's name
    # finds the trials in the dashboard's actor tables (softprompt.ray.dashboard).
    trial_fn.__name__ = dashboard.sweep_label(run_dir, restoring=restore)
    # The trial function only drives its TorchTrainer; the workers reserve the real resources.
    trainable = ray.tune.with_resources(trial_fn, {"cpu": TRIAL_CPU})
    if restore:
        echo(f"resuming the sweep in {experiment_uri} (finished trials are kept)")
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        if existing:
            if not t.resume:
                echo(f"tune.resume=false: starting over; removing the earlier sweep in {experiment_uri}")
            _remove(experiment_path, fs)
        sweep_state.forget(run_dir)
        sweep_file.parent.mkdir(parents=True, exist_ok=True)
        sweep_file.write_text(json.dumps(sweep, indent=1, sort_keys=True))
        scheduler, search = _scheduler_and_search(t, trial_cfg, concurrency)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(t.search_space) if t.num_samples >= 1 else {},
            tune_config=ray.tune.TuneConfig(
                metric=TUNE_METRIC, mode="max", search_alg=search, scheduler=scheduler, num_samples=max(1, t.num_samples),
                # A searcher (Optuna) is limited by Tune; the random generator limits itself, and
                # asha_promote limits both through its scheduler (see _scheduler_and_search).
                max_concurrent_trials=concurrency if t.search == "optuna" and t.scheduler != "asha_promote" else None, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=ray.tune.RunConfig(
                name=EXPERIMENT, storage_path=storage_path, storage_filesystem=fs, callbacks=[view], verbose=0,
            ),
        )
    echo(f"tune: {max(1, t.num_samples)} trial(s), {concurrency} at a time, {cfg.ray.num_workers} Ray Train worker(s) each; "
          f"{t.search} search, scheduler {t.scheduler}; ranking on eval {metric}")
    echo(f"live metrics: {run_dir / monitor.PAGE} (open it in a browser; it reloads itself)")
    try:
        with monitor.live(run_dir):
            grid = tuner.fit()
    finally:
        sweep_state.record(experiment_path, fs, run_dir)
    trials = _summaries(grid, trial_cfg, cfg.ray)
    # The grid's trials are all TERMINATED after an interruption (Tune stops them on cleanup); the
    # experiment state it saved just before says which ones had not ended.
    saved = ray.tune.ExperimentAnalysis(experiment_path, storage_filesystem=fs)
    unfinished = [tr for tr in saved.trials if tr.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SoftpromptError(
            f"tune was interrupted with {len(unfinished)} trial(s) unfinished; rerun the same command to resume "
            f"the sweep in {experiment_uri} (finished trials are kept)"
        )
    result = TuneResult(experiment_uri, metric, trials, t.top_k_ensemble)
    if not result.winners():
        errors = "; ".join(f"{tr.trial_id}: {tr.error}" for tr in trials if tr.error) or "no trial reported a checkpoint"
        raise SoftpromptError(f"tune produced no prompt ({errors}); see the trial logs under {experiment_uri}")
    return result


def _scheduler_and_search(t: Any, trial_cfg: JobConfig, concurrency: int) -> tuple[Any, Any]:
    """Tune's scheduler and search algorithm for `tune.scheduler` and `tune.search`."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tr = trial_cfg.train
    if t.scheduler == "asha_promote":
        promote = asha.PromotionScheduler(
            metric=TUNE_METRIC, steps=tr.steps, eval_every=tr.eval_every, grace_period=t.grace_period,
            reduction_factor=t.reduction_factor, max_concurrent=concurrency, num_samples=max(1, t.num_samples),
        )
        if t.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return promote, asha.GatedSearchGenerator(OptunaSearch(seed=t.seed), promote)
        return promote, asha.GatedVariantGenerator(promote, random_state=t.seed)
    if t.scheduler == "asha":
        rounds = math.ceil(tr.steps / tr.eval_every)
        # Derived max_t is one past the last round: ASHA would otherwise "stop" every trial at
        # its final report, killing its Train run instead of letting it shut down by itself.
        max_t = t.max_t or rounds + 1
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration", max_t=max_t, grace_period=min(t.grace_period, max_t), reduction_factor=t.reduction_factor
        )
    else:
        scheduler = FIFOScheduler()
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return scheduler, OptunaSearch(seed=t.seed)
    # Tune ignores max_concurrent_trials for a generator passed in: it takes its own limit.
    return scheduler, BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


def search_space(spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`tune.search_space` as Ray Tune sampling domains (keys stay `section.key`)."""
    import ray.tune

    out: dict[str, Any] = {}
    for key, s in spec.items():
        kind = s["type"]
        if kind == "loguniform":
            out[key] = ray.tune.loguniform(s["low"], s["high"])
        elif kind == "uniform":
            out[key] = ray.tune.uniform(s["low"], s["high"])
        elif kind == "int":
            out[key] = ray.tune.randint(s["low"], s["high"] + 1)
        else:
            out[key] = ray.tune.choice(s["values"])
    return out


def max_concurrent_trials(cfg: JobConfig, *, joined: bool = False) -> int:
    """`tune.max_concurrent_trials`, or what the cluster holds: its CPUs (and GPUs with `ray.use_gpu`)
    divided by one trial's reservation (its workers' and its own sliver of a CPU), at least 1 and
    at most `tune.num_samples`.

    Args:
        cfg: The job configuration.
        joined: This process joined a cluster (rather than starting a local Ray).

    Raises:
        ConfigError: a joined cluster has fewer GPUs than one trial needs (an autoscaling cluster
            before its GPU nodes start reports none), and `tune.max_concurrent_trials` is not set.
    """
    import ray

    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    total = ray.cluster_resources()
    cpus, gpus = run_reservation(cfg.ray, tuning=True)
    if joined and gpus and total.get("GPU", 0.0) + 1e-9 < gpus:
        # Deriving 1 here would run the whole sweep one trial at a time once the nodes are up.
        raise ConfigError(
            f"tune.max_concurrent_trials is not set and the cluster has {total.get('GPU', 0.0):g} GPUs now, fewer than "
            f"one trial needs ({gpus:g}: ray.num_workers={cfg.ray.num_workers} x ray.gpus_per_worker="
            f"{cfg.ray.gpus_per_worker or 1.0:g}), as an autoscaling cluster reports before its GPU nodes start; "
            "set tune.max_concurrent_trials to the trials to run at once"
        )
    fits = total.get("CPU", 0.0) / cpus
    if gpus:
        fits = min(fits, total.get("GPU", 0.0) / gpus)
    return max(1, min(int(fits + 1e-9), max(1, cfg.tune.num_samples)))


def _trial(config: dict[str, Any], *, cfg_dict: dict[str, Any], run_dir: str, data: dict[str, Any]) -> None:
    """A Tune trial: one Ray Train run with the trial's values (reports reach Tune by callback)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = config_from_dict(cfg_dict)
    hold_at: tuple[int, ...] = ()
    if cfg.tune.scheduler == "asha_promote":
        hold_at = tuple(asha.rungs(cfg.train.steps, cfg.train.eval_every, cfg.tune.grace_period, cfg.tune.reduction_factor))
    ray_train.fit(cfg, "", run_dir, config, name=asha.train_run_name(trial_id), datasets=data, report_to_tune=True, hold_at=hold_at)


def _check_same_sweep(path: Path, sweep: dict[str, Any], where: str) -> None:
    """Tuner.restore continues the saved sweep whatever the config says now: refuse a changed one."""
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(sweep, sort_keys=True))
    changed = sorted(
        f"{section}.{key}".rstrip(".") for section in set(before) | set(now)
        for key in set(_as_dict(before.get(section))) | set(_as_dict(now.get(section)))
        if _as_dict(before.get(section)).get(key) != _as_dict(now.get(section)).get(key)
    )
    if changed:
        raise ConfigError(
            f"the sweep in {where} was started with other values of {', '.join(changed)}; rerun with the "
            "original config to resume it, pass tune.resume=false to start it over, or use another --run-dir"
        )


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"": value}


def _remove(path: str, fs: Any) -> None:
    if fs is None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        fs.delete_dir(path)


def _summaries(grid: Any, cfg: JobConfig, rc: Any) -> list[TrialSummary]:
    out = []
    for r in grid:
        m = r.metrics or {}
        step = int(m.get("step") or 0)
        status = "errored" if r.error is not None else ("finished" if step >= cfg.train.steps else "stopped")
        path = m.get("checkpoint_path")
        out.append(
            TrialSummary(
                trial_id=str(m.get("trial_id") or Path(r.path).name), params=dict(r.config or {}), status=status,
                best_metric=float(m[TUNE_METRIC]) if m.get(TUNE_METRIC) is not None else None, steps=step,
                checkpoint_uri=checkpoint_uri(path, rc) if path else None, workers=int(m.get("world_size") or 0),
                error=str(r.error).splitlines()[0][:300] if r.error is not None else None,
            )
        )
    # Best first; ties go to fewer steps, then trial id (a stable order).
    return sorted(out, key=lambda t: (t.best_metric is None, -(t.best_metric or 0.0), t.steps, t.trial_id))


def _trial_name(trial: Any) -> str:
    return str(trial.trial_id)
