"""The job's `Trainer` on Ray: one Ray Train run, or a Ray Tune sweep of Ray Train runs.

    job.run(cfg, run_dir, RayTrainTrainer(address))    # ray.num_workers DDP workers
    job.run(cfg, run_dir, RayTuneTrainer(address))     # tune.num_samples trials, each a Train run

Both connect to Ray first (a local Ray this command starts, or the cluster at `address`), train,
and only then load the base model, to turn the winners' checkpoints into adapter files in
`<run_dir>/train` and to evaluate them: in the driver on a local Ray without GPUs, else on a worker
(`softprompt.ray.finish`: a cluster's head has no GPU, and a local GPU is the workers'). That
folder's `train_result.json` is the same contract the in-process trainer writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softprompt import checkpoint, evaluate, plan
from softprompt import dataset as ds
from softprompt.config import JobConfig, with_values
from softprompt.errors import SoftpromptError
from softprompt.evaluate import EvaluateResult
from softprompt.job import Models
from softprompt.outcome import TrainOutcome
from softprompt.ray import cluster, dashboard, finish, tune
from softprompt.ray import train as ray_train
from softprompt.uris import is_s3

WINNERS_DIR = "winners"


class _AfterTraining:
    """The work after training, shared by both trainers: in the driver (`models`), or on a worker
    (`finish.ModelHost`, started on first use and kept for the evaluation)."""

    address: str | None
    echo: Callable[[str], None]
    _host: finish.ModelHost | None = None

    def _preflight(self, cfg: JobConfig, data: str | Path) -> JobConfig:
        """Before any worker starts: `train.sharding=auto` chosen (`plan.choose_sharding`), and a GPU
        run that will not fit one GPU refused (`plan.preflight`); returns the configuration to run."""
        def lengths() -> list[int]:
            return [cfg.data.max_tokens] if is_s3(str(data)) else list(ds.read_split(data, "train").lengths)

        local_gpu = None
        if cfg.ray.use_gpu and not joins_cluster(self.address, cfg):
            import torch

            if torch.cuda.is_available():
                local_gpu = int(torch.cuda.get_device_properties(0).total_memory)
        cfg, chosen = plan.choose_sharding(cfg, lengths, gpu_bytes=local_gpu)
        if chosen:
            self.echo(chosen)
        plan.preflight(cfg, lengths, gpu_bytes=local_gpu, where=f"this run ({cfg.ray.num_workers} workers, train.sharding={cfg.train.sharding})")
        return cfg

    def _on_worker(self, cfg: JobConfig) -> bool:
        return finish.on_worker(cfg, joins_cluster(self.address, cfg))

    def _export(self, cfg: JobConfig, models: Models, uri: str, folder: Path) -> Path:
        if not self._on_worker(cfg):
            return ray_train.export_adapter(cfg, models.get(), uri, folder)
        if self._host is None:
            self._host = self._start_host(cfg)
        return self._host.export(cfg, uri, folder)

    def _start_host(self, cfg: JobConfig) -> finish.ModelHost:
        gpu = " and a GPU" if cfg.ray.use_gpu else ""
        self.echo(f"loading {cfg.model.name} on a Ray worker ({cfg.ray.cpus_per_worker:g} CPUs{gpu}) to export and evaluate the winners")
        return finish.ModelHost(cfg)

    def evaluate(
        self, cfg: JobConfig, models: Models, data: str | Path, outcome: TrainOutcome, artifact_dir: Path, *, progress: bool = False
    ) -> EvaluateResult:
        """`softprompt.evaluate.run`: in the driver on a local Ray without GPUs, else on a worker."""
        if self._host is None and not self._on_worker(cfg):
            return evaluate.run(cfg, models.get(), data, outcome, artifact_dir, progress=progress)
        host = self._host or self._start_host(cfg)
        try:
            return host.evaluate(cfg, data, outcome, artifact_dir)
        finally:
            host.close()
            self._host = None


class RayTrainTrainer(_AfterTraining):
    """Training on `ray.num_workers` Ray Train workers (DDP), checkpointed to Ray's storage."""

    def __init__(self, address: str | None = None, *, echo: Callable[[str], None] = print) -> None:
        self.address, self.echo = address, echo

    def describe(self, cfg: JobConfig) -> str:
        """What training will do."""
        return f"train through Ray Train ({cfg.ray.num_workers} workers, {cfg.train.steps} steps) on {cfg.model.name}"

    def train(self, cfg: JobConfig, data: str | Path, run_dir: Path, models: Models) -> TrainOutcome:
        """One `fit`, then its checkpoint's prompt as `<run_dir>/train/adapter`."""
        cfg = self._preflight(cfg, data)
        self.echo(cluster.init_ray(cfg.ray, self.address, tuning=False, job_config=dashboard.job_config(cfg, run_dir, "ray-train")))
        fit = ray_train.fit(cfg, data, run_dir)
        if fit.checkpoint_uri is None:
            raise SoftpromptError(f"the Ray Train run {fit.name} reported no checkpoint; is there an eval split in {data}?")
        out = Path(run_dir) / "train"
        adapter = self._export(cfg, models, fit.checkpoint_uri, out)
        outcome = TrainOutcome("ray-train", out, (adapter,), cfg, _history(adapter.parent), fit.summary())
        outcome.write()
        return outcome


