"""The memory planner: parameter counts and saved activations against real (random) Llamas, the
strategies' weight shares, the recommendation and the refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt import plan
from softprompt.engine import Prefix, input_hidden, make_batch
from softprompt.errors import ConfigError

SMOLLM2 = {  # SmolLM2-135M-Instruct's config.json (the keys the planner reads)
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64,
}
LLAMA_70B = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}


def _llama(shape: dict[str, int], dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=256, attn_implementation="sdpa", **shape)
    return LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)


SHAPES = [
    {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300},
    {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300},
    {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 3, "vocab_size": 300,
     "tie_word_embeddings": True},
]


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_count_matches_the_model(shape: dict[str, int]) -> None:
    model = _llama(shape, torch.float32)
    assert plan.ModelShape.from_config(shape).num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_estimate_matches_what_autograd_saves(shape: dict[str, int], dtype: torch.dtype) -> None:
    """The bytes autograd keeps for the backward pass (saved tensors' storages, weights excluded) of
    a prompted forward, against the planner's per-token-per-layer figure: within 6%, never under."""
    model = _llama(shape, dtype)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch, seq, prompt = 3, 24, 8
    p = (torch.randn(prompt, shape["hidden_size"]) * 0.05).to(dtype).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        input_hidden(model, Prefix(embeds=p), make_batch([[1] * seq] * batch, 0))
    ms = plan.ModelShape.from_config(shape)
    predicted = ms.layers * batch * (seq + prompt) * plan.activation_bytes_per_token_layer(ms, dtype.itemsize)
    measured = sum(saved.values())
    assert measured <= predicted <= 1.06 * measured, (measured, predicted)


def test_strategies_share_the_weights_and_offload_keeps_them_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    shape = plan.ModelShape.from_config(tmp_path)
    assert shape.num_parameters == 134_515_008  # SmolLM2-135M's count
    work = plan.Workload(batch=8, seq_len=64)
    ddp = plan.estimate(shape, plan.Layout("ddp", nodes=2, gpus_per_node=4), work).parts
    fsdp = plan.estimate(shape, plan.Layout("fsdp", nodes=2, gpus_per_node=4), work).parts
    hsdp = plan.estimate(shape, plan.Layout("hsdp", nodes=2, gpus_per_node=4), work).parts
    off = plan.estimate(shape, plan.Layout("fsdp", nodes=2, gpus_per_node=4, offload=True), work).parts
    assert fsdp["weights"] == ddp["weights"] // 8 and hsdp["weights"] == ddp["weights"] // 4 and off["weights"] == 0
    assert ddp["gather_buffers"] == 0 < fsdp["gather_buffers"] == hsdp["gather_buffers"] == 2 * shape.layer_parameters * 2
    ckpt = plan.estimate(shape, plan.Layout("ddp"), plan.Workload(batch=8, seq_len=64, checkpointing=True)).parts
    assert ckpt["activations"] < ddp["activations"] / 5


def test_recommendation_and_refusal_for_a_70b_model() -> None:
    shape = plan.ModelShape.from_config(LLAMA_70B)
    assert 69e9 < shape.num_parameters < 72e9
    layout = plan.Layout("ddp", nodes=2, gpus_per_node=8)
    work = plan.Workload(batch=4, seq_len=512)
    best = plan.recommend(shape, layout, work, 80 * plan.GiB)
    assert best is not None and best.layout.strategy == "hsdp" and best.total_bytes <= 0.9 * 80 * plan.GiB
    with pytest.raises(ConfigError) as refused:
        plan.check_fits(shape, layout, work, 80 * plan.GiB, where="configs/llama70b.yaml")
    message = str(refused.value)
    assert "configs/llama70b.yaml needs" in message and "weights 131." in message and "a device has 80.00 GiB" in message
    assert "use train.sharding=hsdp" in message
    small = plan.recommend(plan.ModelShape.from_config(SMOLLM2), plan.Layout(), plan.Workload(batch=16, seq_len=64), 80 * plan.GiB)
    assert small is not None and (small.layout.strategy, small.workload.checkpointing, small.workload.batch) == ("ddp", False, 16)
    one = plan.recommend(shape, plan.Layout("ddp"), work, 8 * plan.GiB)  # one 8 GiB device: only with the shards on the host
    assert one is not None and one.layout.offload and one.workload.checkpointing and one.parts["weights"] == 0
    assert plan.recommend(shape, plan.Layout("ddp"), work, 4 * plan.GiB) is None  # not even two gathered layers fit


def test_config_and_size_errors_name_the_fix(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"config.json has no 'num_attention_heads'; the planner needs a decoder-only"):
        plan.ModelShape.from_config(tmp_path)
    assert plan.parse_bytes("80GiB") == 80 * plan.GiB and plan.parse_bytes("40GB") == 40 * 10**9 and plan.parse_bytes("512MiB") == 512 * 1024**2
    with pytest.raises(ConfigError, match="memory size '80 parsecs' is not understood; write it like 80GiB"):
        plan.parse_bytes("80 parsecs")
    text = plan.table([plan.estimate(plan.ModelShape.from_config(LLAMA_70B), plan.Layout("fsdp", gpus_per_node=8), plan.Workload(batch=2, seq_len=512))])
    header, _, row = text.splitlines()
    assert header.split() == ["strategy", "batch", "ckpt", "weights", "gather", "activations", "backward", "head", "prompt", "total"]
    assert row.split()[:4] == ["fsdp", "2", "no", "16.43"]  # 70.6e9 params x 2 bytes / 8 devices


def test_plan_command_prints_the_table_and_a_recommendation(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import DEMO_CONFIG, small_overrides
    from softprompt.cli import main

    assert main(["plan", "-c", str(DEMO_CONFIG), *small_overrides(tiny_model_dir, tmp_path), "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "to measure row lengths" in out and "tokens per row (p95)" in out  # ingested to measure
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("ddp ", "fsdp "))] == ["ddp", "ddp", "fsdp", "fsdp"]
    assert "recommended: train.sharding=ddp, train.batch_size=" in out


def test_a_gpu_run_that_cannot_fit_is_refused_before_ray_starts(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray.gpu_memory` far below the plan: the Ray trainer refuses before connecting to Ray."""
    from conftest import DEMO_CONFIG, small_overrides
    from softprompt import dataset as ds
    from softprompt.config import load_config
    from softprompt.job import Models
    from softprompt.ray import trainers

    cfg = load_config(DEMO_CONFIG, [*small_overrides(tiny_model_dir, tmp_path), "ray.use_gpu=true", "ray.num_workers=1", "ray.gpu_memory=1MiB"])
    data = tmp_path / "data"
    ds.write_split(data, "train", ds.Split(input_ids=[[1] * 40] * 10, label_ids=[0] * 10))
    monkeypatch.setattr(trainers.cluster, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(ConfigError) as refused:
        trainers.RayTrainTrainer(echo=lambda line: None).train(cfg, data, tmp_path, Models(cfg))
    message = str(refused.value)
    assert "this run (1 workers, train.sharding=ddp) needs" in message and "a device has 1.0 MiB" in message
    assert "; use train.sharding=ddp, train.batch_size=" in message  # the plan that fits: fewer rows per step


def test_auto_sharding_takes_the_planners_choice_before_any_worker_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import DEMO_CONFIG, small_overrides
    from softprompt.config import JobConfig, load_config

    def cfg(*extra: str) -> JobConfig:
        return load_config(DEMO_CONFIG, [*small_overrides(tiny_model_dir, tmp_path), "train.sharding=auto", *extra])

    def lengths() -> list[int]:
        return [512] * 10

    cpu, line = plan.choose_sharding(cfg(), lengths)
    assert cpu.train.sharding == "ddp" and line == "train.sharding=auto: ddp (CPU workers)"
    big = tmp_path / "llama70b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(LLAMA_70B))
    gpus = ["ray.use_gpu=true", f"model.name={big}", "ray.num_workers=16", "train.batch_size=64", "model.dtype=bfloat16"]
    chosen, line = plan.choose_sharding(cfg(*gpus, "ray.gpu_memory=80GiB"), lengths)
    assert chosen.train.sharding == "hsdp" and line is not None and line.startswith("train.sharding=auto: train.sharding=hsdp")
    assert plan.choose_sharding(chosen, lengths) == (chosen, None)  # a concrete strategy passes as it is
    with pytest.raises(ConfigError, match=r"train.sharding=auto needs .* per device"):
        plan.choose_sharding(cfg(*gpus, "ray.gpu_memory=4GiB"), lengths)
