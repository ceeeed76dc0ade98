"""Training under `torchrun`, without Ray: every process a rank, the same loop as everywhere else.

    torchrun --nproc-per-node 8 -m softprompt.torchrun -c configs/llama-8b.yaml train.sharding=fsdp
    torchrun --nnodes 2 --nproc-per-node 8 ... -m softprompt.torchrun -c configs/llama-70b.yaml train.sharding=hsdp

Rank 0 ingests the data into `<run>/data` (unless it is there) while the others wait; every rank
loads the model on its device (`cuda:LOCAL_RANK`, NCCL; or the CPU, gloo), holds every training
row and takes its slice of each global batch, and runs `softprompt.train.run` with DDP around the
prompt (`train.sharding=ddp`) or the frozen base sharded (`fsdp`, `hsdp` over nodes of
`LOCAL_WORLD_SIZE` ranks: `softprompt.sharding`). Rank 0 writes `<run>/train` (the adapter and
`train_result.json`), which `softprompt evaluate` and `publish` take as they do after any trainer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from softprompt import dataset as ds
from softprompt import ingest, train
from softprompt.config import JobConfig, load_config
from softprompt.errors import SoftpromptError
from softprompt.job import run_folder
from softprompt.modeling import load_model
from softprompt.outcome import TrainOutcome
from softprompt.sharding import ShardedHooks, device_mesh


class DDPHooks:
    """`softprompt.train.TrainHooks` with DDP around the prompt (every rank holds the whole model)."""

    presharded = False

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        return None


def run(cfg: JobConfig, run_dir: Path) -> TrainOutcome | None:
    """One rank's part of a torchrun training run; rank 0 returns the outcome it wrote."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank()
        data = run_dir / "data"
        if rank == 0 and not ds.has_split(data, "train"):
            print(ingest.run(cfg, data).summary(), flush=True)
        dist.barrier()
        if cfg.train.sharding == "auto":  # every rank plans the same: this world, its GPUs
            from softprompt.config import replace as config_replace
            from softprompt.plan import choose_sharding

            cfg = config_replace(cfg, [f"ray.num_workers={dist.get_world_size()}", f"ray.use_gpu={str(cuda).lower()}"])
            gpu_bytes = int(torch.cuda.get_device_properties(local_rank).total_memory) if cuda else None
            cfg, chosen = choose_sharding(cfg, lambda: list(ds.read_split(data, "train").lengths), gpu_bytes=gpu_bytes)
            if rank == 0 and chosen:
                print(chosen, flush=True)
        device = f"cuda:{local_rank}" if cuda else "cpu"
        hooks: Any = DDPHooks()
        if cfg.train.sharding != "ddp" and dist.get_world_size() > 1:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            mesh = device_mesh(cfg.train.sharding, gpus_per_node=per_node, device_type="cuda" if cuda else "cpu")
            hooks = ShardedHooks(mesh=mesh, reshard_after_forward=cfg.train.reshard_after_forward, offload=cfg.train.offload)
            loaded = hooks.load(cfg.model, device=device, s3=cfg.s3)  # each rank reads only its shards
        else:
            loaded = load_model(cfg.model, device=device, s3=cfg.s3)
        eval_split = ds.read_split(data, "eval") if ds.has_split(data, "eval") else None
        out = run_dir / "train"
        result = train.run(cfg, loaded, ds.read_split(data, "train"), eval_split, out, hooks=hooks)
        if rank != 0:
            return None
        outcome = TrainOutcome("torchrun", out, (result.adapter_dir,), cfg, result.history,
                               {**result.summary(), "workers": dist.get_world_size(), "sharding": cfg.train.sharding})
        outcome.write()
        print(outcome.line(), flush=True)
        return outcome
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """`torchrun ... -m softprompt.torchrun -c CONFIG [KEY=VALUE ...] [--run-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m softprompt.torchrun", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="YAML config, a path or s3:// URI")
    parser.add_argument("--run-dir", help="run folder (default <workdir>/<run_name>)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, Path(args.run_dir) if args.run_dir else run_folder(cfg))
    except SoftpromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
