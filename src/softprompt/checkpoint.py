"""Checkpoints and adapters of the training loop: what is saved, how a run resumes, what is published.

A checkpoint holds the prompt, the optimizer and scheduler state, the step, the history, the best
prompt so far and the RNG states, as safetensors plus JSON (never pickle), written atomically. It
also records a fingerprint of what shapes the prompt (task, prompt and train settings, base model,
data), so a run never resumes another run's checkpoint. Only the prompt and its optimizer state are
saved: the frozen base model is never copied.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softprompt import prompts as prompts_mod
from softprompt.config import JobConfig, to_dict
from softprompt.dataset import Split
from softprompt.errors import ConfigError
from softprompt.modeling import LoadedModel

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
HISTORY_FILE = "train_history.json"


LAYOUT_KEYS = ("sharding", "reshard_after_forward", "offload", "activation_checkpointing")
"""`train` keys that a checkpoint may be resumed across (see `run_fingerprint`)."""


def run_fingerprint(cfg: JobConfig, loaded: LoadedModel, train: Split, eval_split: Split | None, *, presharded: bool) -> dict[str, str]:
    """Hashes of what shapes the trained prompt: task, prompt, train settings, base model and data."""
    # How the base is held and recomputed changes memory and speed, not the prompt: a run may resume
    # under another strategy, as it may on another number of workers.
    tr = {k: v for k, v in to_dict(cfg.train).items() if k not in ("log_every", "checkpoint_every", *LAYOUT_KEYS)}
    parts: dict[str, Any] = {
        "task": to_dict(cfg.task),
        "prompt": to_dict(cfg.prompt),
        "train": tr,
        "model": loaded.identity.get("weights_sha256") or loaded.identity.get("source") or cfg.model.name,
    }
    if not presharded:  # a worker's shard may differ between restarts
        parts["data"] = [[s.input_ids, s.label_ids, s.target_ids] for s in (train, eval_split) if s is not None]
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16] for k, v in parts.items()}


def check_resumable(ckpt: Path, fingerprint: dict[str, str]) -> None:
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


def save(
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
        shutil.rmtree(ckpt)
    tmp.replace(ckpt)
    return ckpt


def load(ckpt: Path, prompt: prompts_mod.SoftPrompt, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], torch.Tensor | None]:
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
    (out / HISTORY_FILE).write_text(json.dumps(meta.get("history", []), indent=1))
    return out / ADAPTER_DIR


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
