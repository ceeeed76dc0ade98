"""Ray Train: the same training loop on N workers (DDP), fed by Ray Data, checkpointed to storage.

    fit(cfg, data_uri, run_dir)      # driver: one TorchTrainer run, returns where its checkpoint is
    train_worker(config)             # every worker: `softprompt.train.run` with Ray's hooks

The worker function is the laptop loop plus a few Ray seams, each marked `# [ray]`: the dataset
shard, the checkpoint to resume from, DDP, and `ray.train.report`. Ray Tune reuses `fit` unchanged
for every trial (`softprompt.tune`).

Choices worth knowing:
- Data: the training rows are split across workers by Ray Data (`get_dataset_shard`) with order
  preserved and locality off, so the same data and worker count always give the same shards; a
  restarted worker group therefore sees the same batches, and a resumed run ends on the same prompt
  as an uninterrupted one.
- Evaluation is sharded and reduced: the eval split (at most `train.eval_max_rows` rows are
  scored) is read once by the driver and shipped with the worker config; rank r scores rows
  r, r + N, ..., and the predictions are all-gathered (`_RayHooks.gather`) so every rank computes
  the same metrics, hence the same best-prompt and early-stopping decisions, in 1/N of the time.
  Only rank 0 writes and reports the checkpoint.
- A worker's local folder is fresh for every attempt and filled only from `ray.train.get_checkpoint()`,
  never from files a dead worker left behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from softprompt import train
from softprompt.config import JobConfig, RayConfig, config_from_dict, replace, to_dict
from softprompt.errors import DataError, SoftpromptError

if TYPE_CHECKING:
    import pyarrow.fs
    import torch

    from softprompt.dataset import Split
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

    Needs a connected Ray (`softprompt.jobs.init_ray`). Rerunning with the same run folder and
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
        run_cfg = with_params(cfg, trial_overrides)
    else:
        run_cfg = replace(cfg, trial_overrides) if trial_overrides else cfg
    run_cfg = _absolute_paths(run_cfg)
    rc = run_cfg.ray
    storage_path, storage_fs = storage_location(rc, run_dir)
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
    where = f"{'s3://' if _is_s3(rc.storage_path) else ''}{storage_path}/{name}"
    try:
        # Train V2 takes the start timeout from this process's environment when fit() creates its
        # controller; set only for the call, so the rest of the process keeps its own value.
        with scoped_env(START_TIMEOUT_ENV, str(rc.worker_start_timeout_s)):
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
    return with_params(cfg, params) if params else cfg


def with_params(cfg: JobConfig, params: dict[str, Any]) -> JobConfig:
    """A copy of `cfg` with `{"section.key": value}` set (typed values, not YAML text) and validated."""
    raw = to_dict(cfg)
    for key, value in params.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return config_from_dict(raw)


def open_datasets(cfg: JobConfig, data_uri: str | Path) -> dict[str, Any]:
    """The prepared dataset for `fit`: `train` as a Ray Dataset in the object store, `eval` as a
    `Split` in memory. Read once on the driver (Tune shares it between trials).

    `s3://` prefixes go through `ray.data.read_parquet` with pyarrow's S3 filesystem
    (`ray.storage_endpoint_url`, else `data.s3_endpoint_url`, as its endpoint), materialized now:
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
    if _is_s3(uri):
        fs, base = s3_filesystem(cfg.ray.storage_endpoint_url or cfg.data.s3_endpoint_url), uri[len("s3://") :]
    else:
        base = str(Path(uri).resolve())
    for split in ("train", "eval"):
        if not _exists(fs, f"{base}/{split}.parquet"):
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


def export_adapter(cfg: JobConfig, loaded: LoadedModel, checkpoint: str, output_dir: str | Path) -> Path:
    """Write a checkpoint's prompt as PEFT adapter files in `<output_dir>/adapter` (plus
    `train_history.json`); the checkpoint may be a local folder or an `s3://` URI.

    Returns:
        The adapter folder.
    """
    out = Path(output_dir)
    local = out / train.CHECKPOINT_DIR
    download_checkpoint(checkpoint, local, cfg.ray)
    return train.export_checkpoint(cfg, loaded, local, out)


