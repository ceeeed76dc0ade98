"""Soft prompts: build PEFT prompt-tuning / P-tuning modules, initialize them, save and load them.

Training uses PEFT's own prompt modules (so artifacts are PEFT's files and load with
`PeftModel.from_pretrained`), but not PEFT's model forward: `softprompt.engine` puts the prompt in
front of the input itself, keeps position ids, and computes logits only where they are needed.
At inference a prompt is just a `[num_virtual_tokens, hidden]` tensor read from safetensors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from softprompt.config import PromptConfig, TaskConfig
from softprompt.errors import ModelError
from softprompt.tasks import build_verbalizer, render

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class SoftPrompt:
    """A trainable soft prompt on a frozen base model.

    Attributes:
        peft_model: The `PeftModel` wrapping the base model (used for its prompt module and saving).
        module: The trainable prompt module (`PromptEmbedding` or P-tuning `PromptEncoder`).
    """

    def __init__(self, peft_model: Any, num_virtual_tokens: int) -> None:
        import torch

        self.peft_model = peft_model
        self.module = peft_model.prompt_encoder[peft_model.active_adapter]
        self.num_virtual_tokens = num_virtual_tokens
        self._indices = torch.arange(num_virtual_tokens).unsqueeze(0)  # moved to the prompt's device on first use

    def embeddings(self, module: Any | None = None) -> Any:
        """The virtual token embeddings, `[num_virtual_tokens, hidden]`, differentiable.

        Args:
            module: Run this wrapper of `self.module` instead (e.g. its DistributedDataParallel
                wrapper, so gradients are all-reduced across workers).
        """
        m = module if module is not None else self.module
        device = self.module.embedding.weight.device
        if self._indices.device != device:  # once, not a host-to-device copy per micro-step
            self._indices = self._indices.to(device)
        return m(self._indices)[0]

    def parameters(self) -> list[Any]:
        """The trainable parameters."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def save(self, out_dir: str | Path) -> Path:
        """Write PEFT's adapter files (`adapter_config.json`, `adapter_model.safetensors`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(out))
        return out


def create(cfg: PromptConfig, task: TaskConfig, model: Any, tokenizer: Any, *, seed: int = 0) -> SoftPrompt:
    """A new trainable soft prompt for `model`, initialized as `cfg.init` says.

    Raises:
        ModelError: when `init: pretrained` points at a prompt of another width.
    """
    import torch
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    hidden = int(model.get_input_embeddings().weight.shape[1])
    if cfg.method == "prompt_tuning":
        peft_cfg: Any = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    else:
        peft_cfg = PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.num_virtual_tokens,
            encoder_reparameterization_type=cfg.encoder_type.upper(),
            encoder_hidden_size=cfg.encoder_hidden_size,
        )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_cfg)
    prompt = SoftPrompt(peft_model, cfg.num_virtual_tokens)
    init = initial_embeddings(cfg, task, model, tokenizer, seed=seed)
    with torch.no_grad():
        # For P-tuning this seeds the encoder's input table; its MLP/LSTM then transforms it.
        prompt.module.embedding.weight.copy_(init.to(prompt.module.embedding.weight.dtype))
    # The prompt trains in fp32 even over bf16 frozen weights: its updates are tiny relative to
    # its values, and bf16 would round them away.
    prompt.module.float()
    assert prompt.module.embedding.weight.shape[1] == hidden
    return prompt


def initial_embeddings(cfg: PromptConfig, task: TaskConfig, model: Any, tokenizer: Any, *, seed: int = 0) -> Any:
    """The `[num_virtual_tokens, hidden]` starting point chosen by `cfg.init`."""
    import torch

    weight = model.get_input_embeddings().weight.detach()
    n = cfg.num_virtual_tokens

    def rows(ids: list[int]) -> Any:
        # Index on the model's device, then copy the n rows: not the whole table in fp32.
        return weight[torch.as_tensor(ids, device=weight.device)].float().cpu()

    if cfg.init == "pretrained":
        assert cfg.init_from is not None
        source = load_prompt_embeddings(resolve_prompt_dir(cfg.init_from)).float()
        if source.shape[1] != weight.shape[1]:
            raise ModelError(
                f"prompt.init_from={cfg.init_from!r} has width {source.shape[1]}, the model has {weight.shape[1]}; "
                "transfer works only between prompts of the same base model family"
            )
        reps = -(-n // source.shape[0])
        return source.repeat(reps, 1)[:n].clone()
    if cfg.init == "vocab":
        # Lester et al.: sample from the most frequent tokens; BPE ids are roughly frequency-ordered.
        rng = random.Random(seed)
        top = min(5000, weight.shape[0])
        return rows([rng.randrange(top) for _ in range(n)])
    if cfg.init == "label_words":
        verbalizer = build_verbalizer(task, tokenizer)
        ids = [t for ws in verbalizer.words for w in ws for t in w]
        # Follow the label words with the template's own tokens so the prompt starts as a task hint.
        ids += tokenizer(render(task.template, "").strip(), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError(f"prompt.init={cfg.init} produced no tokens; set prompt.init_text or use init: vocab")
    ids = (ids * (-(-n // len(ids))))[:n]
    return rows(ids)


def load_prompt_embeddings(adapter_dir: str | Path) -> Any:
    """Read a tuned prompt's `[num_virtual_tokens, hidden]` embeddings from PEFT's safetensors file.

    Only safetensors and JSON are read: nothing downloaded is ever unpickled.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ModelError(f"{path} does not exist; point at a folder written by `softprompt train`")
    tensors = load_file(str(path))
    if "prompt_embeddings" not in tensors:
        raise ModelError(f"{path} holds {sorted(tensors)}, not a prompt-tuning adapter (no 'prompt_embeddings')")
    return tensors["prompt_embeddings"]


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """PEFT's `adapter_config.json` of a tuned prompt."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelError(f"{path} does not exist; point at a folder written by `softprompt train`")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if data.get("peft_type") not in ("PROMPT_TUNING", "P_TUNING"):
        raise ModelError(f"{path}: peft_type={data.get('peft_type')!r}; softprompt serves PROMPT_TUNING and P_TUNING adapters")
    return data


def resolve_prompt_dir(ref: str | Path) -> Path:
    """A local folder holding adapter files for `ref` (a folder, a run folder, or a registry URI)."""
    path = Path(str(ref)).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    if str(ref).startswith("s3://"):
        from softprompt.registry import resolve_artifact
        from softprompt.uris import artifact_cache

        local = Path(resolve_artifact(str(ref), artifact_cache()))
        return resolve_prompt_dir(local)
    raise ModelError(f"no {ADAPTER_WEIGHTS} in {ref} or {ref}/adapter; point at a tuned prompt folder")
