"""The forward pass: a (soft or hard) prefix in front of right-padded inputs, logits only where needed.

Why not PEFT's forward: it drops `position_ids`, computes full-vocabulary logits at every position,
and with transformers 5.x its `generate()` re-injects the prompt at every step. Here the prefix is
concatenated as embeddings, positions are explicit (so pads in the middle are harmless), and the
LM head runs only at the positions a score or loss reads: one row per example for single-token
label words, instead of `batch x sequence x vocabulary`.

Shapes: B batch, L input length (right-padded), n prefix length, d hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.tasks import Verbalizer


@dataclass
class Batch:
    """Right-padded token ids with their mask and true lengths."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    lengths: torch.Tensor  # [B]
    sizes: tuple[int, ...] = ()
    """The same lengths on the host (known when the batch was built), so that shapes derived from
    them never read the device; empty when unknown."""


def make_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu", multiple: int = 1) -> Batch:
    """Right-pad `seqs` to the longest one (rounded up to `multiple`)."""
    longest = max(len(s) for s in seqs)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    sizes = tuple(len(s) for s in seqs)
    lengths = torch.as_tensor(sizes, dtype=torch.long)
    return Batch(to_device(ids, device), to_device(mask, device), to_device(lengths, device), sizes)


def to_device(t: torch.Tensor, device: Any) -> torch.Tensor:
    """A CPU tensor copied to `device` without blocking the host (pinned first on CUDA).

    A plain `.to(cuda)` of pageable memory waits for the GPU to finish its queued work; from
    pinned memory the copy is queued like a kernel and the host goes on building the next batch.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Prefix:
    """What goes in front of every input.

    Either `embeds` (`[n, d]` shared, or `[B, n, d]` per row with `mask` `[B, n]` marking each row's
    real prefix tokens, left-aligned) or a precomputed `cache` of a shared prefix of `length` tokens.
    """

    embeds: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    sizes: tuple[int, ...] = ()
    """With `mask`: each row's prefix length on the host (what `mask` marks), so that packing needs
    no device read; empty when unknown."""
    cache: Any = None
    length: int = 0
    repeated: dict[int, Any] = field(default_factory=dict, repr=False)
    """`cache` repeated for a batch of B rows, by B: built once per batch size (see `_fresh_cache`)."""

    @classmethod
    def none(cls) -> Prefix:
        """No prefix (zero-shot)."""
        return cls()


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of a causal LM (`model.model.layers` for Llama-style models)."""
    body, _ = body_and_head(model)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (no `layers` or `h` on {type(body).__name__})")
    return list(layers)


@contextlib.contextmanager
def recomputed_layers(model: Any, enabled: bool = True) -> Iterator[None]:
    """Activation checkpointing per decoder layer while the block runs (training's forward and
    backward): each layer keeps only its input and recomputes the rest in the backward pass, so
    activation memory no longer grows with the number of layers, for about one more forward.

    Non-reentrant (torch's composable `checkpoint`), so the gradient still reaches the input
    embeddings, which is the only path a soft prompt's gradient has through a frozen model. The
    hooks are installed once per layer and switched on only inside this block: evaluation and
    prediction on the same model pay nothing. The model is in eval mode (no dropout), so no RNG
    state is stashed for the recomputation.
    """
    if not enabled:
        yield
        return
    from torch.distributed._composable import checkpoint

    layers = decoder_layers(model)
    for layer in layers:
        if not getattr(layer, "_softprompt_checkpointed", False):
            checkpoint(layer, preserve_rng_state=False)
            layer._softprompt_checkpointed = True  # type: ignore[assignment]
        checkpoint.state(layer).enable_hook = True
    try:
        yield
    finally:
        for layer in layers:
            checkpoint.state(layer).enable_hook = False


def body_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body (hidden states out) and the LM head of a causal LM."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model, model.get_output_embeddings()


