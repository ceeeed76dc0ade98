"""The training loop (`softprompt train`): plain PyTorch, no Ray import, CPU or CUDA.

What makes it fast, compared with PEFT's usual Trainer recipe:
- bf16 frozen weights on GPU (fp32 on CPU), an fp32 prompt;
- length-grouped batches padded to the longest row, not to a fixed length;
- the LM head runs only at the label position (classification) or target positions (generation),
  never over `batch x sequence x vocabulary`;
- the loss is cross-entropy over the label set at the label position: the rule evaluation uses.

Ray's seams (`TrainHooks`): data sharding, wrapping the prompt module in DDP, reporting metrics and
checkpoints. With no hooks the loop runs alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from softprompt import checkpoint
from softprompt import prompts as prompts_mod
from softprompt.batching import BatchPlan
from softprompt.config import JobConfig
from softprompt.dataset import Split
from softprompt.engine import Prefix, label_scores, recomputed_layers, target_loss, to_device
from softprompt.metrics import classification_metrics
from softprompt.modeling import LoadedModel
from softprompt.scoring import score_split, shared_prefix
from softprompt.sharding import Call, unsharded
from softprompt.tasks import Verbalizer, build_verbalizer

log = logging.getLogger(__name__)


class TrainHooks(Protocol):
    """Where a distributed runner plugs into the loop (Ray Train's `softprompt.ray.worker`, or
    `softprompt.sharding.ShardedHooks` under torchrun).

    Two more methods are optional, for a frozen base sharded over the ranks: `shard(model) -> Call`
    shards it after the prompt was built from its embeddings and returns how to run code on it
    (`softprompt.sharding`), and `sync_gradients(params)` averages the prompt's gradient before
    the optimizer step (`wrap` then leaves the prompt alone).
    """

    rank: int
    world_size: int
    presharded: bool
    """True when `train` is already this worker's shard (e.g. from Ray Data's `get_dataset_shard`):
    each worker then draws batches of `batch_size / world_size` from its own rows. False: every
    worker holds all rows and takes its slice of each global batch."""

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wrap the trainable prompt module (e.g. in DistributedDataParallel)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Called after every evaluation (and at the end) with the metrics and a checkpoint folder."""
        ...

    def on_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        """Optional: called after every optimizer step with its loss, the tokens this worker
        processed in it and its wall time (throughput metrics). Hooks without it still work."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Optional: every rank's `obj`, in rank order, on every rank (`all_gather_object`). With
        it, each rank scores its share of the eval rows and all ranks reduce the same metrics;
        without it every rank scores all of them."""
        ...


