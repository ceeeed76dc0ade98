"""The work after training, on a Ray worker: the winners' adapter files and the final evaluation.

    host = ModelHost(cfg)                                  # an actor loads the frozen model, once
    adapter = host.export(cfg, checkpoint_uri, folder)     # a checkpoint's prompt, as adapter files in `folder`
    result = host.evaluate(cfg, data_dir, outcome, artifact_dir)   # `evaluate.run` there
    host.close()

A cluster's driver is a RayJob's head pod (`num-cpus: "0"`, no GPU), and on a local multi-GPU
machine the driver would put a model on `cuda:0` while nothing else needs it: neither should
hold the frozen model. `ModelHost` loads it in a Ray actor that reserves what a training worker
reserves (`ray.cpus_per_worker`, a whole GPU with `ray.use_gpu`, `ray.accelerator_type`); the
driver ships it the folders it reads (the prepared data, the winners) as bytes and writes back the
files it returns, so the run folder on the driver ends up as if everything had run there.
Checkpoints are read where they are stored (a cluster's storage is shared: `s3://`, or a path on
every node). A local Ray without GPUs keeps this work in the driver (`on_worker`): shipping would
only cost time there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt import checkpoint
from softprompt.outcome import TrainOutcome

if TYPE_CHECKING:
    from softprompt.config import JobConfig
    from softprompt.evaluate import EvaluateResult

Files = dict[str, bytes]
"""A folder's files by relative path (`winners/00/adapter/adapter_config.json`)."""


def on_worker(cfg: JobConfig, joined: bool) -> bool:
    """Whether the work after training runs on a worker (`ModelHost`) rather than in the driver:
    on a cluster the driver joined (its head has no GPU and may reserve no CPU), and wherever
    training used GPUs."""
    return joined or cfg.ray.use_gpu


def pack(folder: str | Path) -> Files:
    """Every file under `folder`, by path relative to it."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unpack(files: Files, folder: str | Path) -> Path:
    """Write `files` (from `pack`) under `folder`; returns `folder`."""
    root = Path(folder)
    for name, data in files.items():
        path = (root / name).resolve()
        if not path.is_relative_to(root.resolve()):
            raise ValueError(f"{name!r} would be written outside {root}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


class ModelHost:
    """The frozen base model in a Ray actor on a worker; the actor starts on first use."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self._actor: Any = None

    def _host(self) -> Any:
        if self._actor is None:
            import ray

            rc = self.cfg.ray
            options: dict[str, Any] = {"num_cpus": rc.cpus_per_worker, "num_gpus": 1 if rc.use_gpu else 0}
            if rc.use_gpu and rc.accelerator_type:
                options["accelerator_type"] = rc.accelerator_type
            self._actor = ray.remote(_Host).options(**options).remote(self.cfg)
        return self._actor

    def export(self, cfg: JobConfig, checkpoint_uri: str, folder: str | Path) -> Path:
        """`softprompt.ray.train.export_adapter` on the worker: the checkpoint's prompt as
        `<folder>/adapter` (plus its training history) on the driver.

        Returns:
            The adapter folder.
        """
        import ray

        unpack(ray.get(self._host().export.remote(cfg, checkpoint_uri)), folder)
        return Path(folder) / checkpoint.ADAPTER_DIR

    def evaluate(self, cfg: JobConfig, data_dir: str | Path, outcome: TrainOutcome, artifact_dir: str | Path) -> EvaluateResult:
        """`softprompt.evaluate.run` on the worker, its artifact folder written to `artifact_dir`."""
        import ray

        files, result = ray.get(self._host().evaluate.remote(cfg, pack(data_dir), pack(outcome.output_dir)))
        out = Path(artifact_dir)
        shutil.rmtree(out, ignore_errors=True)  # as evaluate.run leaves it: this run's files only
        unpack(files, out)
        return dataclasses.replace(result, artifact_dir=out)

    def close(self) -> None:
        """Stop the actor (frees its GPU); a later call starts a new one."""
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None


class _Host:
    """The actor behind `ModelHost` (runs on the worker)."""

    def __init__(self, cfg: JobConfig) -> None:
        import torch

        from softprompt.modeling import load_model
        from softprompt.ray.worker import torch_threads

        torch.set_num_threads(torch_threads(cfg.ray.cpus_per_worker, os.environ))
        self.loaded = load_model(cfg.model, s3=cfg.s3)

    def export(self, cfg: JobConfig, checkpoint_uri: str) -> Files:
        from softprompt.ray.train import export_adapter

        with tempfile.TemporaryDirectory(prefix="softprompt-export-") as tmp:
            export_adapter(cfg, self.loaded, checkpoint_uri, tmp)
            shutil.rmtree(Path(tmp) / checkpoint.CHECKPOINT_DIR, ignore_errors=True)  # storage keeps it
            return pack(tmp)

    def evaluate(self, cfg: JobConfig, data: Files, train: Files) -> tuple[Files, EvaluateResult]:
        from softprompt import evaluate

        with tempfile.TemporaryDirectory(prefix="softprompt-evaluate-") as tmp:
            root = Path(tmp)
            outcome = TrainOutcome.read(unpack(train, root / "train"))
            result = evaluate.run(cfg, self.loaded, unpack(data, root / "data"), outcome, root / "artifact")
            return pack(root / "artifact"), result
