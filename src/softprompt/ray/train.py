"""Ray Train: the same training loop on N workers (DDP), fed by Ray Data, checkpointed to storage.

    fit(cfg, data_uri, run_dir)      # the driver: one TorchTrainer run, returns where its checkpoint is
    worker.train_worker(config)      # every worker: `softprompt.train.run` with Ray's hooks

Ray Tune reuses `fit` unchanged for every trial (`softprompt.ray.tune`).

Choices worth knowing:
- Data: the training rows are split across workers by Ray Data (`get_dataset_shard`) with order
  preserved and locality off, so the same data and worker count always give the same shards; a
  restarted worker group therefore sees the same batches, and a resumed run ends on the same prompt
  as an uninterrupted one.
- Evaluation is sharded and reduced: the eval split (at most `train.eval_max_rows` rows are
  scored) is read once by the driver and shipped with the worker config; rank r scores rows
  r, r + N, ..., and the predictions are all-gathered so every rank computes the same metrics,
  hence the same best-prompt and early-stopping decisions, in 1/N of the time. Only rank 0 writes
  and reports the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt import checkpoint
from softprompt.config import JobConfig, RayConfig, replace, to_dict, with_values
from softprompt.errors import DataError, SoftpromptError
from softprompt.ray import monitor
from softprompt.ray.storage import (
    checkpoint_uri,
    download_checkpoint,
    file_exists,
    s3_filesystem,
    storage_location,
)
from softprompt.ray.worker import train_worker
from softprompt.uris import is_s3

if TYPE_CHECKING:
    import pyarrow.fs

    from softprompt.modeling import LoadedModel

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Train V2 reads the worker-group start timeout from this variable in the process that calls
`fit()` and passes it on to the controller and workers (ray/train/v2/_internal/constants.py)."""


@dataclass(frozen=True)
class DistributedResult:
    """What one Ray Train run produced."""

    name: str
    """The Ray Train run name (a folder under the storage path)."""
    config: JobConfig
    """The configuration the run trained with (trial overrides applied)."""
    checkpoint_uri: str | None
    """The latest checkpoint: a local folder or `s3://...` URI; it holds the best prompt so far."""
    metrics: dict[str, Any]
    """The last metrics rank 0 reported (step, train_loss, eval_*, best_metric)."""
    workers: list[dict[str, Any]] = field(default_factory=list)
    """Per worker: rank, rows, steps, tokens_per_second, seconds, peak_rss_mb, peak_gpu_mb."""

    @property
    def best_metric(self) -> float | None:
        """The best eval metric reached (the checkpoint's prompt scores this)."""
        value = self.metrics.get("best_metric")
        return float(value) if value is not None else None

    def summary(self) -> dict[str, Any]:
        """Training facts for the run manifest (the shape `evaluate` records for in-process runs)."""
        w = self.workers
        return {
            "steps": self.metrics.get("step"),
            "best_eval_metric": self.best_metric,
            "workers": len(w) or self.config.ray.num_workers,
            "seconds": round(max((x["seconds"] for x in w), default=0.0), 1),
            "tokens_per_second": round(sum(x["tokens_per_second"] for x in w), 1),
            "peak_rss_mb": round(max((x["peak_rss_mb"] for x in w), default=0.0), 1),
            "peak_gpu_mb": max((x["peak_gpu_mb"] for x in w if x["peak_gpu_mb"] is not None), default=None),
            "checkpoint": self.checkpoint_uri,
        }