def download_checkpoint(uri: str, dest: str | Path, rc: RayConfig) -> Path:
    """Copy a checkpoint folder (local or `s3://`) to `dest`, replacing what is there."""
    from ray.train import Checkpoint

    target = Path(dest)
    if target.exists():
        shutil.rmtree(target)
    if _is_s3(uri):
        ckpt = Checkpoint(uri[len("s3://") :], filesystem=s3_filesystem(rc.storage_endpoint_url))
    else:
        ckpt = Checkpoint.from_directory(uri)
    try:
        ckpt.to_directory(str(target))
    except OSError as exc:
        raise SoftpromptError(f"cannot download checkpoint {uri} to {target}: {exc}") from exc
    return target


def scaling_config(rc: RayConfig) -> Any:
    """Ray Train's ScalingConfig for `ray`: workers, CPUs and GPUs each, accelerator type."""
    import ray.train

    resources: dict[str, float] = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = rc.gpus_per_worker if rc.gpus_per_worker is not None else 1.0
    return ray.train.ScalingConfig(
        num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources, accelerator_type=rc.accelerator_type
    )


def storage_location(rc: RayConfig, run_dir: str | Path) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Storage path and filesystem for Ray Train/Tune's RunConfig.

    `null` storage is `<run_dir>/ray` (absolute). A configured storage path gets the run folder's
    name appended, so runs sharing a bucket do not mix. For `s3://` the path is returned without its
    scheme together with a pyarrow S3 filesystem carrying the custom endpoint.
    """
    if rc.storage_path is None or not _is_s3(rc.storage_path):
        _warn_if_not_shared(rc)
    if rc.storage_path is None:
        return str((Path(run_dir) / "ray").resolve()), None
    base = f"{rc.storage_path.rstrip('/')}/{Path(run_dir).name}"
    if _is_s3(base):
        return base[len("s3://") :], s3_filesystem(rc.storage_endpoint_url)
    return str(Path(base).resolve()), None


def _warn_if_not_shared(rc: RayConfig) -> None:
    import ray

    if ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        log.warning(
            "ray.storage_path=%s is a local path on a multi-node cluster: every node must see it at the same "
            "path (NFS); otherwise set ray.storage_path=s3://bucket/prefix", rc.storage_path or "<run folder>/ray",
        )


def checkpoint_uri(path: str, rc: RayConfig) -> str:
    """A checkpoint path as Ray reports it (scheme stripped on S3) turned back into a URI."""
    return f"s3://{path.lstrip('/')}" if _is_s3(rc.storage_path) and not _is_s3(path) else path


def s3_filesystem(endpoint_url: str | None) -> pyarrow.fs.FileSystem:
    """A pyarrow S3 filesystem; `endpoint_url` (e.g. `http://127.0.0.1:9000`) becomes its
    `endpoint_override` and scheme, since pyarrow ignores AWS_ENDPOINT_URL. Credentials and region
    come from the standard AWS chain of each process that uses it."""
    import pyarrow.fs

    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pyarrow.fs.S3FileSystem(**kwargs)


# --------------------------------------------------------------------------------------------------
# The worker


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function: load the model, read this worker's shard, run the loop.

    Returns (rank 0): `{"workers": [...]}` with every rank's throughput and peak memory.
    """
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from softprompt.modeling import load_model

    cfg = config_from_dict(config["cfg"])
    # Ray Train's LoggingConfig filters its console handler, but worker records also reach the
    # driver through Ray's own handler: set the level at the source too (every report is INFO).
    # Ray 2.60's per-report line comes from a logger named by its file path, outside "ray.train".
    from ray.train.v2._internal.execution import context as train_context  # [ray]

    for name in ("ray.train", train_context.__file__):
        logging.getLogger(name).setLevel(cfg.ray.train_log_level)
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.ray.use_gpu:
        device = str(ray.train.torch.get_device())  # [ray] this worker's GPU
    else:
        device = "cpu"
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    loaded = load_model(cfg.model, device=device)
    rows = _materialize(ray.train.get_dataset_shard("train"))  # [ray] this worker's rows
    eval_rows: Split = config["eval"]
    work = Path(tempfile.mkdtemp(prefix=f"softprompt-{config['trial']}-rank{rank}-"))
    try:
        checkpoint = ray.train.get_checkpoint()  # [ray] the latest reported one, after a failure or restore
        if checkpoint is not None:
            checkpoint.to_directory(str(work / train.CHECKPOINT_DIR))
        hooks = _RayHooks(rank, world, str(config["trial"]), tuple(config.get("hold_at") or ()))
        result = train.run(cfg, loaded, rows, eval_rows, work, resume=True, hooks=hooks)
        stats = {
            "rank": rank, "rows": len(rows), "steps": result.steps, "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second, "peak_rss_mb": result.peak_rss_mb, "peak_gpu_mb": result.peak_gpu_mb,
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, stats)  # [ray] the process group TorchTrainer set up
        return {"workers": gathered} if rank == 0 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _RayHooks:
    """`softprompt.train.TrainHooks` for a Ray Train worker."""

    presharded = True

    def __init__(self, rank: int, world_size: int, trial: str, hold_at: tuple[int, ...] = ()) -> None:
        self.rank, self.world_size, self.trial, self.hold_at = rank, world_size, trial, hold_at
        self._tags = {"trial": trial, "worker": str(rank)}
        self._window_tokens, self._window_seconds, self._window_start = 0, 0.0, -math.inf

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if self.world_size == 1:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)  # [ray] gradients all-reduced

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray.train import Checkpoint

        plain = {**{k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()}, "world_size": self.world_size}
        ckpt = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        # Every rank must call report (it is a barrier); rank 0 alone attaches the checkpoint.
        import ray.train

        ray.train.report(plain, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{int(plain['step']):06d}")  # [ray]
        if int(plain["step"]) in self.hold_at:
            # A rung of asha_promote: every rank waits for the scheduler's go (a trial it pauses is
            # stopped here), so a paused trial does not train on past the rung it is judged at.
            from softprompt.ray.asha import wait_for_go

            wait_for_go(self.trial, int(plain["step"]))
        if self.rank == 0:
            gauge = _metrics()["eval_metric"]
            for key, value in plain.items():
                if key.startswith("eval_") and key != "eval_metric" and isinstance(value, (int, float)):
                    gauge.set(float(value), tags={"metric": key[len("eval_") :], "trial": self.trial})

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)  # [ray] the process group TorchTrainer set up
        return out

    def on_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        m = _metrics()
        m["step_time"].observe(seconds, tags=self._tags)
        m["train_loss"].set(loss, tags=self._tags)
        self._window_tokens += tokens
        self._window_seconds += seconds
        if time.monotonic() - self._window_start >= 5.0:  # a gauge sampled every 15s: smooth over ~5s
            m["tokens_per_second"].set(self._window_tokens / max(self._window_seconds, 1e-9), tags=self._tags)
            self._window_tokens, self._window_seconds, self._window_start = 0, 0.0, time.monotonic()