def input_hidden(model: Any, prefix: Prefix, batch: Batch) -> torch.Tensor:
    """Final hidden states at the input positions, `[B, L, d]` (prefix positions sliced off)."""
    body, _ = body_and_head(model)
    emb = model.get_input_embeddings()(batch.input_ids)
    B, L = batch.input_ids.shape
    device = emb.device
    if prefix.cache is not None:
        n = prefix.length
        cache = _fresh_cache(prefix, B)
        mask = torch.cat([torch.ones(B, n, dtype=batch.attention_mask.dtype, device=device), batch.attention_mask], 1)
        pos = (n + torch.arange(L, device=device)).unsqueeze(0).expand(B, L)
        out = body(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True, **_cache_kwarg(body, cache))
        hidden: torch.Tensor = out.last_hidden_state
        return hidden
    if prefix.embeds is None:
        pos = torch.arange(L, device=device).unsqueeze(0).expand(B, L)
        out = body(inputs_embeds=emb, attention_mask=batch.attention_mask, position_ids=pos, use_cache=False)
        hidden = out.last_hidden_state
        return hidden
    p = prefix.embeds.to(emb.dtype)
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(B, -1, -1)
    n = p.shape[1]
    if prefix.mask is not None and not (min(prefix.sizes) == n if prefix.sizes else bool(prefix.mask.all())):
        return _packed_hidden(body, p, prefix.mask.to(device), emb, batch, prefix.sizes)
    pmask = torch.ones(B, n, dtype=batch.attention_mask.dtype, device=device)
    pos = torch.arange(n + L, device=device).unsqueeze(0).expand(B, n + L)  # inputs start right after the prompt
    out = body(
        inputs_embeds=torch.cat([p, emb], 1),
        attention_mask=torch.cat([pmask, batch.attention_mask], 1),
        position_ids=pos,
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, n:]
    return hidden


