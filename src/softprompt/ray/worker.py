"""Ray Train's per-worker function: the laptop training loop plus a few Ray seams, each marked `# [ray]`.

Every worker loads the model, materializes its shard of the training rows (Ray Data), restores the
latest checkpoint Ray hands it, and runs `softprompt.train.run` with `_RayHooks`: DDP around the
prompt (or, with `train.sharding` fsdp/hsdp, the frozen base sharded over the group and the
prompt's gradient averaged by hand: `_RayShardedHooks`), `ray.train.report` with rank 0's checkpoint after every evaluation, sharded evaluation with
all-gathered predictions, and Prometheus series (exported by Ray with the `ray_` prefix).

A worker's local folder is fresh for every attempt and filled only from `ray.train.get_checkpoint()`,
never from files a dead worker left behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt import checkpoint, train
from softprompt.config import config_from_dict
from softprompt.errors import DataError
from softprompt.ray import internals
from softprompt.sharding import ShardedSeams

if TYPE_CHECKING:
    import torch

    from softprompt.dataset import Split


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
    for name in ("ray.train", internals.train_report_logger()):  # [ray]
        logging.getLogger(name).setLevel(cfg.ray.train_log_level)
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # GPU workers too: tokenization, the optimizer and the host side of every step run on CPU
    # threads, and torch's default (one per core of the node) oversubscribes a shared pod.
    torch.set_num_threads(torch_threads(cfg.ray.cpus_per_worker, os.environ))
    device = str(ray.train.torch.get_device()) if cfg.ray.use_gpu else "cpu"  # [ray] this worker's GPU
    rows = _materialize(ray.train.get_dataset_shard("train"))  # [ray] this worker's rows
    eval_rows: Split = config["eval"]
    work = Path(tempfile.mkdtemp(prefix=f"softprompt-{config['trial']}-rank{rank}-"))
    try:
        latest = ray.train.get_checkpoint()  # [ray] the latest reported one, after a failure or restore
        if latest is not None:
            latest.to_directory(str(work / checkpoint.CHECKPOINT_DIR))
        args = (rank, world, str(config["trial"]), tuple(config.get("hold_at") or ()))
        hooks: _RayHooks = _RayHooks(*args)
        if cfg.train.sharding != "ddp" and world > 1:
            from softprompt.sharding import device_mesh

            sharded = _RayShardedHooks(*args)
            sharded.mesh = device_mesh(cfg.train.sharding, gpus_per_node=ctx.get_local_world_size(), device_type=torch.device(device).type)  # [ray]
            sharded.reshard_after_forward, sharded.offload = cfg.train.reshard_after_forward, cfg.train.offload
            hooks = sharded
            loaded = sharded.load(cfg.model, device=device, s3=cfg.s3)  # each worker reads only its shards
        else:
            loaded = load_model(cfg.model, device=device)
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


def torch_threads(cpus_per_worker: float, environ: Mapping[str, str]) -> int:
    """The torch threads of a worker: `OMP_NUM_THREADS` when set to a positive whole number, else the
    CPUs the worker reserves (`ray.cpus_per_worker`, rounded down), at least 1.

    Ray sets `OMP_NUM_THREADS` in its workers to the same rounded-down reservation unless the user
    set it (e.g. in the runtime environment), so either way the value is the one meant. It is set
    explicitly because torch may have sized its thread pool before Ray set the variable.
    """
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given)
    return max(1, math.floor(cpus_per_worker))


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


class _RayShardedHooks(ShardedSeams, _RayHooks):
    """`_RayHooks` with the frozen base sharded over the worker group (`train.sharding` fsdp or
    hsdp, `softprompt.sharding`): no DDP around the prompt, its gradient averaged by hand."""


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