def fit(
    cfg: JobConfig,
    data_uri: str | Path,
    run_dir: str | Path,
    trial_overrides: dict[str, Any] | list[str] | None = None,
    *,
    name: str = "train",
    datasets: dict[str, Any] | None = None,
    report_to_tune: bool = False,
    hold_at: tuple[int, ...] = (),
) -> DistributedResult:
    """Train a soft prompt with `cfg.ray.num_workers` Ray Train workers.

    Needs a connected Ray (`softprompt.ray.cluster.init_ray`). Rerunning with the same run folder and
    name resumes from the run's latest checkpoint in storage.

    Args:
        cfg: The job configuration.
        data_uri: A prepared dataset (ingest's output): a local folder or an `s3://` prefix.
        run_dir: The run folder; storage defaults to `<run_dir>/ray`.
        trial_overrides: This run's values (a Tune trial's hyperparameters): `{"train.lr": 0.05}`
            or `["train.lr=0.05"]`.
        name: Ray Train run name (unique per run folder; Tune passes one per trial).
        datasets: `open_datasets`' result (Tune opens it once on the driver); None opens it here.
        report_to_tune: Forward every report to the enclosing Ray Tune trial.
        hold_at: Steps after whose report the workers wait for the scheduler's go
            (`softprompt.ray.asha`: a trial told to wait at a rung must not train on meanwhile).

    Returns:
        The run's latest checkpoint, last metrics and per-worker throughput.

    Raises:
        SoftpromptError: when the run fails after its retries (the message names the run and storage).
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    # At runtime `ray.train` exports Train V2's classes (the default in 2.60); its type stubs are
    # V1's, which lack e.g. `controller_failure_limit`. Hence the untyped handle.
    rt: Any = ray.train
    if isinstance(trial_overrides, dict):
        run_cfg = with_values(cfg, trial_overrides)
    else:
        run_cfg = replace(cfg, trial_overrides) if trial_overrides else cfg
    run_cfg = _absolute_paths(run_cfg)
    rc = run_cfg.ray
    storage_path, storage_fs = storage_location(run_cfg, run_dir)
    data = datasets if datasets is not None else open_datasets(run_cfg, data_uri)
    callbacks: list[Any] = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer: Any = TorchTrainer(
        train_worker,  # type: ignore[arg-type]
        train_loop_config={"cfg": to_dict(run_cfg), "trial": name, "eval": data["eval"], "hold_at": list(hold_at)},
        torch_config=TorchConfig(backend="nccl" if rc.use_gpu else "gloo"),
        scaling_config=scaling_config(rc),
        run_config=rt.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=rt.FailureConfig(max_failures=rc.max_failures, controller_failure_limit=rc.controller_failure_limit),
            checkpoint_config=rt.CheckpointConfig(
                num_to_keep=rc.checkpoints_to_keep, checkpoint_score_attribute="eval_metric", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
            logging_config=rt.LoggingConfig(log_level=rc.train_log_level),
        ),
        datasets={"train": data["train"]},
        # Order preserved and no locality hints: the split must not depend on which node or worker
        # asked first, so a restarted worker group gets the same shards.
        dataset_config=rt.DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False),
    )
    where = f"{'s3://' if is_s3(rc.storage_path) else ''}{storage_path}/{name}"
    try:
        # Train V2 takes the start timeout from this process's environment when fit() creates its
        # controller; set only for the call, so the rest of the process keeps its own value.
        # A Tune trial's run is watched by the sweep's driver; a run of its own, by this driver.
        watch = contextlib.nullcontext() if report_to_tune else monitor.live(run_dir)
        with scoped_env(START_TIMEOUT_ENV, str(rc.worker_start_timeout_s)), watch:
            result = trainer.fit()
    except rt.TrainingFailedError as exc:
        raise SoftpromptError(f"Ray Train run {name!r} failed after {rc.max_failures} retries (storage {where}): {exc}") from exc
    ckpt = result.checkpoint
    returned = result.return_value if isinstance(result.return_value, dict) else {}
    return DistributedResult(
        name=name,
        config=run_cfg,
        checkpoint_uri=checkpoint_uri(ckpt.path, rc) if ckpt is not None else None,
        metrics=dict(result.metrics or {}),
        workers=list(returned.get("workers", [])),
    )


@contextlib.contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """Set environment variable `name` for the duration of the block, then put back what was there."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _absolute_paths(cfg: JobConfig) -> JobConfig:
    """Workers do not start in this process's working directory: make relative local paths of the
    model and an initial prompt absolute (they must exist at the same path on every node)."""
    params = {}
    for key, value in (("model.name", cfg.model.name), ("prompt.init_from", cfg.prompt.init_from)):
        if value and "://" not in value and not Path(value).is_absolute() and Path(value).exists():
            params[key] = str(Path(value).resolve())
    return with_values(cfg, params) if params else cfg


def open_datasets(cfg: JobConfig, data_uri: str | Path) -> dict[str, Any]:
    """The prepared dataset for `fit`: `train` as a Ray Dataset in the object store, `eval` as a
    `Split` in memory. Read once on the driver (Tune shares it between trials).

    `s3://` prefixes go through `ray.data.read_parquet` with pyarrow's S3 filesystem
    (`s3.endpoint` as its endpoint), materialized now:
    Ray Data lists files in a task that needs a whole CPU, which a cluster full of training workers
    would never give it. A local folder is read here and handed to Ray Data with `from_arrow`: it
    exists on this machine only, and no Ray task (which may run on another node) could read it.

    Raises:
        DataError: when a split file is missing or unreadable (says to run ingest).
    """
    import pyarrow.parquet as pq
    import ray.data

    from softprompt.dataset import Split

    uri = str(data_uri).rstrip("/")
    fs: pyarrow.fs.FileSystem | None = None
    if is_s3(uri):
        fs, base = s3_filesystem(cfg.s3), uri[len("s3://") :]
    else:
        base = str(Path(uri).resolve())
    for split in ("train", "eval"):
        if not file_exists(fs, f"{base}/{split}.parquet"):
            raise DataError(f"{uri}/{split}.parquet does not exist; run `softprompt ingest` first or check --data")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        if fs is not None:
            train_ds = ray.data.read_parquet(f"{base}/train.parquet", filesystem=fs).materialize()
        else:
            train_ds = ray.data.from_arrow(pq.read_table(f"{base}/train.parquet"))
        eval_rows = Split.from_table(pq.read_table(f"{base}/eval.parquet", filesystem=fs))
    except OSError as exc:
        raise DataError(f"cannot read the prepared dataset at {uri}: {exc}") from exc
    return {"train": train_ds, "eval": eval_rows}


def export_adapter(cfg: JobConfig, loaded: LoadedModel, uri: str, output_dir: str | Path) -> Path:
    """Write a checkpoint's prompt as PEFT adapter files in `<output_dir>/adapter` (plus
    `train_history.json`); the checkpoint may be a local folder or an `s3://` URI.

    Returns:
        The adapter folder.
    """
    out = Path(output_dir)
    local = out / checkpoint.CHECKPOINT_DIR
    download_checkpoint(uri, local, cfg.s3)
    return checkpoint.export_checkpoint(cfg, loaded, local, out)


def scaling_config(rc: RayConfig) -> Any:
    """Ray Train's ScalingConfig for `ray`: workers, CPUs and GPUs each, accelerator type."""
    import ray.train

    resources: dict[str, float] = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = rc.gpus_per_worker if rc.gpus_per_worker is not None else 1.0
    return ray.train.ScalingConfig(
        num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources, accelerator_type=rc.accelerator_type
    )


