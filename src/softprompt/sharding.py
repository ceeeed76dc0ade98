"""The frozen base sharded over the workers (FSDP2), the soft prompt replicated beside it.

    call = shard_model(model, mesh=None)            # every decoder layer and the root: fully_shard
    loss = call(fn, *args)                          # runs fn(model, *args) inside the root's forward
    all_reduce_gradients(prompt_params)             # the prompt's gradient, averaged over every rank

With `fully_shard` each rank keeps 1/N of every frozen weight (1/N of a node's devices under
hsdp's 2-D mesh: sharded within a node, replicated across nodes) and gathers a layer's weights
only while that layer runs. The root unit holds the input embeddings, the final norm and the LM
head, which are tied in many models, so they must be used inside the root's forward: outside it
they are sharded DTensors ("mixed torch.Tensor and DTensor"). `shard_model` therefore wraps the
model in a root module whose forward runs any function of the model (`fn(model, *args)`): the
engine's code runs unchanged, inside the sharded forward.

The soft prompt is not part of the model: it stays a plain fp32 tensor on every rank, and since
FSDP reduces only the gradients of the parameters it shards (none here: all are frozen), its
gradient is all-reduced by `all_reduce_gradients`, over every rank (both mesh dimensions).

Every rank must run the same number of root forwards (each gathers weights collectively):
training does by construction; evaluation pads each rank's share of the rows to the same count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from softprompt.engine import decoder_layers
from softprompt.errors import ModelError

if TYPE_CHECKING:
    from softprompt.config import ModelConfig, S3Config
    from softprompt.modeling import LoadedModel

Call = Callable[..., Any]
"""`call(fn, *args)`: `fn(model, *args)`, run where the model's weights are usable."""


def unsharded(model: Any) -> Call:
    """The `Call` of a model that is not sharded."""

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(model, *args, **kwargs)

    return call


class _Root(torch.nn.Module):
    """The root FSDP unit: the whole model, whose forward runs a function of it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def shard_model(
    model: torch.nn.Module, *, mesh: Any = None, reshard_after_forward: bool = True, offload: bool = False
) -> Call:
    """Shard every frozen weight of `model` over `mesh` (None: every rank of the default process
    group) with FSDP2, in place; returns the `Call` that runs code inside the sharded forward.

    Args:
        model: The frozen causal LM, fully loaded on this rank's device.
        mesh: A 1-D device mesh (fsdp) or a 2-D one, replicate x shard (hsdp).
        reshard_after_forward: Free a layer's gathered weights after its forward (and gather them
            again for the backward): less memory for one more all-gather per layer.
        offload: Keep the shards in host memory, copied to the device layer by layer.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    root = _Root(model)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    return root


