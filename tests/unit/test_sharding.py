"""FSDP2 on CPU with gloo: the frozen base sharded over 2 processes trains the same prompt as 1
process at the same global batch, each rank holding about half of the frozen weights."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from test_train import syn_cfg, synthetic  # tests/unit is on sys.path (rootdir-relative imports)

from softprompt import train
from softprompt.config import ModelConfig
from softprompt.modeling import load_model
from softprompt.prompts import load_prompt_embeddings

STEPS = dict(steps=3, batch_size=8, eval_every=3, log_every=1, warmup_steps=1, grad_accum=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(target: Any, world: int, *args: Any) -> list[Any]:
    """Run `target(rank, world, port, queue, *args)` in `world` spawned processes; what each put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0] * world
    return [queue.get(timeout=5) for _ in procs]


def _rank(rank: int, world: int, port: int, queue: Any, model_dir: str, out: str, per_node: int, ckpt: bool, meta: bool = False) -> None:
    import torch.distributed as dist

    from softprompt.sharding import ShardedHooks, device_mesh, local_parameter_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hooks = ShardedHooks(mesh=device_mesh("hsdp" if per_node < world else "fsdp", gpus_per_node=per_node))
        if meta:  # built empty, each rank reading only its rows of every weight
            loaded = hooks.load(ModelConfig(name=model_dir, device="cpu"), device="cpu")
            full = int(loaded.identity["num_parameters"]) * 4
        else:
            loaded = load_model(ModelConfig(name=model_dir, device="cpu"))
            full = local_parameter_bytes(loaded.model)
        data = synthetic(loaded.tokenizer, 32)
        cfg = syn_cfg(**STEPS, activation_checkpointing=ckpt)
        result = train.run(cfg, loaded, data, data, Path(out) / f"rank{rank}", resume=False, hooks=hooks)
        queue.put((rank, full, local_parameter_bytes(loaded.model), result.best_metric, [r.get("train_loss") for r in result.history]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("world", "per_node", "ckpt", "meta"), [(4, 2, True, False), (2, 2, False, True)],
                         ids=["hsdp-2x2-checkpointed", "fsdp-2-each-rank-reads-its-shards"])
def test_ranks_with_the_base_sharded_train_the_one_process_prompt(
    tiny_model_dir: Path, tmp_path: Path, world: int, per_node: int, ckpt: bool, meta: bool
) -> None:
    """hsdp on a 2x2 mesh (2 "nodes" of 2, sharded within a node, replicated across) with activation
    checkpointing, and fsdp over 2 ranks that built the model empty and read only their own rows of
    each weight from the safetensors file: the same prompt, losses and eval metric as one process at
    the same global batch, each rank holding half of the frozen weights."""
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    data = synthetic(loaded.tokenizer, 32)
    alone = train.run(syn_cfg(**STEPS), loaded, data, data, tmp_path / "alone", resume=False)

    got = sorted(_spawn(_rank, world, str(tiny_model_dir), str(tmp_path), per_node, ckpt, meta))
    for _, full, local, best, _ in got:
        assert 0.4 * full < local < 0.65 * full, (local, full)  # about half of every frozen weight
        assert best == pytest.approx(alone.best_metric)  # the sharded evaluation agrees too
    # Each rank's loss is its share of the global batch: their mean is the one process's loss.
    mean = [sum(step) / world for step in zip(*(g[4] for g in got), strict=True)]
    assert mean == pytest.approx([h.get("train_loss") for h in alone.history], rel=1e-4)
    sharded = load_prompt_embeddings(tmp_path / "rank0" / "adapter")
    torch.testing.assert_close(sharded, load_prompt_embeddings(alone.adapter_dir), rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_trains_the_same_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    data = synthetic(loaded.tokenizer, 16)
    plain = train.run(syn_cfg(**STEPS), loaded, data, data, tmp_path / "plain", resume=False)
    ckpt = train.run(syn_cfg(**STEPS, activation_checkpointing=True), loaded, data, data, tmp_path / "ckpt", resume=False)
    torch.testing.assert_close(load_prompt_embeddings(ckpt.adapter_dir), load_prompt_embeddings(plain.adapter_dir), rtol=1e-5, atol=1e-6)
    assert [h.get("train_loss") for h in ckpt.history] == pytest.approx([h.get("train_loss") for h in plain.history], rel=1e-5)


@pytest.mark.slow
def test_torchrun_with_fsdp_trains_the_in_process_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m softprompt.torchrun ... train.sharding=fsdp` (gloo, no Ray)
    writes the train stage's output, and its prompt is the in-process trainer's on the same data."""
    import subprocess
    import sys

    from conftest import DEMO_CONFIG, small_overrides
    from softprompt import ingest
    from softprompt.config import load_config
    from softprompt.job import InProcessTrainer, Models
    from softprompt.outcome import TrainOutcome

    overrides = [*small_overrides(tiny_model_dir, tmp_path), "train.steps=3", "train.eval_every=3", "train.batch_size=8", "train.sharding=fsdp"]
    cfg = load_config(DEMO_CONFIG, overrides)
    ingest.run(cfg, tmp_path / "alone" / "data")
    alone = InProcessTrainer().train(cfg, tmp_path / "alone" / "data", tmp_path / "alone", Models(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "softprompt.torchrun",
           "-c", str(DEMO_CONFIG), "--run-dir", str(tmp_path / "torchrun"), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps" in done.stdout
    outcome = TrainOutcome.read(tmp_path / "torchrun" / "train")
    assert outcome.trainer == "torchrun" and outcome.summary["workers"] == 2 and outcome.summary["sharding"] == "fsdp"
    torch.testing.assert_close(load_prompt_embeddings(outcome.winners[0]), load_prompt_embeddings(alone.winners[0]), rtol=1e-4, atol=1e-5)


class _Interrupt(Exception):
    pass


def _rank_until(rank: int, world: int, port: int, queue: Any, model_dir: str, out: str, stop_at: int) -> None:
    """A rank of an fsdp run (each rank reading its shards) stopped after the checkpoint of step `stop_at`."""
    import torch.distributed as dist

    from softprompt.sharding import ShardedHooks, device_mesh

    class Stop(ShardedHooks):
        def report(self, metrics: dict[str, Any], checkpoint_dir: Any) -> None:
            if metrics["step"] >= stop_at:
                raise _Interrupt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hooks = Stop(mesh=device_mesh("fsdp", gpus_per_node=world))
        loaded = hooks.load(ModelConfig(name=model_dir, device="cpu"), device="cpu")
        data = synthetic(loaded.tokenizer, 32)
        try:
            train.run(syn_cfg(**RESUMED, sharding="fsdp"), loaded, data, data, Path(out), resume=False, hooks=hooks)
        except _Interrupt:
            queue.put(rank)
    finally:
        dist.destroy_process_group()


RESUMED = dict(steps=6, batch_size=8, eval_every=2, log_every=1, warmup_steps=1, keep_best=False)


@pytest.mark.slow
def test_a_run_stopped_on_two_sharded_ranks_resumes_on_one_process_to_the_same_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The checkpoint holds the prompt and optimizer state only: 2 fsdp ranks train to step 4, one
    process (ddp, the other strategy) resumes to step 6, and the prompt is the uninterrupted one's."""
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    data = synthetic(loaded.tokenizer, 32)
    whole = train.run(syn_cfg(**RESUMED), loaded, data, data, tmp_path / "whole", resume=False)
    assert sorted(_spawn(_rank_until, 2, str(tiny_model_dir), str(tmp_path / "run"), 4)) == [0, 1]
    resumed = train.run(syn_cfg(**RESUMED), loaded, data, data, tmp_path / "run", resume=True)
    assert resumed.steps == 6
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["resumed_at"] == [4]
    torch.testing.assert_close(load_prompt_embeddings(resumed.adapter_dir), load_prompt_embeddings(whole.adapter_dir), rtol=1e-4, atol=1e-5)
