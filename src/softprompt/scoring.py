"""Batched scoring of a whole split, few-shot prefixes and contextual calibration.

Inference sorts rows by length (less padding), runs batches under `torch.inference_mode`, and
returns scores in the split's original order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from softprompt.dataset import Split
from softprompt.engine import Prefix, cache_prefix, label_scores
from softprompt.tasks import CONTENT_FREE_INPUTS, Verbalizer, encode_input, render


def score_split(
    model: Any,
    prefix: Prefix,
    seqs: Sequence[Sequence[int]],
    verbalizer: Verbalizer,
    pad_id: int,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Label log-probabilities `[N, num_labels]` for every sequence, in input order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros((len(seqs), len(verbalizer.labels)), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            scores = label_scores(model, prefix, [seqs[i] for i in idx], verbalizer, pad_id)
            out[idx] = scores.double().cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))
    return out


def shared_prefix(model: Any, embeds: torch.Tensor | None) -> Prefix:
    """A prefix for inference: no prefix, or a shared one whose key/value cache is computed once."""
    if embeds is None or embeds.shape[0] == 0:
        return Prefix.none()
    return cache_prefix(model, embeds)


def to_probs(scores: np.ndarray) -> np.ndarray:
    """Label log-scores to probabilities normalized over the label set."""
    z = scores - scores.max(1, keepdims=True)
    e = np.exp(z)
    result: np.ndarray = e / e.sum(1, keepdims=True)
    return result


def calibration_offsets(
    model: Any, prefix: Prefix, tokenizer: Any, template: str, verbalizer: Verbalizer
) -> np.ndarray:
    """Contextual calibration: mean log label-probabilities on content-free inputs (subtract them)."""
    seqs = [encode_input(tokenizer, template, t) for t in CONTENT_FREE_INPUTS]
    probs = to_probs(score_split(model, prefix, seqs, verbalizer, tokenizer.pad_token_id))
    result: np.ndarray = np.log(probs.mean(0) + 1e-12)
    return result


def choose_demonstrations(train: Split, num_labels: int, k: int, seed: int) -> list[int]:
    """Indices of `k` training rows covering every label at least once (when k >= labels).

    Shorter rows are preferred among each label's candidates so the few-shot prefix stays small.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(train.label_ids):
        by_label.setdefault(y, []).append(i)
    pools = []
    for label in range(num_labels):
        cands = by_label.get(label, [])
        rng.shuffle(cands)
        # from a random sample of 20, take the shorter ones first: typical, but cheap to prefix
        pools.append(sorted(cands[:20], key=lambda i: len(train.input_ids[i])))
    chosen: list[int] = []
    while len(chosen) < k and any(pools):
        for pool in pools:
            if pool and len(chosen) < k:
                chosen.append(pool.pop(0))
    rng.shuffle(chosen)
    return chosen


def few_shot_text(train: Split, indices: Sequence[int], template: str, label_words: Sequence[str]) -> str:
    """The demonstrations as text: each rendered template followed by its label word."""
    parts = [render(template, train.texts[i]) + label_words[train.label_ids[i]] for i in indices]
    return "\n\n".join(parts) + "\n\n"


def text_embeds(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    """Token embeddings of `text` (a hard prompt used like a soft one), `[n, d]`."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    emb = model.get_input_embeddings()
    with torch.no_grad():
        result: torch.Tensor = emb(torch.as_tensor(ids, device=emb.weight.device))
    return result
