"""The training loop: it learns, resumes bitwise, checkpoints without pickle, and stays sparse."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from softprompt import checkpoint, prompts, train
from softprompt import dataset as ds
from softprompt.batching import BatchPlan
from softprompt.config import DataConfig, JobConfig, config_from_dict
from softprompt.dataset import Split
from softprompt.engine import Prefix, label_scores
from softprompt.errors import ConfigError, ModelError
from softprompt.modeling import LoadedModel
from softprompt.tasks import build_verbalizer, encode_input

# An easy task the label is recoverable from: the last word of the text is a cue for its label.
SYN_TASK = {
    "name": "syn",
    "template": "{text}",
    "labels": ["refund", "delivery"],
    "verbalizer": {"refund": [" refund"], "delivery": [" delivery"]},
}
_FILLER = ["please", "help", "me", "today", "with", "my", "order", "thanks", "a", "lot"]
_CUES = {"refund": ["money", "back", "refund", "reimburse"], "delivery": ["package", "tracking", "shipping", "late"]}


def synthetic(tok: Any, n: int, seed: int = 0) -> Split:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = SYN_TASK["labels"][i % 2]
        texts.append(" ".join([*rng.sample(_FILLER, 3), rng.choice(_CUES[label])]))
        labels.append(label)
    return Split(
        input_ids=[encode_input(tok, "{text}", t) for t in texts],
        label_ids=[SYN_TASK["labels"].index(label) for label in labels],
        texts=texts,
        labels=labels,
    )


def syn_cfg(prompt: dict[str, Any] | None = None, **train_section: Any) -> JobConfig:
    """The synthetic task with small defaults; keyword arguments override the `train` section."""
    tr = {"steps": 6, "batch_size": 8, "lr": 0.1, "warmup_steps": 1, "eval_every": 2, "log_every": 1, "schedule": "cosine", **train_section}
    pr = {"num_virtual_tokens": 8, "init": "vocab", **(prompt or {})}
    return config_from_dict({"task": SYN_TASK, "data": {"train": "unused.csv"}, "prompt": pr, "train": tr})


def _full_loss(loaded: LoadedModel, cfg: JobConfig, embeds: torch.Tensor, data: Split) -> tuple[float, float]:
    vb = build_verbalizer(cfg.task, loaded.tokenizer)
    with torch.no_grad():
        s = label_scores(loaded.model, Prefix(embeds=embeds), data.input_ids, vb, loaded.tokenizer.pad_token_id)
    y = torch.as_tensor(data.label_ids)
    return float(F.cross_entropy(s, y)), float((s.argmax(1) == y).float().mean())


def test_training_learns_an_easy_task(tiny_ctx: LoadedModel, tmp_path: Path) -> None:
    data = synthetic(tiny_ctx.tokenizer, 48)
    cfg = syn_cfg(steps=30, eval_every=0, schedule="constant", keep_best=False)
    before = _full_loss(tiny_ctx, cfg, prompts.initial_embeddings(cfg.prompt, cfg.task, tiny_ctx.model, tiny_ctx.tokenizer), data)
    result = train.run(cfg, tiny_ctx, data, None, tmp_path)
    after = _full_loss(tiny_ctx, cfg, prompts.load_prompt_embeddings(result.adapter_dir), data)
    assert before[0] > 0.6 and before[1] < 0.7  # starts at chance
    assert after[0] < 0.25 and after[1] == 1.0, (before, after)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert result.steps == 30 and result.tokens_per_second > 0


class _Interrupt(Exception):
    pass


class _StopAfter:
    """Hooks that let the loop run alone but raise from `report` at step `k` (after its checkpoint)."""

    rank, world_size, presharded = 0, 1, False

    def __init__(self, k: int) -> None:
        self.k = k
        self.reports: list[dict[str, Any]] = []

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if metrics["step"] >= self.k:
            assert checkpoint_dir is not None and (checkpoint_dir / "state.json").is_file()
            raise _Interrupt


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_resume_gives_the_same_prompt_as_an_uninterrupted_run(tiny_ctx: LoadedModel, tmp_path: Path, method: str) -> None:
    data, rows = synthetic(tiny_ctx.tokenizer, 32), synthetic(tiny_ctx.tokenizer, 8, seed=1)
    cfg = syn_cfg(steps=6, eval_every=2, batch_size=4, grad_accum=2, keep_best=False, prompt={"method": method})
    whole = train.run(cfg, tiny_ctx, data, rows, tmp_path / "whole")

    hooks = _StopAfter(4)
    with pytest.raises(_Interrupt):
        train.run(cfg, tiny_ctx, data, rows, tmp_path / "resumed", hooks=hooks)
    assert [r["step"] for r in hooks.reports] == [2, 4]
    # Scramble the global RNGs: resuming must restore what it needs from the checkpoint.
    torch.manual_seed(12345)
    random.seed(12345)
    after = _StopAfter(99)
    resumed = train.run(cfg, tiny_ctx, data, rows, tmp_path / "resumed", hooks=after)
    assert [r["step"] for r in after.reports] == [6]  # it went on from step 4, not from the start
    state = json.loads((resumed_dir := tmp_path / "resumed" / checkpoint.CHECKPOINT_DIR / "state.json").read_text())
    assert state["resumed_at"] == [4], resumed_dir

    assert resumed.steps == whole.steps == 6
    a = _tensors(whole.adapter_dir / prompts.ADAPTER_WEIGHTS)
    b = _tensors(resumed.adapter_dir / prompts.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise on CPU
    ca = _tensors(whole.output_dir / checkpoint.CHECKPOINT_DIR / "state.safetensors")
    cb = _tensors(resumed.output_dir / checkpoint.CHECKPOINT_DIR / "state.safetensors")
    for key in ca:
        if not key.startswith("rng."):
            assert torch.equal(ca[key], cb[key]), key  # prompt module and optimizer state too
    assert resumed.history == whole.history


def test_resume_of_a_finished_run_trains_no_further(tiny: LoadedModel, tmp_path: Path) -> None:
    data = synthetic(tiny.tokenizer, 16)
    cfg = syn_cfg(steps=3, eval_every=0)
    first = train.run(cfg, tiny, data, None, tmp_path)
    again = train.run(cfg, tiny, data, None, tmp_path)
    assert again.steps == first.steps == 3
    assert torch.equal(prompts.load_prompt_embeddings(first.adapter_dir), prompts.load_prompt_embeddings(again.adapter_dir))


def test_resume_refuses_a_checkpoint_of_another_run(tiny: LoadedModel, tmp_path: Path) -> None:
    data = synthetic(tiny.tokenizer, 16)
    cfg = syn_cfg(steps=2, eval_every=0)
    train.run(cfg, tiny, data, None, tmp_path)
    changed = {
        "train": (syn_cfg(steps=2, eval_every=0, lr=0.3), data),
        "prompt": (syn_cfg(steps=2, eval_every=0, prompt={"num_virtual_tokens": 5}), data),
        "data": (cfg, synthetic(tiny.tokenizer, 16, seed=7)),
    }
    for what, (other_cfg, other_data) in changed.items():
        with pytest.raises(ConfigError, match=rf"different {what}; resuming it would mix two runs"):
            train.run(other_cfg, tiny, other_data, None, tmp_path)
    # Settings that do not shape the prompt may change; --no-resume starts over.
    assert train.run(syn_cfg(steps=2, eval_every=0, log_every=2), tiny, data, None, tmp_path).steps == 2
    assert train.run(changed["train"][0], tiny, data, None, tmp_path, resume=False).steps == 2


def test_checkpoints_hold_only_safetensors_and_json(tiny: LoadedModel, tmp_path: Path) -> None:
    data, rows = synthetic(tiny.tokenizer, 16), synthetic(tiny.tokenizer, 8, seed=1)
    result = train.run(syn_cfg(steps=4, eval_every=2, checkpoint_every=1), tiny, data, rows, tmp_path)
    ckpt = result.output_dir / checkpoint.CHECKPOINT_DIR
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "state.safetensors"]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no half-written checkpoint left
    for p in files:
        assert p.suffix in (".json", ".safetensors", ".md"), p
        head = p.read_bytes()[:2]
        assert head != b"PK" and not head.startswith(b"\x80"), f"{p} looks like a pickle / torch.save file"
    tensors = _tensors(ckpt / "state.safetensors")
    assert {"prompt.embedding.weight", "best_embeds", "rng.torch"} <= set(tensors)
    assert any(k.startswith("opt.") and k.endswith("exp_avg") for k in tensors)


def test_early_stopping_stops(tiny: LoadedModel, tmp_path: Path) -> None:
    data, rows = synthetic(tiny.tokenizer, 16), synthetic(tiny.tokenizer, 8, seed=1)
    # A learning rate this small never changes a prediction: the metric cannot improve after step 1.
    cfg = syn_cfg(steps=20, eval_every=1, lr=1e-12, early_stopping_patience=2)
    result = train.run(cfg, tiny, data, rows, tmp_path)
    assert result.stopped_early
    assert result.steps == 3 and result.best_step == 1
    assert [h["step"] for h in result.history if "eval_metric" in h] == [1, 2, 3]
    # Running it again resumes a finished run: it trains no further.
    again = train.run(cfg, tiny, data, rows, tmp_path)
    assert again.stopped_early and again.steps == 3 and again.history == result.history


def test_every_trial_of_a_sweep_is_scored_on_the_same_eval_rows(tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # train.seed is in the default search space; if it picked the eval subset, ASHA would compare
    # trials on different rows. The subset follows data.split_seed only.
    data, rows = synthetic(tiny.tokenizer, 16), synthetic(tiny.tokenizer, 40, seed=1)
    seen: dict[tuple[int, int], list[int]] = {}
    real = train.evaluate_embeddings

    def spy(cfg: JobConfig, loaded: LoadedModel, embeds: torch.Tensor, split: Split, *rest: Any, **kw: Any) -> Any:
        seen[(cfg.train.seed, cfg.data.split_seed)] = list(split.rows)
        return real(cfg, loaded, embeds, split, *rest, **kw)

    monkeypatch.setattr(train, "evaluate_embeddings", spy)
    for seed, split_seed in ((0, 0), (1, 0), (2, 0), (0, 7)):
        cfg = dataclasses.replace(syn_cfg(steps=1, warmup_steps=0, eval_every=1, eval_max_rows=12, seed=seed), data=DataConfig(train="unused.csv", split_seed=split_seed))
        train.run(cfg, tiny, data, rows, tmp_path / f"{seed}-{split_seed}")
    assert len(seen[(0, 0)]) == 12 and seen[(0, 0)] == sorted(seen[(0, 0)])
    assert seen[(0, 0)] == seen[(1, 0)] == seen[(2, 0)]
    assert seen[(0, 7)] != seen[(0, 0)]  # another data seed draws other rows
    assert rows.sample(None, 0) is rows and rows.sample(40, 0) is rows


def test_grad_accumulation_sums_micro_batches(tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic(tiny.tokenizer, 16)
    cfg = syn_cfg(steps=1, warmup_steps=0, eval_every=0, batch_size=2, grad_accum=2)
    micro: list[list[int]] = []
    grads: list[torch.Tensor] = []
    real_loss, real_clip = train._loss, torch.nn.utils.clip_grad_norm_

    def spy_loss(model: Any, prefix: Prefix, split: Split, idx: list[int], *rest: Any) -> torch.Tensor:
        micro.append(list(idx))
        return real_loss(model, prefix, split, idx, *rest)

    def spy_clip(params: Any, *args: Any, **kwargs: Any) -> Any:
        grads.extend(p.grad.detach().clone() for p in params)
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(train, "_loss", spy_loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    train.run(cfg, tiny, data, None, tmp_path)

    assert len(micro) == 2 and all(len(m) == 2 for m in micro)
    assert not set(micro[0]) & set(micro[1])  # two different micro-batches
    (grad,) = grads
    # Reference: one batch holding both micro-batches, same starting prompt (its own equal halves).
    start = prompts.initial_embeddings(cfg.prompt, cfg.task, tiny.model, tiny.tokenizer, seed=cfg.train.seed).requires_grad_(True)
    vb = build_verbalizer(cfg.task, tiny.tokenizer)
    real_loss(tiny.model, Prefix(embeds=start), data, micro[0] + micro[1], vb, tiny.tokenizer.pad_token_id).backward()
    assert start.grad is not None
    torch.testing.assert_close(grad, start.grad, atol=1e-6, rtol=1e-4)


def test_p_tuning_trains_and_saves_a_peft_adapter(tiny: LoadedModel, tmp_path: Path) -> None:
    data = synthetic(tiny.tokenizer, 16)
    cfg = syn_cfg(steps=3, eval_every=0, keep_best=False, prompt={"method": "p_tuning", "encoder_hidden_size": 32})
    result = train.run(cfg, tiny, data, None, tmp_path)
    adapter = prompts.read_adapter_config(result.adapter_dir)
    assert adapter["peft_type"] == "P_TUNING" and adapter["num_virtual_tokens"] == 8
    assert adapter["encoder_hidden_size"] == 32
    assert sorted(p.name for p in result.adapter_dir.iterdir() if p.suffix != ".md") == [prompts.ADAPTER_CONFIG, prompts.ADAPTER_WEIGHTS]
    emb = prompts.load_prompt_embeddings(result.adapter_dir)
    assert emb.shape == (8, tiny.model.config.hidden_size)
    assert torch.isfinite(emb).all()


def test_pretrained_init_starts_from_the_earlier_prompt(tiny: LoadedModel, tmp_path: Path) -> None:
    data = synthetic(tiny.tokenizer, 16)
    source = train.run(syn_cfg(steps=2, eval_every=0, prompt={"num_virtual_tokens": 4}), tiny, data, None, tmp_path / "source")
    earlier = prompts.load_prompt_embeddings(source.adapter_dir)
    for ref, n in ((source.adapter_dir, 4), (source.output_dir, 6)):  # the adapter folder, or its run folder
        cfg = syn_cfg(prompt={"init": "pretrained", "init_from": str(ref), "num_virtual_tokens": n})
        prompt = prompts.create(cfg.prompt, cfg.task, tiny.model, tiny.tokenizer)
        got = prompt.embeddings().detach()
        assert got.shape == (n, earlier.shape[1])
        torch.testing.assert_close(got, earlier.repeat(2, 1)[:n], atol=0, rtol=0)


def test_pretrained_init_refuses_a_prompt_of_another_width(tiny: LoadedModel, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(4, 32)}, str(tmp_path / prompts.ADAPTER_WEIGHTS))
    cfg = syn_cfg(prompt={"init": "pretrained", "init_from": str(tmp_path)})
    with pytest.raises(ModelError, match="width 32"):
        prompts.initial_embeddings(cfg.prompt, cfg.task, tiny.model, tiny.tokenizer)


@pytest.mark.parametrize("init", ["vocab", "text", "label_words"])
def test_initial_embeddings_have_realistic_norms(tiny: LoadedModel, init: str) -> None:
    cfg = syn_cfg(prompt={"init": init, "init_text": "Which label fits this message?", "num_virtual_tokens": 12})
    table = tiny.model.get_input_embeddings().weight.detach()
    typical = float(table.norm(dim=1).median())
    emb = prompts.create(cfg.prompt, cfg.task, tiny.model, tiny.tokenizer).embeddings().detach()
    norms = emb.norm(dim=1)
    assert emb.shape == (12, table.shape[1])
    assert float(norms.min()) > 0.5 * typical and float(norms.max()) < 2.0 * typical
    assert float(norms.mean()) < 0.25 * table.shape[1] ** 0.5  # N(0, 1) rows would have norm ~sqrt(d)
    assert len({tuple(r.tolist()) for r in emb}) > 1  # not one row repeated
    if init == "label_words":
        first = [tiny.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" refund", " delivery")]
        torch.testing.assert_close(emb[:2], table[first], atol=0, rtol=0)


def test_length_grouping_batches_similar_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(400)]

    def spread(grouped: bool) -> float:
        plan = BatchPlan(lengths, 8, 1, 0, seed=0, grouped=grouped)
        batches = [plan.batch(k) for k in range(plan.per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(400))  # one epoch sees every row once
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(True) < 0.2 * spread(False)
    # Deterministic: a new plan (a resumed run) draws the same batches, epoch after epoch.
    a = BatchPlan(lengths, 8, 1, 0, seed=3, grouped=True)
    b = BatchPlan(lengths, 8, 1, 0, seed=3, grouped=True)
    assert [a.batch(k) for k in (0, 5, 60, 49)] == [b.batch(k) for k in (0, 5, 60, 49)]
    assert a.batch(0) != a.batch(50)  # the next epoch is reshuffled


def _head_rows(loaded: LoadedModel) -> tuple[list[tuple[bool, tuple[int, ...]]], Any]:
    calls: list[tuple[bool, tuple[int, ...]]] = []

    def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        calls.append((torch.is_grad_enabled(), tuple(args[0].shape)))

    return calls, loaded.model.get_output_embeddings().register_forward_hook(hook)


def test_loop_runs_the_lm_head_only_at_label_positions(tiny: LoadedModel, demo_cfg: Callable[..., JobConfig], demo_data: Path, tmp_path: Path) -> None:
    cfg = demo_cfg("train.steps=3", "train.eval_every=2")
    trn, ev = ds.read_split(demo_data, "train"), ds.read_split(demo_data, "eval")
    assert build_verbalizer(cfg.task, tiny.tokenizer).single_token
    calls, handle = _head_rows(tiny)
    try:
        train.run(cfg, tiny, trn, ev, tmp_path)
    finally:
        handle.remove()
    d = tiny.model.config.hidden_size
    training = [shape for grad, shape in calls if grad]
    inference = [shape for grad, shape in calls if not grad]
    assert training == [(cfg.train.batch_size, d)] * 3  # one row per example, never [B, L, V]
    assert inference and all(len(s) == 2 and s[0] <= cfg.evaluate.batch_size for s in inference)


def test_multi_token_label_words_run_the_head_only_at_word_tokens(tiny: LoadedModel, tmp_path: Path) -> None:
    task = {**SYN_TASK, "verbalizer": {"refund": [" positive"], "delivery": [" negative", " no"]}}
    cfg = config_from_dict({"task": task, "data": {"train": "x.csv"}, "prompt": {"num_virtual_tokens": 4, "init": "vocab"}, "train": {"steps": 1, "warmup_steps": 0, "batch_size": 4, "eval_every": 0}})
    words = [len(tiny.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in (" positive", " negative", " no")]
    calls, handle = _head_rows(tiny)
    try:
        train.run(cfg, tiny, synthetic(tiny.tokenizer, 8), None, tmp_path)
    finally:
        handle.remove()
    assert [shape for grad, shape in calls if grad] == [(4 * sum(words), tiny.model.config.hidden_size)]


def test_sharded_evaluation_gives_the_metrics_of_one_process_scoring_every_row(tiny_ctx: LoadedModel) -> None:
    cfg = syn_cfg(steps=2)
    rows = synthetic(tiny_ctx.tokenizer, 11, seed=3)  # odd: the ranks get 6 and 5 rows
    vb = build_verbalizer(cfg.task, tiny_ctx.tokenizer)
    embeds = tiny_ctx.model.get_input_embeddings().weight[:4].detach()
    whole = train.evaluate_embeddings(cfg, tiny_ctx, embeds, rows, vb)

    parts: dict[int, Any] = {}

    def rank1(obj: Any) -> list[Any]:
        parts[1] = obj
        return [[0] * 6, obj]  # rank 0's part is a placeholder: this call's result is not used

    train.evaluate_embeddings(cfg, tiny_ctx, embeds, rows, vb, gather=rank1, rank=1, world=2)
    assert len(parts[1]) == 5  # rank 1 scored rows 1, 3, 5, 7, 9 only
    sharded = train.evaluate_embeddings(cfg, tiny_ctx, embeds, rows, vb, gather=lambda obj: [obj, parts[1]], rank=0, world=2)
    assert sharded == whole
    # A prompt that predicts no class perfectly: the check above is not vacuous.
    assert 0.0 < whole["accuracy"] < 1.0 or whole["macro_f1"] < 1.0
