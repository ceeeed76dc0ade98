"""The engine's forward against the plain Hugging Face forward on the concatenated embeddings.

Every test uses `tiny_ctx` (conftest): the tiny model with layers redrawn so that its output depends
on the context, and a wrong position or mask shows.

The references run one row at a time with no padding and the model's own `forward` (default
position ids, full logits), so they share nothing with the engine's batching, right padding,
explicit positions, key/value prefix cache or sparse LM head.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from softprompt.engine import Prefix, cache_prefix, greedy_generate, label_scores, make_batch, target_loss
from softprompt.modeling import LoadedModel
from softprompt.tasks import Verbalizer

ATOL = 1e-4


@pytest.fixture()
def tiny(tiny_ctx: LoadedModel) -> LoadedModel:
    return tiny_ctx


def _seqs(tiny: LoadedModel) -> list[list[int]]:
    texts = ["My card was charged twice.", "Where is my package?", "cancel", "The app crashes when I open settings, please help me now."]
    return [tiny.tokenizer(t)["input_ids"] for t in texts]


def _prompt(tiny: LoadedModel, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, tiny.model.config.hidden_size, generator=g) * 0.1


def _verbalizer(tiny: LoadedModel, words: dict[str, list[str]]) -> Verbalizer:
    enc = [tuple(tuple(tiny.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in ws) for ws in words.values()]
    return Verbalizer(labels=tuple(words), words=tuple(enc))


def _reference_logits(tiny: LoadedModel, prefix: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """Full logits `[len(ids), V]` at the input positions, from `model(inputs_embeds=...)` on one row."""
    emb = tiny.model.get_input_embeddings()(torch.as_tensor([ids]))
    n = 0 if prefix is None else prefix.shape[0]
    if prefix is not None:
        emb = torch.cat([prefix.unsqueeze(0), emb], 1)
    with torch.no_grad():
        logits = tiny.model(inputs_embeds=emb).logits[0]
    return logits[n:].float()


def _reference_scores(tiny: LoadedModel, prefix: torch.Tensor | None, ids: list[int], vb: Verbalizer) -> torch.Tensor:
    out = []
    for ws in vb.words:
        per_word = []
        for w in ws:
            logp = F.log_softmax(_reference_logits(tiny, prefix, ids + list(w)), -1)
            per_word.append(sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(w)))
        out.append(torch.logsumexp(torch.stack(per_word), 0))
    return torch.stack(out)


def test_tokenizer_gives_the_words_these_tests_assume(tiny: LoadedModel) -> None:
    single = _verbalizer(tiny, {"billing": [" billing"], "refund": [" refund"], "delivery": [" delivery"]})
    multi = _verbalizer(tiny, {"pos": [" positive"], "neg": [" negative"]})
    assert single.single_token and not multi.single_token


@pytest.mark.parametrize("with_prefix", [False, True], ids=["zero-shot", "soft-prompt"])
@pytest.mark.parametrize(
    "words",
    [
        {"billing": [" billing"], "refund": [" refund"], "delivery": [" delivery"]},
        {"billing": [" billing", " account"], "refund": [" refund"], "delivery": [" delivery", " product"]},
        {"pos": [" positive"], "neg": [" negative"], "other": [" no"]},
        {"pos": [" positive", " yes"], "neg": [" negative", " no", " refund"]},
    ],
    ids=["single-token", "single-token-several-words", "multi-token", "multi-token-several-words"],
)
def test_label_scores_match_the_plain_forward(tiny: LoadedModel, words: dict[str, list[str]], with_prefix: bool) -> None:
    vb = _verbalizer(tiny, words)
    seqs = _seqs(tiny)
    p = _prompt(tiny, 5) if with_prefix else None
    prefix = Prefix(embeds=p) if p is not None else Prefix.none()
    with torch.no_grad():
        got = label_scores(tiny.model, prefix, seqs, vb, tiny.tokenizer.pad_token_id)
    want = torch.stack([_reference_scores(tiny, p, s, vb) for s in seqs])
    assert got.shape == (len(seqs), len(words))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("words", [{"a": [" billing"], "b": [" refund", " account"]}, {"a": [" positive"], "b": [" negative", " no"]}])
def test_cached_prefix_equals_uncached(tiny: LoadedModel, words: dict[str, list[str]]) -> None:
    vb = _verbalizer(tiny, words)
    p = _prompt(tiny, 6)
    with torch.no_grad():
        uncached = label_scores(tiny.model, Prefix(embeds=p), _seqs(tiny), vb, tiny.tokenizer.pad_token_id)
        cached = label_scores(tiny.model, cache_prefix(tiny.model, p), _seqs(tiny), vb, tiny.tokenizer.pad_token_id)
        again = label_scores(tiny.model, cache_prefix(tiny.model, p), _seqs(tiny)[:2], vb, tiny.tokenizer.pad_token_id)
    torch.testing.assert_close(cached, uncached, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, uncached[:2], atol=ATOL, rtol=0)  # the shared cache is not mutated


@pytest.mark.parametrize("words", [{"a": [" billing"], "b": [" refund"]}, {"a": [" positive"], "b": [" negative"]}])
def test_mixed_per_row_prompts_equal_each_prompt_alone(tiny: LoadedModel, words: dict[str, list[str]]) -> None:
    vb = _verbalizer(tiny, words)
    seqs = _seqs(tiny)
    prompts = [_prompt(tiny, 3, seed=1), _prompt(tiny, 7, seed=2), _prompt(tiny, 1, seed=3), _prompt(tiny, 7, seed=4)]
    n_max = max(p.shape[0] for p in prompts)
    embeds = torch.zeros(len(prompts), n_max, prompts[0].shape[1])
    mask = torch.zeros(len(prompts), n_max, dtype=torch.long)
    for i, p in enumerate(prompts):
        embeds[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    embeds[mask == 0] = 123.0  # whatever sits in the masked slots must not matter
    with torch.no_grad():
        mixed = label_scores(tiny.model, Prefix(embeds=embeds, mask=mask), seqs, vb, tiny.tokenizer.pad_token_id)
        alone = torch.cat([label_scores(tiny.model, Prefix(embeds=p), [s], vb, tiny.tokenizer.pad_token_id) for p, s in zip(prompts, seqs, strict=True)])
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        torch.testing.assert_close(alone[i], _reference_scores(tiny, p, s, vb), atol=ATOL, rtol=0)


def test_target_loss_equals_reference_cross_entropy(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    inputs = [tok("Translate: good morning\nFrench:")["input_ids"], tok("Q: hi")["input_ids"], tok("Where is my package? It is late")["input_ids"]]
    targets = [tok(" bonjour", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], tok(" hello there friend")["input_ids"], [tok.eos_token_id]]
    p = _prompt(tiny, 4)
    with torch.no_grad():
        got = target_loss(tiny.model, Prefix(embeds=p), inputs, targets, tok.pad_token_id)
        got_plain = target_loss(tiny.model, Prefix.none(), inputs, targets, tok.pad_token_id)
    for prefix, value in ((p, got), (None, got_plain)):
        terms = []
        for a, b in zip(inputs, targets, strict=True):
            logp = F.log_softmax(_reference_logits(tiny, prefix, a + b), -1)
            terms += [-logp[len(a) - 1 + k, t] for k, t in enumerate(b)]
        torch.testing.assert_close(value, torch.stack(terms).mean(), atol=ATOL, rtol=0)


def test_target_loss_backpropagates_into_the_prompt(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    p = _prompt(tiny, 4).requires_grad_(True)
    loss = target_loss(tiny.model, Prefix(embeds=p), [tok("Q: hi")["input_ids"]], [tok(" ok")["input_ids"]], tok.pad_token_id)
    loss.backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def _greedy_reference(tiny: LoadedModel, prefix: torch.Tensor | None, ids: list[int], steps: int, eos: int | None) -> list[int]:
    """Plain greedy decoding: full forward over the whole sequence at every step, one row."""
    out: list[int] = []
    for _ in range(steps):
        nxt = int(_reference_logits(tiny, prefix, ids + out)[-1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


@pytest.mark.parametrize("with_prefix", [False, True], ids=["no-prefix", "soft-prompt"])
def test_greedy_generate_cached_equals_uncached(tiny: LoadedModel, with_prefix: bool) -> None:
    tok = tiny.tokenizer
    seqs = _seqs(tiny)
    p = _prompt(tiny, 5) if with_prefix else None
    kwargs = {"max_new_tokens": 8, "eos_id": None, "pad_id": tok.pad_token_id}
    cached = greedy_generate(tiny.model, p, seqs, use_cache=True, **kwargs)  # type: ignore[arg-type]
    uncached = greedy_generate(tiny.model, p, seqs, use_cache=False, **kwargs)  # type: ignore[arg-type]
    assert cached == uncached
    assert all(len(g) == 8 for g in cached)
    assert len({t for g in cached for t in g}) > 8  # real text, not one token repeated
    # Batching rows of different lengths changes nothing either: each row alone, plain forward.
    assert cached[1:3] == [_greedy_reference(tiny, p, s, 8, None) for s in seqs[1:3]]
    assert [tok.decode(g) for g in cached] == [tok.decode(g) for g in uncached]


def test_greedy_generate_stops_at_eos_per_row(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    seqs = _seqs(tiny)
    free = greedy_generate(tiny.model, None, seqs, max_new_tokens=8, eos_id=None, pad_id=tok.pad_token_id)
    eos = free[0][2]  # pretend the third token row 0 generates is EOS: row 0 stops there
    stopped = greedy_generate(tiny.model, None, seqs, max_new_tokens=8, eos_id=eos, pad_id=tok.pad_token_id)
    uncached = greedy_generate(tiny.model, None, seqs, max_new_tokens=8, eos_id=eos, pad_id=tok.pad_token_id, use_cache=False)
    assert stopped == uncached
    assert stopped[0] == free[0][: free[0].index(eos)]
    for got, full in zip(stopped, free, strict=True):
        assert got == (full[: full.index(eos)] if eos in full else full)


def test_make_batch_right_pads() -> None:
    b = make_batch([[5, 6, 7], [8]], pad_id=0, multiple=4)
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b.lengths.tolist() == [3, 1]


def test_the_cache_is_passed_and_read_under_the_name_the_installed_transformers_uses() -> None:
    from types import SimpleNamespace

    from softprompt.engine import _cache_kwarg, _cache_of

    class New(torch.nn.Module):
        def forward(self, inputs_embeds: Any = None, cache: Any = None, use_cache: bool = False) -> Any: ...

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds: Any = None, past_key_values: Any = None, use_cache: bool = False) -> Any: ...

    assert _cache_kwarg(New(), "kv") == {"cache": "kv"}
    assert _cache_kwarg(Old(), "kv") == {"past_key_values": "kv"}
    assert _cache_of(SimpleNamespace(cache="a")) == "a"
    assert _cache_of(SimpleNamespace(cache=None, past_key_values="b")) == "b"
    assert _cache_of(SimpleNamespace(past_key_values="c")) == "c"


def _prompt_grad(model: Any, prompt: torch.Tensor, seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, int]:
    """The prompt's gradient of a label loss, and the bytes autograd saved for the backward pass."""
    from softprompt.engine import input_hidden

    p = prompt.clone().requires_grad_(True)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = input_hidden(model, Prefix(embeds=p), make_batch(seqs, pad_id))
        h.float().pow(2).mean().backward()
    assert p.grad is not None
    return p.grad, saved[0]


def test_recomputed_layers_give_the_same_prompt_gradient_for_less_saved_memory(tiny_ctx: LoadedModel) -> None:
    from softprompt.engine import decoder_layers, recomputed_layers

    model, tok = tiny_ctx.model, tiny_ctx.tokenizer
    seqs = [tok("the parcel never came and support does not answer")["input_ids"], tok("refund please")["input_ids"]]
    prompt = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.05
    plain, plain_bytes = _prompt_grad(model, prompt, seqs, tok.pad_token_id)
    with recomputed_layers(model):
        recomputed, recomputed_bytes = _prompt_grad(model, prompt, seqs, tok.pad_token_id)
    torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)
    assert plain.abs().sum() > 0  # the gradient reaches the prompt through every frozen layer
    assert recomputed_bytes < 0.2 * plain_bytes, (recomputed_bytes, plain_bytes)  # measured: 47 kB vs 624 kB
    # Off again outside the block: the next plain pass saves what it saved before.
    _, again_bytes = _prompt_grad(model, prompt, seqs, tok.pad_token_id)
    assert again_bytes == plain_bytes and len(decoder_layers(model)) == model.config.num_hidden_layers
