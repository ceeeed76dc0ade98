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

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from softprompt.config import JobConfig, config_from_dict, replace, to_dict
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.ray import asha
from softprompt.ray import train as ray_train
from softprompt.ray.jobs import TRIAL_CPU, run_reservation

if TYPE_CHECKING:
    from softprompt.modeling import LoadedModel

log = logging.getLogger(__name__)

EXPERIMENT = "tune"
TUNE_METRIC = "best_metric"
"""What trials are ranked, stopped (ASHA) and searched (Optuna) on: the best eval result so far."""


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
    """What a sweep produced: the contract between tune and evaluate."""

    experiment_uri: str
    """Ray Tune's experiment folder (local or `s3://`); pass it to `Tuner.restore` by rerunning."""
    metric: str
    """The eval metric trials were ranked on (`accuracy` or `macro_f1`)."""
    trials: list[TrialSummary]
    """Every trial, best first (errored ones last)."""
    adapter_dirs: list[Path]
    """PEFT adapter folders of the top `tune.top_k_ensemble` trials, best first."""
    best_config: JobConfig
    """The job configuration with the best trial's values."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The best trial's training records (for the report's curves)."""

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
            "ensemble": [str(d) for d in self.adapter_dirs], "experiment": self.experiment_uri,
        }

    def table(self) -> str:
        """One line per trial, best first."""
        keys = sorted({k for t in self.trials for k in t.params})
        width = max([len("trial"), *(len(t.trial_id) for t in self.trials)]) + 2
        lines = [f"{'trial':<{width}}{'status':<10}{'steps':>6}{self.metric:>10}  " + "  ".join(k.split('.')[-1] for k in keys)]
        for t in self.trials:
            value = f"{t.best_metric:.4f}" if t.best_metric is not None else "-"
            lines.append(f"{t.trial_id:<{width}}{t.status:<10}{t.steps:>6}{value:>10}  " + "  ".join(_short(t.params.get(k)) for k in keys))
        return "\n".join(lines)


