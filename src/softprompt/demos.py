"""Few-shot demonstrations: which training rows go in front of an input, by four strategies.

    rows = fixed_demonstrations("diverse", train, num_labels=7, k=7, seed=0, embeddings=emb)
    per_input = similar_demonstrations(train_emb, input_emb, k=7)          # one list per input

- `random`: k training rows drawn uniformly (labels may be missing).
- `balanced`: every label at least once (k >= labels), shorter rows preferred among a label's
  candidates so the prefix stays small (`scoring.choose_demonstrations`).
- `similar`: for each input, the k training rows nearest to it by the frozen model's own
  embeddings (`sentence_embeddings`: the last hidden states averaged over the real tokens, unit
  length; cosine similarity), nearest last, so the most similar example sits next to the input.
  Per input, so it needs retrieval at prediction time: an evaluation option, never a published
  prefix (serving has no retrieval).
- `diverse`: k-centers over the training embeddings (greedy farthest point from the medoid): a fixed
  set that covers the examples' space instead of repeating its densest part.

The fixed strategies give one prefix shared by every input, whose key/value cache is computed once;
`similar` pays for its demonstrations on every row (`cost_tokens` counts both).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from softprompt.dataset import Split
from softprompt.engine import Prefix, input_hidden, make_batch
from softprompt.errors import ConfigError
from softprompt.scoring import choose_demonstrations

Strategy = Literal["random", "balanced", "similar", "diverse"]
STRATEGIES: tuple[Strategy, ...] = ("random", "balanced", "similar", "diverse")
FIXED: tuple[Strategy, ...] = ("random", "balanced", "diverse")
"""The strategies whose demonstrations are one set for every input (publishable in an artifact)."""


def fixed_demonstrations(
    strategy: str, train: Split, *, num_labels: int, k: int, seed: int, embeddings: np.ndarray | None = None
) -> list[int]:
    """Indices of `k` training rows for a fixed strategy (`random`, `balanced` or `diverse`).

    Args:
        strategy: The strategy's name.
        train: The training split the demonstrations come from.
        num_labels: How many labels the task has (`balanced` covers each).
        k: How many demonstrations.
        seed: The random seed (`random`, `balanced`'s order).
        embeddings: `sentence_embeddings` of `train`'s rows (`diverse` needs them).

    Raises:
        ConfigError: an unknown or per-input strategy, or `diverse` without embeddings.
    """
    k = min(k, len(train.input_ids))
    if strategy == "random":
        return random.Random(seed).sample(range(len(train.input_ids)), k)
    if strategy == "balanced":
        return choose_demonstrations(train, num_labels, k, seed)
    if strategy == "diverse":
        if embeddings is None:
            raise ConfigError("the `diverse` few-shot strategy needs the training rows' embeddings (sentence_embeddings)")
        return k_centers(embeddings, k)
    if strategy == "similar":
        raise ConfigError("`similar` picks demonstrations per input (similar_demonstrations); it has no fixed set to publish")
    raise ConfigError(f"few-shot strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")


def k_centers(embeddings: np.ndarray, k: int) -> list[int]:
    """Greedy k-centers: start from the medoid (the row nearest the mean), then repeatedly add the row
    farthest from every row chosen so far. Deterministic."""
    x = np.asarray(embeddings, dtype=np.float64)
    first = int(np.argmin(np.linalg.norm(x - x.mean(0), axis=1)))
    chosen = [first]
    dist = np.linalg.norm(x - x[first], axis=1)
    while len(chosen) < min(k, len(x)):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return chosen


def similar_demonstrations(train_embeddings: np.ndarray, input_embeddings: np.ndarray, k: int) -> list[list[int]]:
    """For each input, the `k` training rows with the highest cosine similarity, nearest last.

    Both arguments are unit-length rows (`sentence_embeddings`).
    """
    sims = np.asarray(input_embeddings) @ np.asarray(train_embeddings).T  # [inputs, train]
    k = min(k, sims.shape[1])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return [[int(j) for j in row[np.argsort(sims[i, row])]] for i, row in enumerate(top)]


def sentence_embeddings(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> np.ndarray:
    """The frozen model's embedding of each sequence: last hidden states averaged over its real
    tokens, scaled to unit length, `[N, d]` float32 (the model's own notion of similarity; no
    separate encoder to download)."""
    device = model.get_input_embeddings().weight.device
    out = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = make_batch([seqs[i] for i in idx], pad_id, device)
            h = input_hidden(model, Prefix.none(), batch).float()
            mask = batch.attention_mask.unsqueeze(-1).float()
            mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[idx] = torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()
    return out


def demonstration_ids(train: Split, indices: Sequence[int], label_word_ids: Sequence[Sequence[int]], separator: Sequence[int]) -> list[int]:
    """The demonstrations as token ids: each row's input ids, its label word's ids, then `separator`
    (a per-input prefix is built from these, with no re-tokenizing per input)."""
    ids: list[int] = []
    for i in indices:
        ids += [*train.input_ids[i], *label_word_ids[train.label_ids[i]], *separator]
    return ids


def cost_tokens(prefix_tokens: int, input_tokens: Sequence[int], *, per_input_prefix: Sequence[int] | None = None) -> float:
    """Mean token positions the model runs per scored row: a fixed prefix is computed once and
    shared (`prefix_tokens` spread over the rows), a per-input one is paid by every row."""
    n = max(1, len(input_tokens))
    if per_input_prefix is not None:
        return float(sum(input_tokens) + sum(per_input_prefix)) / n
    return float(sum(input_tokens) + prefix_tokens) / n