@dataclass(frozen=True)
class TrainResult:
    """What `run` produced."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    best_step: int
    best_metric: float | None
    stopped_early: bool
    history: list[dict[str, Any]]
    tokens_per_second: float
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None

    def summary(self) -> dict[str, Any]:
        """Training facts for the run manifest (`TrainOutcome.summary`)."""
        return {
            "steps": self.steps, "best_step": self.best_step, "best_eval_metric": self.best_metric,
            "stopped_early": self.stopped_early, "seconds": round(self.seconds, 1),
            "tokens_per_second": round(self.tokens_per_second, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": self.peak_gpu_mb, "workers": 1,
        }


def run(
    cfg: JobConfig,
    loaded: LoadedModel,
    train: Split,
    eval_split: Split | None,
    output_dir: str | Path,
    *,
    resume: bool = True,
    hooks: TrainHooks | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a soft prompt and write the best one as PEFT adapter files to `<output_dir>/adapter`.

    Args:
        cfg: The job configuration (`train`, `prompt` and `task` sections are used).
        loaded: The frozen base model and tokenizer.
        train: Training rows (already this worker's shard when running distributed).
        eval_split: Rows for periodic evaluation and best-prompt selection (None disables it).
        output_dir: Where `adapter/`, `checkpoint/` and `train_history.json` go.
        resume: Continue from `<output_dir>/checkpoint` when it exists.
        hooks: Distributed seams; None runs alone.
        progress: Show a progress bar.

    Returns:
        The result, with throughput and peak memory.
    """
    tc, task = cfg.train, cfg.task
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = hooks.rank if hooks else 0
    world = hooks.world_size if hooks else 1
    model, tok = loaded.model, loaded.tokenizer
    device = loaded.device
    _seed_everything(tc.seed)
    shard = getattr(hooks, "shard", None)
    call: Call = shard(model) if shard is not None else unsharded(model)
    # Inside the call: a sharded model's embeddings are whole only within its root's forward.
    prompt = call(lambda m: prompts_mod.create(cfg.prompt, task, m, tok, seed=tc.seed))
    module: torch.nn.Module = hooks.wrap(prompt.module) if hooks else prompt.module
    verbalizer = build_verbalizer(task, tok) if task.kind == "classification" else None
    params = prompt.parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.warmup_steps, tc.steps, tc.schedule))
    fingerprint = checkpoint.run_fingerprint(cfg, loaded, train, eval_split, presharded=hooks is not None and hooks.presharded)
    state: dict[str, Any] = {"step": 0, "history": [], "best_metric": None, "best_step": 0, "bad_evals": 0, "fingerprint": fingerprint}
    ckpt = out / checkpoint.CHECKPOINT_DIR
    best_embeds: torch.Tensor | None = None
    if resume and (ckpt / "state.json").is_file():
        checkpoint.check_resumable(ckpt, fingerprint)
        state, best_embeds = checkpoint.load(ckpt, prompt, optimizer, scheduler)
        state["fingerprint"] = fingerprint
        state["resumed_at"] = [*state.get("resumed_at", []), state["step"]]  # kept in later checkpoints
        log.info("resumed from %s at step %d", ckpt, state["step"])
    # The same rows for every trial of a sweep (the data seed, not train.seed): rung comparisons stay fair.
    eval_rows = eval_split.sample(tc.eval_max_rows, cfg.data.split_seed) if eval_split is not None else None
    if hooks is not None and hooks.presharded:
        plan = BatchPlan(train.lengths, -(-tc.batch_size // world), 1, 0, tc.seed + rank, tc.length_grouping)
    else:
        plan = BatchPlan(train.lengths, tc.batch_size, world, rank, tc.seed, tc.length_grouping)
    pad_id = tok.pad_token_id

    bar = _progress(progress and rank == 0, tc.steps, state["step"])
    tokens = 0
    t0 = time.perf_counter()
    stopped_early = bool(state.get("stopped_early", False))  # a resumed early-stopped run is finished
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    on_step = getattr(hooks, "on_step", None)
    gather = getattr(hooks, "gather", None) if world > 1 else None
    no_sync = getattr(module, "no_sync", None)  # DDP: all-reduce only on the last micro-step
    loss_sum = 0.0
    while state["step"] < tc.steps and not stopped_early:
        step = state["step"]
        step_t0, step_tokens = time.perf_counter(), tokens
        optimizer.zero_grad(set_to_none=True)
        # The loss stays on the device; the host reads it once per step, and only when something
        # shows it (a hook, the progress bar, the history or an eval): reading it per micro-step
        # would make the host wait for every backward before queueing the next forward.
        loss_total = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            idx = plan.batch(step * tc.grad_accum + micro)
            last_micro = micro == tc.grad_accum - 1
            with (no_sync() if no_sync is not None and not last_micro else contextlib.nullcontext(),
                  recomputed_layers(model, tc.activation_checkpointing)):
                embeds = prompt.embeddings(module)
                loss = call(_loss, Prefix(embeds=embeds), train, idx, verbalizer, pad_id) / tc.grad_accum
                loss.backward()
            loss_total += loss.detach()
            tokens += sum(train.lengths[i] for i in idx) + prompt.num_virtual_tokens * len(idx)
        sync = getattr(hooks, "sync_gradients", None)
        if sync is not None:
            sync(params)
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state["step"] = step = step + 1
        do_eval = eval_rows is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps)
        logged = step % tc.log_every == 0 or step == tc.steps
        if on_step is not None or bar is not None or logged or do_eval:
            loss_sum = float(loss_total)
        if on_step is not None:
            on_step(step, loss_sum, tokens - step_tokens, time.perf_counter() - step_t0)
        if logged:
            state["history"].append({"step": step, "train_loss": round(loss_sum, 6), "lr": scheduler.get_last_lr()[0]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
        if do_eval:
            assert eval_rows is not None
            metrics = evaluate_embeddings(cfg, loaded, prompt.embeddings().detach(), eval_rows, verbalizer, gather=gather, rank=rank, world=world, call=call)
            value = metrics[cfg.evaluate.primary_metric]
            record = {"step": step, "eval_metric": value, **{f"eval_{k}": v for k, v in metrics.items()}}
            _merge_history(state["history"], record)
            improved = state["best_metric"] is None or value > state["best_metric"]
            if improved:
                state.update(best_metric=value, best_step=step, bad_evals=0)
                best_embeds = prompt.embeddings().detach().clone()
            else:
                state["bad_evals"] += 1
            patience = tc.early_stopping_patience
            if patience is not None and state["bad_evals"] >= patience:
                state["stopped_early"] = True  # in the checkpoint, so resuming it does not train on
            ckpt_dir = checkpoint.save(ckpt, prompt, optimizer, scheduler, state, best_embeds) if rank == 0 else None
            if hooks:
                hooks.report({"step": step, "train_loss": loss_sum, **record, "best_metric": state["best_metric"]}, ckpt_dir)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}", eval=f"{value:.4f}", best=f"{state['best_metric']:.4f}")
            if state.get("stopped_early"):
                stopped_early = True
                break
        elif tc.checkpoint_every and step % tc.checkpoint_every == 0 and rank == 0:
            checkpoint.save(ckpt, prompt, optimizer, scheduler, state, best_embeds)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if rank == 0:
        checkpoint.save(ckpt, prompt, optimizer, scheduler, state, best_embeds)
    final = best_embeds if (tc.keep_best and best_embeds is not None) else prompt.embeddings().detach()
    adapter_dir = out / checkpoint.ADAPTER_DIR
    if rank == 0:
        checkpoint.write_adapter(prompt, final, adapter_dir)
        (out / checkpoint.HISTORY_FILE).write_text(json.dumps(state["history"], indent=1))
    if hooks and eval_rows is None:
        hooks.report({"step": state["step"], "train_loss": loss_sum}, ckpt if rank == 0 else None)
    return TrainResult(
        output_dir=out,
        adapter_dir=adapter_dir,
        steps=state["step"],
        best_step=state["best_step"] if state["best_metric"] is not None else state["step"],
        best_metric=state["best_metric"],
        stopped_early=stopped_early,
        history=state["history"],
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )


def evaluate_embeddings(
    cfg: JobConfig,
    loaded: LoadedModel,
    embeds: torch.Tensor,
    rows: Split,
    verbalizer: Verbalizer | None,
    *,
    gather: Callable[[Any], list[Any]] | None = None,
    rank: int = 0,
    world: int = 1,
    call: Call | None = None,
) -> dict[str, float]:
    """Quick metrics of a prompt on `rows` (accuracy and macro-F1, or negative loss for generation).

    With `gather` (see `TrainHooks.gather`) this rank scores rows `rank, rank + world, ...` only
    and the per-row results of all ranks are put back in row order before the metrics, so every
    rank returns the same numbers as one process scoring all rows, in 1/world of the time.

    With `call` (a sharded model, `softprompt.sharding`) the model runs inside it, and every rank
    runs as many batches as the largest share needs (a rank with one batch fewer scores one row
    again and drops it), since each forward gathers weights collectively.
    """
    tok = loaded.tokenizer
    run = call if call is not None else unsharded(loaded.model)
    mine = list(range(rank, len(rows), world)) if gather is not None else list(range(len(rows)))
    bs = cfg.evaluate.batch_size
    extra = 0
    if call is not None and gather is not None:
        largest = math.ceil(len(rows) / world)
        extra = math.ceil(largest / bs) - math.ceil(len(mine) / bs)
    spare = [rows.input_ids[mine[0] if mine else 0]]  # what a padding batch scores
    if verbalizer is None:
        losses: list[float] = []

        def losses_of(model: Any) -> None:
            with torch.inference_mode():
                for s in range(0, len(mine), bs):
                    idx = mine[s : s + bs]
                    loss = target_loss(model, Prefix(embeds=embeds), [rows.input_ids[i] for i in idx], [rows.target_ids[i] for i in idx], tok.pad_token_id)
                    losses.append(float(loss) * len(idx))
                for _ in range(extra):
                    target_loss(model, Prefix(embeds=embeds), spare, [rows.target_ids[mine[0] if mine else 0]], tok.pad_token_id)

        run(losses_of)
        total = sum(sum(part) for part in gather(losses)) if gather is not None else sum(losses)
        loss = total / max(1, len(rows))
        return {"accuracy": -loss, "macro_f1": -loss, "loss": loss}
    assert verbalizer is not None

    def scores_of(model: Any) -> np.ndarray:
        prefix = shared_prefix(model, embeds)
        out = score_split(model, prefix, [rows.input_ids[i] for i in mine], verbalizer, tok.pad_token_id, bs)
        for _ in range(extra):
            score_split(model, prefix, spare, verbalizer, tok.pad_token_id, bs)
        return out

    scores = run(scores_of)
    predicted = scores.argmax(1).tolist()
    if gather is not None:
        parts, predicted = gather(predicted), [0] * len(rows)
        for r, part in enumerate(parts):
            predicted[r::world] = part
    m = classification_metrics(rows.label_ids, predicted, None, list(verbalizer.labels))
    return {"accuracy": m.accuracy, "macro_f1": m.macro_f1}


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------------------------------


def _loss(model: Any, prefix: Prefix, data: Split, idx: list[int], verbalizer: Verbalizer | None, pad_id: int) -> torch.Tensor:
    seqs = [data.input_ids[i] for i in idx]
    if verbalizer is None:
        return target_loss(model, prefix, seqs, [data.target_ids[i] for i in idx], pad_id)
    scores = label_scores(model, prefix, seqs, verbalizer, pad_id)
    target = to_device(torch.as_tensor([data.label_ids[i] for i in idx]), scores.device)
    return F.cross_entropy(scores, target)


def _lr_lambda(warmup: int, total: int, schedule: str) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    return f


def _merge_history(history: list[dict[str, Any]], record: dict[str, Any]) -> None:
    if history and history[-1]["step"] == record["step"]:
        history[-1].update(record)
    else:
        history.append(record)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