def _packed_hidden(
    body: Any, p: torch.Tensor, pmask: torch.Tensor, emb: torch.Tensor, batch: Batch, sizes: tuple[int, ...] = ()
) -> torch.Tensor:
    """Rows with prompts of different lengths, packed: `[prompt_b, input_b, pad...]`.

    Padding each prompt to the longest one in the batch would add up to `n_max - n_b` masked
    positions per row; packing puts every row's input right after its own prompt, so a mixed batch
    costs what its longest row costs. Returns hidden states at the input positions, `[B, L, d]`.
    """
    B, L = batch.input_ids.shape
    device = emb.device
    n_b = pmask.long().sum(1)  # [B]
    if sizes and batch.sizes:  # known on the host: no device read
        width = max(n + length for n, length in zip(sizes, batch.sizes, strict=True))
    else:
        width = int((n_b + batch.lengths).max())
    x = emb.new_zeros(B, p.shape[1] + L, emb.shape[-1])
    rows = torch.arange(B, device=device).unsqueeze(1)
    prompt_cols = torch.arange(p.shape[1], device=device).unsqueeze(0).expand(B, -1)
    keep = pmask.bool()
    x[rows.expand_as(prompt_cols)[keep], prompt_cols[keep]] = p[keep]
    in_cols = n_b.unsqueeze(1) + torch.arange(L, device=device).unsqueeze(0)  # [B, L]
    x[rows.expand(B, L), in_cols] = emb
    x = x[:, :width]
    mask = (torch.arange(width, device=device).unsqueeze(0) < (n_b + batch.lengths).unsqueeze(1)).to(batch.attention_mask.dtype)
    pos = torch.arange(width, device=device).unsqueeze(0).expand(B, width)
    out = body(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
    hidden: torch.Tensor = out.last_hidden_state[rows.expand(B, L), in_cols.clamp(max=width - 1)]
    return hidden


def _fresh_cache(prefix: Prefix, B: int) -> Any:
    """A cache holding the shared prefix for B rows that this batch's forward may extend.

    A forward with `use_cache=True` extends the cache it is given: each `DynamicLayer.update` sets
    `layer.keys = torch.cat([layer.keys, new])`, a new tensor, leaving the old one untouched. So a
    shallow copy of the cache and its layers, pointing at tensors repeated once per batch size, is
    as good as the deep copy it replaces, without copying `n x layers` keys and values per batch.
    Caches without `layers` (transformers 4.x) still get the deep copy.
    """
    template = prefix.repeated.get(B)
    if template is None:
        template = copy.deepcopy(prefix.cache)
        template.batch_repeat_interleave(B)
        prefix.repeated[B] = template
    if not isinstance(getattr(template, "layers", None), list):
        return copy.deepcopy(template)
    fresh = copy.copy(template)
    fresh.layers = [copy.copy(layer) for layer in template.layers]
    return fresh


def _label_index(verbalizer: Verbalizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's columns, `[num_labels, most words]`, and which of them are real, built once per device.

    For single-token label words the columns are token ids in the vocabulary; otherwise they are
    indices into `verbalizer.candidates`.
    """
    key = (verbalizer.words, str(device))
    hit = _LABEL_INDEX.get(key)
    if hit is None:
        if verbalizer.single_token:
            cols = [[w[0] for w in ws] for ws in verbalizer.words]
        else:
            cands = verbalizer.candidates
            cols = [[c for c, (lab, _) in enumerate(cands) if lab == label] for label in range(len(verbalizer.words))]
        width = max(len(c) for c in cols)
        # Built outside inference mode even when first asked for during evaluation: the cached
        # tensors are reused by training steps, where autograd must be able to save them.
        with torch.inference_mode(False):
            ids = torch.as_tensor([c + [0] * (width - len(c)) for c in cols], dtype=torch.long).to(device)
            real = torch.as_tensor([[True] * len(c) + [False] * (width - len(c)) for c in cols]).to(device)
        hit = _LABEL_INDEX[key] = (ids, real)
    return hit


_LABEL_INDEX: dict[tuple[Any, str], tuple[torch.Tensor, torch.Tensor]] = {}


def per_label_scores(scores: torch.Tensor, verbalizer: Verbalizer) -> torch.Tensor:
    """`[B, num_labels]`: log-sum-exp over each label's columns of `scores` (`[B, columns]`)."""
    ids, real = _label_index(verbalizer, scores.device)
    picked = scores[:, ids].masked_fill(~real, float("-inf"))  # [B, num_labels, most words]
    return torch.logsumexp(picked, -1)


def _cache_kwarg(body: Any, cache: Any) -> dict[str, Any]:
    """The key/value cache as the model's forward takes it: `cache=` (transformers >= 5.2x) or
    `past_key_values=` (earlier 5.x and 4.x, e.g. the CUDA images' 5.17)."""
    name = _CACHE_KWARG.get(type(body))
    if name is None:
        params = inspect.signature(body.forward).parameters
        name = _CACHE_KWARG[type(body)] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


_CACHE_KWARG: dict[type, str] = {}


def _cache_of(out: Any) -> Any:
    """The cache a forward returned, under either name (see `_cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_prefix(model: Any, embeds: torch.Tensor) -> Prefix:
    """Run a shared prefix (`[n, d]`) once and keep its key/value cache for every later batch."""
    body, _ = body_and_head(model)
    n = embeds.shape[0]
    with torch.no_grad():
        x = embeds.to(model.get_input_embeddings().weight.dtype).unsqueeze(0)
        out = body(
            inputs_embeds=x,
            attention_mask=torch.ones(1, n, dtype=torch.long, device=x.device),
            position_ids=torch.arange(n, device=x.device).unsqueeze(0),
            use_cache=True,
        )
    return Prefix(cache=_cache_of(out), length=n)


def label_scores(model: Any, prefix: Prefix, seqs: Sequence[Sequence[int]], verbalizer: Verbalizer, pad_id: int) -> torch.Tensor:
    """Log-probability of each label's words after each input, `[B, num_labels]`.

    Single-token label words: one forward pass, the LM head at one position per row. Multi-token
    words: each input is repeated once per candidate word and the word's tokens are scored by
    teacher forcing (summed log-probability). A label with several words takes their log-sum-exp.
    """
    device = model.get_input_embeddings().weight.device
    _, head = body_and_head(model)
    B = len(seqs)
    if verbalizer.single_token:
        batch = make_batch(seqs, pad_id, device)
        h = input_hidden(model, prefix, batch)
        last = h[torch.arange(B, device=device), batch.lengths - 1]  # [B, d]
        return per_label_scores(F.log_softmax(head(last).float(), -1), verbalizer)  # from [B, V]
    cands = verbalizer.candidates
    C = len(cands)
    rows = [list(s) + list(w) for s in seqs for _, w in cands]
    if prefix.embeds is not None and prefix.embeds.dim() == 3:
        prefix = Prefix(
            embeds=prefix.embeds.repeat_interleave(C, 0),
            mask=None if prefix.mask is None else prefix.mask.repeat_interleave(C, 0),
            sizes=tuple(n for n in prefix.sizes for _ in range(C)),
        )
    batch = make_batch(rows, pad_id, device)
    h = input_hidden(model, prefix, batch)
    # The positions of every word token are known on the host: one index copy, and the LM head
    # runs at those tokens only (a boolean mask on the device would make the host wait for it).
    r: list[int] = []
    c: list[int] = []
    for i, s in enumerate(seqs):
        for k, (_, w) in enumerate(cands):
            r += [i * C + k] * len(w)
            c += range(len(s) - 1, len(s) - 1 + len(w))
    index = to_device(torch.as_tensor([r, c], dtype=torch.long), device)
    hs = h[index[0], index[1]]  # [word tokens, d]
    targets = batch.input_ids[index[0], index[1] + 1]
    tok_logp = F.log_softmax(head(hs).float(), -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    word_logp = torch.zeros(B * C, device=device).index_add(0, index[0], tok_logp).view(B, C)
    return per_label_scores(word_logp, verbalizer)


def target_loss(model: Any, prefix: Prefix, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over target tokens only (generation tasks)."""
    device = model.get_input_embeddings().weight.device
    _, head = body_and_head(model)
    rows = [list(a) + list(b) for a, b in zip(inputs, targets, strict=True)]
    batch = make_batch(rows, pad_id, device)
    h = input_hidden(model, prefix, batch)
    r, c, t = [], [], []
    for i, (a, b) in enumerate(zip(inputs, targets, strict=True)):
        for k in range(len(b)):
            r.append(i)
            c.append(len(a) - 1 + k)
            t.append(b[k])
    index = to_device(torch.as_tensor([r, c, t], dtype=torch.long), device)  # one copy, not three
    hs = h[index[0], index[1]]
    return F.cross_entropy(head(hs).float(), index[2])


def greedy_generate(
    model: Any,
    prefix_embeds: torch.Tensor | None,
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy decoding with the prefix built in as embeddings (never PEFT's `generate`).

    `use_cache=False` recomputes the whole sequence at every step; it exists to check that the
    cached path gives identical text.
    """
    device = model.get_input_embeddings().weight.device
    body, head = body_and_head(model)
    embed = model.get_input_embeddings()
    B = len(inputs)
    batch = make_batch(inputs, pad_id, device)
    L = batch.input_ids.shape[1]
    n = 0 if prefix_embeds is None else prefix_embeds.shape[0]
    dtype = embed.weight.dtype
    p = None if prefix_embeds is None else prefix_embeds.to(dtype).unsqueeze(0).expand(B, -1, -1)
    first_pos = torch.cat([torch.arange(n, device=device).unsqueeze(0).expand(B, n), n + torch.arange(L, device=device).unsqueeze(0).expand(B, L)], 1)
    first_mask = torch.cat([torch.ones(B, n, dtype=torch.long, device=device), batch.attention_mask], 1)
    first_emb = embed(batch.input_ids) if p is None else torch.cat([p, embed(batch.input_ids)], 1)
    steps: list[torch.Tensor] = []  # each step's tokens, [B], kept on the device until the end
    done = torch.zeros(B, dtype=torch.bool, device=device)
    last_index = n + batch.lengths - 1
    with torch.no_grad():
        out = body(inputs_embeds=first_emb, attention_mask=first_mask, position_ids=first_pos, use_cache=use_cache)
        hidden = out.last_hidden_state[torch.arange(B, device=device), last_index]
        cache = _cache_of(out) if use_cache else None
        seq_emb, seq_mask, seq_pos = first_emb, first_mask, first_pos
        for step in range(max_new_tokens):
            nxt = head(hidden).float().argmax(-1)  # [B]
            steps.append(nxt)
            if step == max_new_tokens - 1:
                break
            if eos_id is not None:
                done |= nxt == eos_id
                # Stopping early needs the host to read `done`: once every 8 tokens, not per token.
                if step % 8 == 7 and bool(done.all()):
                    break
            new_emb = embed(nxt).unsqueeze(1)
            new_pos = (n + batch.lengths + step).unsqueeze(1)
            seq_mask = torch.cat([seq_mask, torch.ones(B, 1, dtype=torch.long, device=device)], 1)
            if use_cache:
                out = body(inputs_embeds=new_emb, attention_mask=seq_mask, position_ids=new_pos, use_cache=True, **_cache_kwarg(body, cache))
                cache = _cache_of(out)
                hidden = out.last_hidden_state[:, -1]
            else:
                seq_emb = torch.cat([seq_emb, new_emb], 1)
                seq_pos = torch.cat([seq_pos, new_pos], 1)
                out = body(inputs_embeds=seq_emb, attention_mask=seq_mask, position_ids=seq_pos, use_cache=False)
                hidden = out.last_hidden_state[:, -1]
    generated: list[list[int]] = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]  # one read
    if eos_id is not None:
        generated = [g[: g.index(eos_id)] if eos_id in g else g for g in generated]
    return generated