class RayTuneTrainer(_AfterTraining):
    """A Ray Tune sweep over `tune.search_space`; its top `tune.top_k_ensemble` trials are the winners."""

    def __init__(self, address: str | None = None, *, echo: Callable[[str], None] = print, progress: bool = True) -> None:
        self.address, self.echo, self.progress = address, echo, progress

    def describe(self, cfg: JobConfig) -> str:
        """What the sweep will do."""
        trials = max(1, cfg.tune.num_samples)
        return f"tune ({trials} trial{'s' if trials != 1 else ''}, {cfg.ray.num_workers} Ray Train workers each) on {cfg.model.name}"

    def train(self, cfg: JobConfig, data: str | Path, run_dir: Path, models: Models) -> TrainOutcome:
        """The sweep, then each winner's prompt as `<run_dir>/train/winners/<rank>/adapter`, best first."""
        cfg = self._preflight(cfg, data)
        self.echo(cluster.init_ray(cfg.ray, self.address, tuning=True, job_config=dashboard.job_config(cfg, run_dir, "ray-tune")))
        sweep = tune.run(cfg, data, run_dir, progress=self.progress, echo=self.echo, joined=joins_cluster(self.address, cfg))
        self.echo(sweep.table())
        out = Path(run_dir) / "train"
        shutil.rmtree(out / WINNERS_DIR, ignore_errors=True)  # a rerun's ranking replaces the last one
        adapters = []
        for rank, trial in enumerate(sweep.winners()):
            assert trial.checkpoint_uri is not None  # winners() keeps trials with a checkpoint only
            folder = out / WINNERS_DIR / f"{rank:02d}"
            adapters.append(self._export(with_values(cfg, trial.params), models, trial.checkpoint_uri, folder))
            shutil.rmtree(folder / checkpoint.CHECKPOINT_DIR, ignore_errors=True)  # Ray's storage keeps the checkpoints
        best = sweep.best
        summary: dict[str, Any] = {"steps": best.steps, "best_eval_metric": best.best_metric, "workers": best.workers,
                                   "tune": sweep.summary()}
        outcome = TrainOutcome("ray-tune", out, tuple(adapters), with_values(cfg, best.params), _history(adapters[0].parent), summary)
        outcome.write()
        return outcome


def joins_cluster(address: str | None, cfg: JobConfig) -> bool:
    """Whether `cluster.init_ray` joins a cluster (rather than starting a local Ray): the same
    address rule, `--ray-address`, then `ray.address`, then `$RAY_ADDRESS` (set inside a Ray Job)."""
    return bool(address or cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / checkpoint.HISTORY_FILE
    if not path.is_file():
        return []
    history: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return history
