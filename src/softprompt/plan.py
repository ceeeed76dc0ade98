"""The memory planner: what one training device holds, by part, for each sharding strategy, from
the model's `config.json` alone (no weights are read).

    shape = ModelShape.from_config("path/to/model/config.json")
    est = estimate(shape, Layout(strategy="fsdp", nodes=1, gpus_per_node=8), Workload(batch=8, seq_len=128, prompt_tokens=20))
    est.total_bytes, est.parts        # {"weights": ..., "gather_buffers": ..., "activations": ..., ...}
    best = recommend(shape, layout, workload, device_bytes=80 * GiB)

The parts (bytes per device, the frozen weights in `dtype_bytes`, the prompt in fp32):

- weights: every parameter (`ModelShape.num_parameters`), divided by the shard group: 1 for ddp,
  every device for fsdp, the devices of one node for hsdp; 0 with CPU offload (the host holds it).
- gather_buffers (fsdp, hsdp): two decoder layers gathered whole, the one running and the next
  one prefetched.
- activations: what autograd keeps for the backward pass. The weights are frozen, so a linear
  layer keeps no input (its input gradient needs only the weight); per token and layer it keeps
  the attention's q, k, v and output, the MLP's gate, up and activation, and the two RMSNorms'
  fp32 statistics: `(2·heads·head_dim + 2·kv·head_dim + 3f)·b + 12h` bytes (`activation_bytes_per_token_layer`;
  checked against the bytes autograd saves on random Llamas of several shapes: within 5%, over).
  Attention runs through SDPA, which keeps no `seq x seq` matrix. With activation checkpointing
  a layer keeps only its input (`h·b` per token) and one layer's activations exist at a time.
- backward: one layer's activations again, the working set of its backward pass.
- head: the LM head's fp32 logits and log-softmax at the scored positions (`batch x vocab`).
- prompt: the soft prompt, its gradient and AdamW's two moments, fp32 (`16 · tokens · h`).

Tokens per device are `batch x (seq_len + prompt_tokens)` where batch is the per-device batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from softprompt.errors import ConfigError

if TYPE_CHECKING:
    from softprompt.config import JobConfig

GiB = 1024**3
Strategy = Literal["ddp", "fsdp", "hsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp", "hsdp")
NORM_STAT_BYTES = 12
"""fp32 bytes per hidden unit the two RMSNorms of a layer keep per token (measured: 3 floats)."""
GATHERED_LAYERS = 2
"""Decoder layers an fsdp device holds whole at once: the running one and the prefetched next."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer (Llama-style `config.json` keys)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None

    @property
    def dim_per_head(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: q and o, k and v (grouped), the gated MLP, two norms."""
        h, kv = self.hidden, self.kv_heads * self.dim_per_head
        q = self.heads * self.dim_per_head
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h

    @property
    def num_parameters(self) -> int:
        """Every parameter: embeddings, layers, the final norm and an untied LM head."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied_embeddings else 2) + self.layers * self.layer_parameters + self.hidden

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face `config.json` (a path to it, to its folder, or its parsed content).

        Raises:
            ConfigError: a key the planner needs is missing (names the file and the key).
        """
        where = "the model config"
        if isinstance(source, Mapping):
            raw: Mapping[str, Any] = source
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            where = str(path)
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {where}: {exc}; pass a Hugging Face model folder or its config.json") from exc
        raw = raw.get("text_config", raw)  # multimodal configs nest the language model's

        def need(key: str) -> int:
            if key not in raw:
                raise ConfigError(f"{where} has no {key!r}; the planner needs a decoder-only (Llama-style) config")
            return int(raw[key])

        heads = need("num_attention_heads")
        return cls(
            hidden=need("hidden_size"), intermediate=need("intermediate_size"), layers=need("num_hidden_layers"),
            heads=heads, kv_heads=int(raw.get("num_key_value_heads") or heads), vocab=need("vocab_size"),
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)), head_dim=raw.get("head_dim"),
        )


@dataclass(frozen=True)
class Layout:
    """Where training runs: nodes x devices, and how the frozen weights are spread over them."""

    strategy: Strategy = "ddp"
    nodes: int = 1
    gpus_per_node: int = 1
    offload: bool = False
    """fsdp/hsdp: keep the frozen shards in host memory, gathered to the device layer by layer."""

    @property
    def world(self) -> int:
        """Devices in all."""
        return self.nodes * self.gpus_per_node

    @property
    def shard_group(self) -> int:
        """Devices one copy of the weights is spread over."""
        return {"ddp": 1, "fsdp": self.world, "hsdp": self.gpus_per_node}[self.strategy]


@dataclass(frozen=True)
class Workload:
    """What one training step asks of a device."""

    batch: int
    """Rows per device per micro-step."""
    seq_len: int
    """Input tokens per row (the data's p95 length is a good choice)."""
    prompt_tokens: int = 20
    dtype_bytes: int = 2
    """Bytes per frozen weight and activation: 2 for bf16, 4 for fp32."""
    checkpointing: bool = False
    prompt_parameters: int = 0
    """Trainable parameters beyond the prompt's own embeddings (P-tuning's encoder)."""


@dataclass(frozen=True)
class Estimate:
    """One device's memory, by part, in bytes."""

    layout: Layout
    workload: Workload
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """All parts together."""
        return sum(self.parts.values())


def activation_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int) -> int:
    """What autograd keeps per token in one decoder layer of a frozen model (see the module doc)."""
    kv = shape.kv_heads * shape.dim_per_head
    q = shape.heads * shape.dim_per_head
    return (2 * q + 2 * kv + 3 * shape.intermediate) * dtype_bytes + NORM_STAT_BYTES * shape.hidden


def estimate(shape: ModelShape, layout: Layout, work: Workload) -> Estimate:
    """One training device's memory by part (see the module doc for each part's formula)."""
    b = work.dtype_bytes
    tokens = work.batch * (work.seq_len + work.prompt_tokens)
    per_layer = tokens * activation_bytes_per_token_layer(shape, b)
    sharded = layout.strategy != "ddp"
    parts = {
        "weights": 0 if (layout.offload and sharded) else shape.num_parameters * b // layout.shard_group,
        "gather_buffers": GATHERED_LAYERS * shape.layer_parameters * b if sharded else 0,
        "activations": (shape.layers * tokens * shape.hidden * b + per_layer) if work.checkpointing else shape.layers * per_layer,
        "backward": per_layer,
        "head": 2 * work.batch * shape.vocab * 4,
        "prompt": 16 * (work.prompt_tokens * shape.hidden + work.prompt_parameters),
    }
    return Estimate(layout, work, parts)


def recommend(shape: ModelShape, layout: Layout, work: Workload, device_bytes: int, headroom: float = 0.9) -> Estimate | None:
    """The fastest plan that fits `headroom` of `device_bytes`: the strategies in order ddp, hsdp
    (several nodes only), fsdp; each first without and then with activation checkpointing; then the
    per-device batch halved, down to 1. None when nothing fits (even fsdp with offload)."""
    budget = device_bytes * headroom
    strategies: list[Strategy] = ["ddp", "hsdp", "fsdp"] if layout.nodes > 1 else ["ddp", "fsdp"]
    batch = work.batch
    while batch >= 1:
        for strategy in strategies:
            for ckpt in (False, True):
                est = estimate(shape, replace(layout, strategy=strategy, offload=False), replace(work, batch=batch, checkpointing=ckpt))
                if est.total_bytes <= budget:
                    return est
        batch //= 2
    est = estimate(shape, replace(layout, strategy="fsdp", offload=True), replace(work, batch=1, checkpointing=True))
    return est if est.total_bytes <= budget else None


def check_fits(shape: ModelShape, layout: Layout, work: Workload, device_bytes: int, *, where: str = "the run") -> Estimate:
    """Refuse a plan that will not fit one device, before any worker starts.

    Raises:
        ConfigError: naming the estimate by part, the device's memory and the plan that fits (the fix).
    """
    est = estimate(shape, layout, work)
    if est.total_bytes <= device_bytes:
        return est
    fix = recommend(shape, layout, work, device_bytes)
    hint = (f"use {describe(fix)}" if fix is not None else "no layout of these devices fits; use more devices or devices with more memory")
    raise ConfigError(
        f"{where} needs {gib(est.total_bytes)} per device ({', '.join(f'{k} {gib(v)}' for k, v in est.parts.items() if v)}) "
        f"with {describe(est)}, but a device has {gib(device_bytes)}; {hint}"
    )


def describe(est: Estimate) -> str:
    """The plan's settings as the config keys that choose them."""
    lay, work = est.layout, est.workload
    parts = [f"train.sharding={lay.strategy}", f"train.batch_size={work.batch * lay.world} ({work.batch} per device)",
             f"train.activation_checkpointing={str(work.checkpointing).lower()}"]
    if lay.offload:
        parts.append("train.offload=true")
    return ", ".join(parts)


def table(estimates: list[Estimate]) -> str:
    """A plain-text table: one row per plan, one column per part, in GiB."""
    names = ["weights", "gather_buffers", "activations", "backward", "head", "prompt"]
    head = f"{'strategy':<9}{'batch':>6}{'ckpt':>6}" + "".join(f"{n.replace('_buffers', ''):>13}" for n in names) + f"{'total':>11}"
    lines = [head, "-" * len(head)]
    for e in estimates:
        row = f"{e.layout.strategy + (' +off' if e.layout.offload else ''):<9}{e.workload.batch:>6}{('yes' if e.workload.checkpointing else 'no'):>6}"
        lines.append(row + "".join(f"{e.parts[n] / GiB:>13.2f}" for n in names) + f"{e.total_bytes / GiB:>11.2f}")
    return "\n".join(lines)


def gib(n: float) -> str:
    """Bytes for people: GiB with two decimals, MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def parse_bytes(text: str) -> int:
    """`80GiB`, `80G`, `40GB`, `512MiB` or a number of bytes, as bytes.

    Raises:
        ConfigError: naming the value and the accepted forms.
    """
    units = {"gib": GiB, "gb": 10**9, "g": GiB, "mib": 1024**2, "mb": 10**6, "m": 1024**2, "": 1}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("gibm")
    unit = s[len(number):]
    try:
        if unit not in units:
            raise ValueError(unit)
        return int(float(number) * units[unit])
    except ValueError:
        raise ConfigError(f"memory size {text!r} is not understood; write it like 80GiB, 40GB or 512MiB") from None


def job_layout(cfg: JobConfig, *, gpus_per_node: int = 8) -> Layout:
    """The layout a job's Ray Train run asks for: `ray.num_workers` devices, `train.sharding`
    (hsdp, and auto, which may choose it: nodes of `gpus_per_node`), `train.offload`."""
    workers = max(1, cfg.ray.num_workers)
    per_node = min(workers, gpus_per_node) if cfg.train.sharding in ("hsdp", "auto") else workers  # auto may choose hsdp
    strategy: Strategy = "ddp" if cfg.train.sharding == "auto" else cfg.train.sharding  # auto is chosen before (choose_sharding)
    return Layout(strategy, nodes=max(1, workers // per_node), gpus_per_node=per_node, offload=cfg.train.offload)


def job_workload(cfg: JobConfig, seq_len: int, *, dtype_bytes: int) -> Workload:
    """What one device does per micro-step in a job: its share of `train.batch_size` (each worker
    draws batch_size / workers rows), `seq_len` tokens, the prompt, checkpointing."""
    per_device = max(1, math.ceil(cfg.train.batch_size / max(1, cfg.ray.num_workers)))
    return Workload(batch=per_device, seq_len=seq_len, prompt_tokens=cfg.prompt.num_virtual_tokens,
                    dtype_bytes=dtype_bytes, checkpointing=cfg.train.activation_checkpointing)


def p95(lengths: list[int]) -> int:
    """The 95th percentile of token lengths (at least 1)."""
    if not lengths:
        return 1
    ordered = sorted(lengths)
    return max(1, ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)])


def choose_sharding(cfg: JobConfig, lengths: Callable[[], list[int]], *, gpu_bytes: int | None = None) -> tuple[JobConfig, str | None]:
    """`train.sharding=auto` made concrete before any worker starts; other settings pass unchanged.

    Returns:
        The configuration with the chosen `train.sharding` (and `train.activation_checkpointing`
        where the plan needs it), and a line for people saying what was chosen and why (None when
        nothing was chosen).

    Raises:
        ConfigError: nothing fits at the configured batch size (the plan that would, as the fix).
    """
    from softprompt.config import replace as config_replace

    if cfg.train.sharding != "auto":
        return cfg, None
    device = parse_bytes(cfg.ray.gpu_memory) if cfg.ray.gpu_memory else gpu_bytes
    if not cfg.ray.use_gpu or device is None:
        why = "CPU workers" if not cfg.ray.use_gpu else "no GPU memory known (set ray.gpu_memory)"
        return config_replace(cfg, ["train.sharding=ddp"]), f"train.sharding=auto: ddp ({why})"
    from softprompt.modeling import model_config

    shape = ModelShape.from_config(model_config(cfg.model, cfg.s3))
    layout = job_layout(cfg)
    work = job_workload(cfg, p95(lengths()), dtype_bytes=4 if cfg.model.dtype == "float32" else 2)
    best = recommend(shape, layout, work, device)
    if best is None or best.workload.batch < work.batch or best.layout.offload != cfg.train.offload:
        check_fits(shape, replace(layout, strategy="fsdp"), replace(work, checkpointing=True), device, where="train.sharding=auto")
        raise ConfigError(f"train.sharding=auto: no layout of {layout.world} devices of {gib(device)} fits this run; "
                          "use more devices, devices with more memory, or train.offload=true")
    chosen = config_replace(cfg, [f"train.sharding={best.layout.strategy}",
                                  f"train.activation_checkpointing={str(best.workload.checkpointing or work.checkpointing).lower()}"])
    return chosen, f"train.sharding=auto: {describe(best)} ({gib(best.total_bytes)} of {gib(device)} per device)"


def preflight(
    cfg: JobConfig, lengths: Callable[[], list[int]], *, gpu_bytes: int | None = None, where: str = "the run"
) -> Estimate | None:
    """Before any worker starts: refuse a GPU run that will not fit one GPU (`check_fits`).

    Checked with `ray.use_gpu` only, against `ray.gpu_memory`, else `gpu_bytes` (a local GPU's);
    without either nothing is checked (None).

    Args:
        cfg: The job configuration.
        lengths: Reads the training rows' token lengths (their p95 is the planned length), only
            when there is something to check.
        gpu_bytes: A local GPU's memory, when there is one.
        where: How messages name the run.

    Raises:
        ConfigError: the run will not fit (the numbers and the fix).
    """
    if not cfg.ray.use_gpu:
        return None
    device = parse_bytes(cfg.ray.gpu_memory) if cfg.ray.gpu_memory else gpu_bytes
    if device is None:
        return None
    from softprompt.modeling import model_config

    shape = ModelShape.from_config(model_config(cfg.model, cfg.s3))
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    return check_fits(shape, job_layout(cfg), job_workload(cfg, p95(lengths()), dtype_bytes=dtype_bytes), device, where=where)