_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """Our Prometheus series (exported by Ray with the `ray_` prefix), created once per process."""
    if not _METRICS:
        from ray.util.metrics import Gauge, Histogram

        _METRICS.update(
            tokens_per_second=Gauge("softprompt_tokens_per_second", "Training tokens per second of one worker.", tag_keys=("trial", "worker")),
            step_time=Histogram(
                "softprompt_step_time_seconds", "Wall time of one optimizer step.",
                boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=("trial", "worker"),
            ),
            train_loss=Gauge("softprompt_train_loss", "Training loss of the latest step.", tag_keys=("trial", "worker")),
            eval_metric=Gauge("softprompt_eval_metric", "Latest evaluation result of a trial.", tag_keys=("metric", "trial")),
        )
    return _METRICS


def _materialize(shard: Any) -> Split:
    """A dataset shard as an in-memory `Split`, in the shard's order."""
    import pyarrow as pa

    from softprompt.dataset import Split

    tables = list(shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    if not tables:
        raise DataError("this worker's shard of the training data is empty: use fewer ray.num_workers than rows")
    return Split.from_table(pa.concat_tables(tables))


def _is_s3(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith("s3://")


def _exists(fs: pyarrow.fs.FileSystem | None, path: str) -> bool:
    if fs is None:
        return Path(path).is_file()
    import pyarrow.fs

    try:
        return bool(fs.get_file_info(path).type == pyarrow.fs.FileType.File)
    except OSError as exc:
        raise DataError(f"cannot read s3://{path}: {exc}") from exc