def run(cfg: JobConfig, data_uri: str | Path, run_dir: str | Path, *, loaded: LoadedModel | None = None, progress: bool = True) -> TuneResult:
    """Search the hyperparameters of `cfg.tune.search_space`, each trial a Ray Train run.

    Needs a connected Ray (`softprompt.jobs.init_ray`). With `tune.num_samples == 0` a single trial
    runs with the configured values.

    Args:
        cfg: The job configuration (`tune`, `ray` and the sections the search space varies).
        data_uri: Ingest's output: a local folder or an `s3://` prefix.
        run_dir: The run folder: trial adapters go to `<run_dir>/tune/<trial>/adapter`.
        loaded: The base model on the driver, to turn checkpoints into adapter files; None loads it.
        progress: Print the live view of the trials.

    Returns:
        Every trial, the top-k adapters (best first) and the best trial's configuration.

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
    storage_path, fs = ray_train.storage_location(cfg.ray, run_dir)
    experiment_path = f"{storage_path}/{EXPERIMENT}"
    experiment_uri = ray_train.checkpoint_uri(experiment_path, cfg.ray)
    data = ray_train.open_datasets(cfg, data_uri)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_trial, cfg_dict=to_dict(trial_cfg), run_dir=str(run_dir), data=data),
        # The trial function only drives its TorchTrainer; the workers reserve the real resources.
        {"cpu": TRIAL_CPU},
    )
    concurrency = max_concurrent_trials(cfg)
    view = LiveView(metric, max(1, t.num_samples), trial_cfg.train.steps, enabled=progress)
    sweep_file = Path(run_dir) / EXPERIMENT / "sweep_config.json"
    sweep = {k: v for k, v in to_dict(trial_cfg).items() if k != "ray"}  # where it runs may change, not what
    existing = ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    if existing and t.resume:
        _check_same_sweep(sweep_file, sweep, experiment_uri)
        print(f"resuming the sweep in {experiment_uri} (finished trials are kept)")
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        if existing:
            print(f"tune.resume=false: starting over; removing the earlier sweep in {experiment_uri}")
            _remove(experiment_path, fs)
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
    print(f"tune: {max(1, t.num_samples)} trial(s), {concurrency} at a time, {cfg.ray.num_workers} Ray Train worker(s) each; "
          f"{t.search} search, scheduler {t.scheduler}; ranking on eval {metric}")
    grid = tuner.fit()
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
    usable = [tr for tr in trials if tr.checkpoint_uri is not None and tr.best_metric is not None]
    if not usable:
        errors = "; ".join(f"{tr.trial_id}: {tr.error}" for tr in trials if tr.error) or "no trial reported a checkpoint"
        raise SoftpromptError(f"tune produced no prompt ({errors}); see the trial logs under {experiment_uri}")
    if loaded is None:
        from softprompt.modeling import load_model

        loaded = load_model(cfg.model)
    adapters: list[Path] = []
    # The ensemble's other members are trials that ran to the end first: a prompt ASHA stopped early
    # is half-trained and drags the mean down. Only when too few ran to the end do stopped ones fill
    # the remaining places (the ensemble must still beat the best prompt on the eval split to win).
    others = sorted(usable[1:], key=lambda tr: tr.status != "finished")  # stable: rank order kept within each group
    members = [usable[0], *others][: t.top_k_ensemble]
    for tr in members:
        assert tr.checkpoint_uri is not None
        adapters.append(ray_train.export_adapter(_with_params(trial_cfg, tr.params), loaded, tr.checkpoint_uri, Path(run_dir) / EXPERIMENT / tr.trial_id))
    history_path = adapters[0].parent / "train_history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    result = TuneResult(experiment_uri, metric, trials, adapters, _with_params(cfg, usable[0].params), history)
    (Path(run_dir) / EXPERIMENT).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / EXPERIMENT / "tune_result.json").write_text(
        json.dumps({**result.summary(), "trials": [t.__dict__ for t in trials]}, indent=1, default=str)
    )
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


def max_concurrent_trials(cfg: JobConfig) -> int:
    """`tune.max_concurrent_trials`, or what the cluster holds: its CPUs (and GPUs with `ray.use_gpu`)
    divided by one trial's reservation (its workers' and its own sliver of a CPU), at least 1 and
    at most `tune.num_samples`."""
    import ray

    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    total = ray.cluster_resources()
    cpus, gpus = run_reservation(cfg.ray, tuning=True)
    fits = total.get("CPU", 0.0) / cpus
    if gpus:
        fits = min(fits, total.get("GPU", 0.0) / gpus)
    return max(1, min(int(fits + 1e-9), max(1, cfg.tune.num_samples)))


class LiveView(Callback):
    """The terminal's view of the sweep, and the `softprompt_trials` gauge (tag `state`).

    A Ray Tune callback on the driver: a line per event (trial started, evaluated, stopped, finished,
    errored) with the trial's state, metric and the best so far, and a status line of counts.
    Plain lines rather than a redrawn table, so logs of a Ray Job read the same.
    """

    def __init__(self, metric: str, total: int, steps: int, *, enabled: bool = True) -> None:
        self.metric, self.total, self.steps, self.enabled = metric, total, steps, enabled
        self.states: dict[str, str] = {}
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore brings back the callbacks pickled with the sweep; a monotonic clock read in
        # another process means nothing here, so the restored view times this driver's run.
        self.__dict__.update(state)
        self.started = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "running"
        step = (trial.last_result or {}).get("step")
        if step is not None:  # promoted past its rung (asha_promote), or restored: its Train run goes on
            self._line(f"trial {trial.trial_id} resumes from step {step}")
            return
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in sorted((trial.config or {}).items()))
        self._line(f"trial {trial.trial_id} started ({params})")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        value, best = result.get(f"eval_{self.metric}"), result.get(TUNE_METRIC)
        if best is not None and (self.best is None or best > self.best[0]):
            self.best = (float(best), trial.trial_id)
        if value is not None:
            self._line(f"trial {trial.trial_id} step {result.get('step')}: {self.metric} {value:.4f} (trial best {best:.4f})")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        # Tune has no pause event for callbacks: asha_promote's paused trials are seen by status.
        for trial in trials:
            if trial.status == "PAUSED" and self.states.get(trial.trial_id) == "running":
                self.states[trial.trial_id] = "paused"
                self._line(f"trial {trial.trial_id} waits at step {(trial.last_result or {}).get('step')} until the rung can judge it")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step") or 0
        self.states[trial.trial_id] = "finished" if step >= self.steps else "stopped"
        self._line(f"trial {trial.trial_id} {self.states[trial.trial_id]} at step {step}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "errored"
        self._line(f"trial {trial.trial_id} errored: {getattr(trial, 'error_file', None) or 'see its logs'}")

    def _line(self, event: str) -> None:
        counts = {s: sum(v == s for v in self.states.values()) for s in ("running", "paused", "stopped", "finished", "errored")}
        try:
            from ray.util.metrics import Gauge

            gauge = _trials_gauge(Gauge)
            for state, n in counts.items():
                gauge.set(n, tags={"state": state})
        except (ImportError, ValueError, RuntimeError):  # metrics are best effort; the sweep goes on
            pass
        if not self.enabled:
            return
        pending = self.total - len(self.states)
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
        elapsed = time.monotonic() - self.started
        status = ", ".join(f"{n} {s}" for s, n in counts.items() if n) + (f", {pending} pending" if pending > 0 else "")
        print(f"[tune {elapsed:5.0f}s] {event} | {status} | {best}", file=sys.stdout, flush=True)


_GAUGE: list[Any] = []


def _trials_gauge(gauge_cls: Any) -> Any:
    if not _GAUGE:
        _GAUGE.append(gauge_cls("softprompt_trials", "Ray Tune trials of the sweep by state.", tag_keys=("state",)))
    return _GAUGE[0]


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
                checkpoint_uri=ray_train.checkpoint_uri(path, rc) if path else None, workers=int(m.get("world_size") or 0),
                error=str(r.error).splitlines()[0][:300] if r.error is not None else None,
            )
        )
    # Best first; ties go to fewer steps, then trial id (a stable order).
    return sorted(out, key=lambda t: (t.best_metric is None, -(t.best_metric or 0.0), t.steps, t.trial_id))


def _with_params(cfg: JobConfig, params: dict[str, Any]) -> JobConfig:
    return ray_train.with_params(cfg, params)


def _trial_name(trial: Any) -> str:
    return str(trial.trial_id)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
