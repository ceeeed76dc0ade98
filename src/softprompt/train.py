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

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from softprompt import prompts as prompts_mod
from softprompt.config import JobConfig, to_dict
from softprompt.dataset import Split
from softprompt.engine import Prefix, label_scores, target_loss
from softprompt.errors import ConfigError
from softprompt.metrics import classification_metrics
from softprompt.modeling import LoadedModel
from softprompt.scoring import score_split, shared_prefix
from softprompt.tasks import Verbalizer, build_verbalizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"


class TrainHooks(Protocol):
    """Where a distributed runner plugs into the loop (see `softprompt.distributed`)."""

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
    extra: dict[str, Any] = field(default_factory=dict)


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
    prompt = prompts_mod.create(cfg.prompt, task, model, tok, seed=tc.seed)
    module: torch.nn.Module = hooks.wrap(prompt.module) if hooks else prompt.module
    verbalizer = build_verbalizer(task, tok) if task.kind == "classification" else None
    params = prompt.parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.warmup_steps, tc.steps, tc.schedule))
    fingerprint = _run_fingerprint(cfg, loaded, train, eval_split, hooks)
    state: dict[str, Any] = {"step": 0, "history": [], "best_metric": None, "best_step": 0, "bad_evals": 0, "fingerprint": fingerprint}
    ckpt = out / CHECKPOINT_DIR
    best_embeds: torch.Tensor | None = None
    if resume and (ckpt / "state.json").is_file():
        _check_resumable(ckpt, fingerprint)
        state, best_embeds = _load_checkpoint(ckpt, prompt, optimizer, scheduler)
        state["fingerprint"] = fingerprint
        state["resumed_at"] = [*state.get("resumed_at", []), state["step"]]  # kept in later checkpoints
        log.info("resumed from %s at step %d", ckpt, state["step"])
    # The same rows for every trial of a sweep (the data seed, not train.seed): rung comparisons stay fair.
    eval_rows = eval_split.sample(tc.eval_max_rows, cfg.data.split_seed) if eval_split is not None else None
    if hooks is not None and hooks.presharded:
        plan = _BatchPlan(train.lengths, -(-tc.batch_size // world), 1, 0, tc.seed + rank, tc.length_grouping)
    else:
        plan = _BatchPlan(train.lengths, tc.batch_size, world, rank, tc.seed, tc.length_grouping)
    pad_id = tok.pad_token_id

    bar = _progress(progress and rank == 0, tc.steps, state["step"])
    tokens = 0
    t0 = time.perf_counter()
    stopped_early = bool(state.get("stopped_early", False))  # a resumed early-stopped run is finished
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    on_step = getattr(hooks, "on_step", None)
    gather = getattr(hooks, "gather", None) if world > 1 else None
    while state["step"] < tc.steps and not stopped_early:
        step = state["step"]
        step_t0, step_tokens = time.perf_counter(), tokens
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            idx = plan.batch(step * tc.grad_accum + micro)
            embeds = prompt.embeddings(module)
            loss = _loss(model, Prefix(embeds=embeds), train, idx, verbalizer, pad_id) / tc.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += sum(train.lengths[i] for i in idx) + prompt.num_virtual_tokens * len(idx)
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state["step"] = step = step + 1
        if on_step is not None:
            on_step(step, loss_sum, tokens - step_tokens, time.perf_counter() - step_t0)
        if step % tc.log_every == 0 or step == tc.steps:
            state["history"].append({"step": step, "train_loss": round(loss_sum, 6), "lr": scheduler.get_last_lr()[0]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
        do_eval = eval_rows is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps)
        if do_eval:
            assert eval_rows is not None
            metrics = evaluate_embeddings(cfg, loaded, prompt.embeddings().detach(), eval_rows, verbalizer, gather=gather, rank=rank, world=world)
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
            ckpt_dir = _save_checkpoint(ckpt, prompt, optimizer, scheduler, state, best_embeds) if rank == 0 else None
            if hooks:
                hooks.report({"step": step, "train_loss": loss_sum, **record, "best_metric": state["best_metric"]}, ckpt_dir)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}", eval=f"{value:.4f}", best=f"{state['best_metric']:.4f}")
            if state.get("stopped_early"):
                stopped_early = True
                break
        elif tc.checkpoint_every and step % tc.checkpoint_every == 0 and rank == 0:
            _save_checkpoint(ckpt, prompt, optimizer, scheduler, state, best_embeds)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if rank == 0:
        _save_checkpoint(ckpt, prompt, optimizer, scheduler, state, best_embeds)
    final = best_embeds if (tc.keep_best and best_embeds is not None) else prompt.embeddings().detach()
    adapter_dir = out / ADAPTER_DIR
    if rank == 0:
        write_adapter(prompt, final, adapter_dir)
        (out / "train_history.json").write_text(json.dumps(state["history"], indent=1))
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


def export_checkpoint(cfg: JobConfig, loaded: LoadedModel, checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Write what `run` leaves in `output_dir` from a checkpoint folder alone: `adapter/` (the best
    evaluated prompt with `train.keep_best`, else the latest) and `train_history.json`.

    Used where the checkpoint is all there is: a distributed run's storage, or a trial that Ray Tune
    stopped early. `cfg` must be the configuration the checkpoint was trained with.

    Returns:
        The adapter folder.
    """
    from safetensors.torch import load_file

    ckpt, out = Path(checkpoint_dir), Path(output_dir)
    tensors = load_file(str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    prompt = prompts_mod.create(cfg.prompt, cfg.task, loaded.model, loaded.tokenizer, seed=cfg.train.seed)
    device = prompt.module.embedding.weight.device
    prompt.module.load_state_dict({k[len("prompt.") :]: v.to(device) for k, v in tensors.items() if k.startswith("prompt.")})
    best = tensors.get("best_embeds")
    final = best.to(device) if (cfg.train.keep_best and best is not None) else prompt.embeddings().detach()
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(prompt, final, out / ADAPTER_DIR)
    (out / "train_history.json").write_text(json.dumps(meta.get("history", []), indent=1))
    return out / ADAPTER_DIR


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
) -> dict[str, float]:
    """Quick metrics of a prompt on `rows` (accuracy and macro-F1, or negative loss for generation).

    With `gather` (see `TrainHooks.gather`) this rank scores rows `rank, rank + world, ...` only
    and the per-row results of all ranks are put back in row order before the metrics, so every
    rank returns the same numbers as one process scoring all rows, in 1/world of the time.
    """
    model, tok = loaded.model, loaded.tokenizer
    mine = list(range(rank, len(rows), world)) if gather is not None else list(range(len(rows)))
    if verbalizer is None:
        losses: list[float] = []
        with torch.inference_mode():
            for s in range(0, len(mine), cfg.evaluate.batch_size):
                idx = mine[s : s + cfg.evaluate.batch_size]
                losses.append(float(target_loss(model, Prefix(embeds=embeds), [rows.input_ids[i] for i in idx], [rows.target_ids[i] for i in idx], tok.pad_token_id)) * len(idx))
        total = sum(sum(part) for part in gather(losses)) if gather is not None else sum(losses)
        loss = total / max(1, len(rows))
        return {"accuracy": -loss, "macro_f1": -loss, "loss": loss}
    scores = score_split(model, shared_prefix(model, embeds), [rows.input_ids[i] for i in mine], verbalizer, tok.pad_token_id, cfg.evaluate.batch_size)
    predicted = scores.argmax(1).tolist()
    if gather is not None:
        parts, predicted = gather(predicted), [0] * len(rows)
        for r, part in enumerate(parts):
            predicted[r::world] = part
    m = classification_metrics(rows.label_ids, predicted, None, list(verbalizer.labels))
    return {"accuracy": m.accuracy, "macro_f1": m.macro_f1}


def write_adapter(prompt: prompts_mod.SoftPrompt, embeds: torch.Tensor, out_dir: Path) -> Path:
    """Write `embeds` as PEFT adapter files (the saved form of both prompt tuning and P-tuning)."""
    if prompt.peft_model.peft_config[prompt.peft_model.active_adapter].peft_type.value == "PROMPT_TUNING":
        with torch.no_grad():
            saved = prompt.module.embedding.weight.detach().clone()
            prompt.module.embedding.weight.copy_(embeds)
            prompt.save(out_dir)
            prompt.module.embedding.weight.copy_(saved)
        return out_dir
    # P-tuning: PEFT saves the encoder's output; write the chosen (best) output in its place.
    from safetensors.torch import save_file

    prompt.save(out_dir)
    save_file({"prompt_embeddings": embeds.detach().float().cpu().contiguous()}, str(out_dir / prompts_mod.ADAPTER_WEIGHTS))
    return out_dir


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
    target = torch.as_tensor([data.label_ids[i] for i in idx], device=scores.device)
    return F.cross_entropy(scores, target)


class _BatchPlan:
    """Deterministic batches: epoch e's order depends only on (seed, e), so a resumed run sees the
    same batches as an uninterrupted one without saving sampler state.

    Length grouping: shuffle, sort within windows of 50 batches by length, cut into batches, then
    shuffle the batches (similar lengths together, random order of batches).
    """

    def __init__(self, lengths: list[int], batch_size: int, world: int, rank: int, seed: int, grouped: bool) -> None:
        if len(lengths) < batch_size:
            batch_size = len(lengths)
        self.lengths, self.bs, self.world, self.rank, self.seed, self.grouped = lengths, batch_size, world, rank, seed, grouped
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._cache: dict[int, list[list[int]]] = {}

    def batch(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch(epoch)}
        full = self._cache[epoch][i]
        return full[self.rank :: self.world] or full[:1]

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.grouped:
            window = self.bs * 50
            order = [j for c in range(0, len(order), window) for j in sorted(order[c : c + window], key=lambda t: self.lengths[t])]
        batches = [order[s : s + self.bs] for s in range(0, self.per_epoch * self.bs, self.bs)]
        rng.shuffle(batches)
        return batches


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


def _run_fingerprint(cfg: JobConfig, loaded: LoadedModel, train: Split, eval_split: Split | None, hooks: TrainHooks | None) -> dict[str, str]:
    """Hashes of what shapes the trained prompt: task, prompt, train settings, base model and data."""
    import hashlib

    tr = {k: v for k, v in to_dict(cfg.train).items() if k not in ("log_every", "checkpoint_every")}
    parts: dict[str, Any] = {
        "task": to_dict(cfg.task),
        "prompt": to_dict(cfg.prompt),
        "train": tr,
        "model": loaded.identity.get("weights_sha256") or loaded.identity.get("source") or cfg.model.name,
    }
    if not (hooks is not None and hooks.presharded):  # a worker's shard may differ between restarts
        parts["data"] = [[s.input_ids, s.label_ids, s.target_ids] for s in (train, eval_split) if s is not None]
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16] for k, v in parts.items()}


def _check_resumable(ckpt: Path, fingerprint: dict[str, str]) -> None:
    """Refuse to resume a checkpoint of another run: the result would be published under this run's
    config while holding (part of) the other run's prompt."""
    saved = json.loads((ckpt / "state.json").read_text()).get("fingerprint")
    if saved is None:  # written before fingerprints were recorded
        return
    changed = sorted(k for k in fingerprint.keys() | saved.keys() if fingerprint.get(k) != saved.get(k))
    if changed:
        raise ConfigError(
            f"{ckpt} was written by a run with a different {', '.join(changed)}; resuming it would mix two runs. "
            "Use another run_name (or --run-dir), delete that checkpoint, or pass --no-resume to `softprompt train`"
        )


def _save_checkpoint(
    ckpt: Path, prompt: prompts_mod.SoftPrompt, optimizer: Any, scheduler: Any, state: dict[str, Any], best: torch.Tensor | None
) -> Path:
    """Prompt, optimizer, scheduler, step and RNG as safetensors + JSON (never pickle), written atomically."""
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {f"prompt.{k}": v.detach().cpu().contiguous() for k, v in prompt.module.state_dict().items()}
    opt_state = optimizer.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    if best is not None:
        tensors["best_embeds"] = best.detach().float().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {
        **state,
        "param_groups": opt_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "rng_python": list(random.getstate()[1]),
    }
    meta["scheduler"].pop("lr_lambdas", None)
    (tmp / "state.json").write_text(json.dumps(meta, default=_json_default))
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    tmp.replace(ckpt)
    return ckpt


def _load_checkpoint(ckpt: Path, prompt: prompts_mod.SoftPrompt, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], torch.Tensor | None]:
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    device = prompt.module.embedding.weight.device
    prompt.module.load_state_dict({k[len("prompt.") :]: v for k, v in tensors.items() if k.startswith("prompt.")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta.pop("param_groups")}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v if name == "step" else v.to(device)
    optimizer.load_state_dict(opt_state)
    sched = meta.pop("scheduler")
    scheduler.last_epoch = sched["last_epoch"]
    scheduler._step_count = sched.get("_step_count", sched["last_epoch"] + 1)
    scheduler.base_lrs = sched["base_lrs"]
    scheduler._last_lr = sched["_last_lr"]
    torch.set_rng_state(tensors["rng.torch"])
    rng_py = meta.pop("rng_python")
    random.setstate((3, tuple(rng_py), None))
    best = tensors.get("best_embeds")
    return meta, (best.to(device) if best is not None else None)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"cannot serialize {type(o).__name__}")