def load_sharded(cfg: ModelConfig, *, device: str, s3: S3Config | None = None, mesh: Any = None,
                 reshard_after_forward: bool = True) -> tuple[LoadedModel, Call]:
    """The frozen base built empty (meta device), sharded with `shard_model`, and each rank's shards
    read from the safetensors files: a rank reads and holds only its rows of each weight, so a
    node's host memory stays near one model copy or less, whatever its number of ranks.

    Raises:
        ModelError: a weight the model has is in no safetensors file of its folder (names it).
    """
    from softprompt.modeling import load_model

    loaded = load_model(cfg, device=device, s3=s3, empty=True)
    call = shard_model(loaded.model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    read_shards(loaded.model, Path(loaded.identity["local_path"]), torch.device(device))
    return loaded, call


def read_shards(model: torch.nn.Module, folder: Path, device: torch.device) -> None:
    """Allocate `model`'s local shards on `device` and fill them from `folder`'s safetensors files,
    each rank reading only the rows of dim 0 its shard holds (`safe_open(...).get_slice`)."""
    from safetensors import safe_open

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # real: built outside meta
    model.to_empty(device=device)
    where = _weight_files(folder)
    with torch.no_grad(), ExitStack() as files:
        opened: dict[Path, Any] = {}
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, param in model.named_parameters():
            if name not in where:
                raise ModelError(f"weight {name!r} is in no safetensors file of {folder}; a sharded load reads checkpoints whose "
                                 "names match the model's (Hugging Face layout); use train.sharding=ddp for this model")
            if where[name] not in opened:
                opened[where[name]] = files.enter_context(safe_open(str(where[name]), framework="pt", device="cpu"))
            local = param.to_local() if hasattr(param, "to_local") else param
            start, end = _local_rows(param)
            if local.shape[0] != end - start:
                raise ModelError(f"{name}: this rank holds {local.shape[0]} rows, the planned shard {start}:{end}; "
                                 "a sharding layout softprompt does not read (shard dim 0 only)")
            local.copy_(opened[where[name]].get_slice(name)[start:end].to(local.dtype))


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (a sharded checkpoint's index, or the one file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows of dim 0 this rank's shard of `param` holds (FSDP2's torch.chunk split)."""
    rows = int(param.shape[0])
    start, end = 0, rows
    for dim, placement in enumerate(getattr(param, "placements", ())):
        if placement.is_shard():
            n, coordinate = param.device_mesh.size(dim), param.device_mesh.get_local_rank(dim)  # type: ignore[attr-defined]
            chunk = math.ceil(rows / n)
            start = min(rows, coordinate * chunk)
            end = min(rows, start + chunk)
    return start, end


def device_mesh(strategy: str, *, gpus_per_node: int, device_type: str = "cpu") -> Any:
    """The mesh of a strategy over every rank: 1-D for fsdp, 2-D for hsdp (replicate across the
    nodes x shard within a node of `gpus_per_node` ranks).

    Raises:
        ValueError: hsdp over a world that is not a whole number of nodes.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if strategy == "fsdp":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if world % gpus_per_node:
        raise ValueError(f"hsdp needs whole nodes: {world} ranks are not a multiple of {gpus_per_node} per node")
    return init_device_mesh(device_type, (world // gpus_per_node, gpus_per_node), mesh_dim_names=("replicate", "shard"))


def all_reduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of replicated (unsharded) parameters over every rank, in one call."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights this rank holds (a DTensor's local shard, else the whole tensor)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


class ShardedSeams:
    """The `TrainHooks` seams of a sharded base, for any hooks class to mix in (`ShardedHooks` here,
    the Ray Train worker's hooks): the prompt left unwrapped, the model sharded over `mesh`, the
    prompt's gradient averaged over every rank."""

    mesh: Any = None
    reshard_after_forward: bool = True
    offload: bool = False
    loaded_call: Call | None = None
    """The `Call` of a model `load` built sharded (then `shard` has nothing left to do)."""

    def load(self, cfg: ModelConfig, *, device: str, s3: S3Config | None = None) -> LoadedModel:
        """The frozen base, each rank reading only its shards (`load_sharded`); with `offload`, a
        whole copy loaded and then sharded (the host holds the shards either way)."""
        if self.offload:
            from softprompt.modeling import load_model

            return load_model(cfg, device=device, s3=s3)
        loaded, self.loaded_call = load_sharded(cfg, device=device, s3=s3, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)
        return loaded

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The prompt stays as it is: its gradient is averaged by `sync_gradients`."""
        return module

    def shard(self, model: torch.nn.Module) -> Call:
        """`shard_model` over this group (or `mesh`); the model `load` sharded is not sharded again."""
        if self.loaded_call is not None:
            return self.loaded_call
        return shard_model(model, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward, offload=self.offload)

    def sync_gradients(self, params: list[torch.Tensor]) -> None:
        """`all_reduce_gradients`."""
        all_reduce_gradients(params)


class ShardedHooks(ShardedSeams):
    """`softprompt.train.TrainHooks` for ranks of a `torch.distributed` process group (torchrun)
    training with the frozen base sharded (`shard_model`).

    Every rank holds all training rows and takes its slice of each global batch (`presharded`
    False), unless the runner hands each rank its own rows.
    """

    def __init__(self, *, mesh: Any = None, presharded: bool = False, reshard_after_forward: bool = True, offload: bool = False) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.presharded, self.mesh = presharded, mesh
        self.reshard_after_forward, self.offload = reshard_after_forward, offload
        self.reports: list[dict[str, Any]] = []

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def report(self, metrics: dict[str, Any], checkpoint_dir: Any) -> None:
        """Keeps the metrics (`reports`); checkpoints stay where rank 0 wrote them."""
        self.reports.append(metrics)
