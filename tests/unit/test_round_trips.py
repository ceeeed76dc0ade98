"""Host-device round trips in the hot loops: how many times softprompt's code makes the host wait.

No GPU runs the unit tests, so a fake device hook stands in: every way a tensor's value reaches
Python (`item`, `tolist`, `cpu`, `numpy`, `float()`, `int()`, `bool()`, `nonzero`) is counted when
it is called from a `softprompt` module. On CUDA each of these blocks the host until the GPU has
caught up; on CPU they are free, which is why only counting catches them. (On a GPU,
`torch.cuda.set_sync_debug_mode("warn")` reports the same reads, plus syncs inside torch calls that
this counter cannot see, such as a boolean-mask index; `benchmarks/gpu_smoke.py` counts those.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import syn_cfg, synthetic  # tests/unit is on sys.path (rootdir-relative imports)

from softprompt import train
from softprompt.engine import Prefix, cache_prefix, greedy_generate, label_scores
from softprompt.modeling import LoadedModel
from softprompt.predict import gather_prompts
from softprompt.tasks import build_verbalizer, encode_input

_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The list of device reads made from softprompt's code while the test runs (`module:method`)."""
    seen: list[str] = []
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("softprompt"):
                seen.append(f"{caller}:{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield seen


def _train_reads(reads: list[str], tiny: LoadedModel, tmp_path: Path, steps: int, log_every: int) -> int:
    data = synthetic(tiny.tokenizer, 16)
    cfg = syn_cfg(steps=steps, eval_every=0, log_every=log_every, grad_accum=2, batch_size=4)
    before = len(reads)
    train.run(cfg, tiny, data, None, tmp_path / f"{steps}-{log_every}", resume=False)
    return len(reads) - before


def test_a_training_step_reads_nothing_from_the_device_until_it_logs(reads: list[str], tiny: LoadedModel, tmp_path: Path) -> None:
    # N = 0 per optimizer step that logs nothing (2 micro-steps each): the loss stays on the device,
    # the batch's index and label tensors are queued copies. Setup and the final save read the same
    # amount in both runs, so the difference is what 4 more steps cost.
    short = _train_reads(reads, tiny, tmp_path, steps=2, log_every=100)
    mark = len(reads)
    long = _train_reads(reads, tiny, tmp_path, steps=6, log_every=100)
    assert long - short == 0, reads[mark:]
    # N = 1 per step that logs: the step's loss, read once, not once per micro-step.
    logged = _train_reads(reads, tiny, tmp_path, steps=6, log_every=1)
    assert logged - long == 5, reads  # steps 1..5 now log; step 6 logged in both


def test_greedy_generation_reads_its_tokens_once(reads: list[str], tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    inputs = [encode_input(tok, "{text}", t) for t in ["my parcel is late", "refund please", "hello", "where is my order now"]]
    with torch.inference_mode():
        out = greedy_generate(tiny.model, None, inputs, max_new_tokens=8, eos_id=None, pad_id=tok.pad_token_id)
    assert [len(o) for o in out] == [8] * 4
    assert reads == ["softprompt.engine:tolist"]  # not 4 rows x 8 tokens = 32 scalar reads


def test_label_scores_read_nothing(reads: list[str], demo_cfg: Any, tiny: LoadedModel) -> None:
    cfg = demo_cfg()
    vb = build_verbalizer(cfg.task, tiny.tokenizer)
    seqs = [encode_input(tiny.tokenizer, cfg.task.template, t) for t in ["my parcel is late", "refund please"]]
    with torch.inference_mode():
        label_scores(tiny.model, Prefix.none(), seqs, vb, tiny.tokenizer.pad_token_id)
    assert reads == []


def test_mixed_prompt_scores_read_nothing_and_match_one_prompt_at_a_time(reads: list[str], demo_cfg: Any, tiny: LoadedModel) -> None:
    """Rows of prompts of different lengths in one batch (serving's mixed batches): packing takes
    the prompt and input lengths from the host, so scoring reads nothing from the device, and each
    row scores what it scores with its own prompt alone."""
    cfg = demo_cfg()
    vb = build_verbalizer(cfg.task, tiny.tokenizer)
    d = tiny.model.get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    long, short = torch.randn(6, d, generator=gen) * 0.02, torch.randn(3, d, generator=gen) * 0.02
    seqs = [encode_input(tiny.tokenizer, cfg.task.template, t) for t in ["my parcel is late", "refund please", "hi"]]
    with torch.inference_mode():
        mixed = label_scores(tiny.model, gather_prompts([long, short, long]), seqs, vb, tiny.tokenizer.pad_token_id)
        assert reads == []
        alone = [label_scores(tiny.model, Prefix(embeds=e), [s], vb, tiny.tokenizer.pad_token_id) for e, s in zip([long, short, long], seqs, strict=True)]
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_a_cached_prefix_is_reused_without_copies_and_scores_the_same(demo_cfg: Any, tiny_ctx: LoadedModel) -> None:
    cfg = demo_cfg()
    model, tok = tiny_ctx.model, tiny_ctx.tokenizer
    vb = build_verbalizer(cfg.task, tok)
    texts = ["my parcel is late", "refund please", "hello", "where is my order now", "cancel it", "app crashes"]
    seqs = [encode_input(tok, cfg.task.template, t) for t in texts]
    embeds = torch.randn(5, model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cached = cache_prefix(model, embeds)
        keys_before = [layer.keys.clone() for layer in cached.cache.layers]
        # Batch sizes 4, 2, 4 again: the second batch of 4 reuses the repeated cache the first built.
        for chunk in (seqs[:4], seqs[4:], seqs[:4]):
            got = label_scores(model, cached, chunk, vb, tok.pad_token_id)
            want = label_scores(model, Prefix(embeds=embeds), chunk, vb, tok.pad_token_id)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sorted(cached.repeated) == [2, 4]
    for before, layer in zip(keys_before, cached.cache.layers, strict=True):
        assert torch.equal(before, layer.keys)  # the shared prefix's own cache is never extended
    for layer in cached.repeated[4].layers:
        assert layer.keys.shape[0] == 4 and layer.keys.shape[-2] == 5  # nor the repeated one


class _DDPLike(torch.nn.Module):
    """Stands in for DistributedDataParallel: counts the micro-steps run without an all-reduce."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.unsynced = 0

    def forward(self, x: torch.Tensor) -> Any:
        return self.inner(x)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.unsynced += 1
        yield


class _Hooks:
    rank, world_size, presharded = 0, 1, False
    wrapped: _DDPLike

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        self.wrapped = _DDPLike(module)
        return self.wrapped

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        pass


def test_ddp_all_reduces_only_on_the_last_micro_step(tiny: LoadedModel, tmp_path: Path) -> None:
    hooks = _Hooks()
    cfg = syn_cfg(steps=2, eval_every=0, grad_accum=3, batch_size=4)
    train.run(cfg, tiny, synthetic(tiny.tokenizer, 16), None, tmp_path, hooks=hooks)
    assert hooks.wrapped.unsynced == 2 * (3 - 1)  # 2 steps x the first 2 of 3 micro-steps


def test_label_index_built_during_evaluation_still_serves_training() -> None:
    """The per-device label index is cached; built first under inference mode (an evaluation), it
    must still be usable where autograd saves it (the next training step)."""
    from softprompt.engine import _LABEL_INDEX, per_label_scores
    from softprompt.tasks import Verbalizer

    verbalizer = Verbalizer(labels=("a", "b"), words=(((5,), (6,)), ((7,),)))
    _LABEL_INDEX.clear()
    with torch.inference_mode():
        per_label_scores(torch.randn(2, 10), verbalizer)
    scores = torch.randn(2, 10, requires_grad=True)
    per_label_scores(scores, verbalizer).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
