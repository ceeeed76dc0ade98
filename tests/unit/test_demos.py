"""Few-shot demonstration strategies: random, balanced, similar (the frozen model's embeddings) and diverse (k-centers)."""

from __future__ import annotations

import numpy as np
import pytest

from softprompt import demos
from softprompt.dataset import Split
from softprompt.errors import ConfigError
from softprompt.modeling import LoadedModel
from softprompt.tasks import encode_input


def _split(n: int = 30, labels: int = 3) -> Split:
    return Split(input_ids=[[1 + i % 7] * (2 + i % 5) for i in range(n)], label_ids=[i % labels for i in range(n)])


def test_fixed_strategies_and_their_refusals() -> None:
    train = _split()
    rnd = demos.fixed_demonstrations("random", train, num_labels=3, k=5, seed=1)
    assert len(set(rnd)) == 5 and rnd == demos.fixed_demonstrations("random", train, num_labels=3, k=5, seed=1)
    assert rnd != demos.fixed_demonstrations("random", train, num_labels=3, k=5, seed=2)
    bal = demos.fixed_demonstrations("balanced", train, num_labels=3, k=3, seed=0)
    assert sorted(train.label_ids[i] for i in bal) == [0, 1, 2]
    with pytest.raises(ConfigError, match="`diverse` few-shot strategy needs the training rows' embeddings"):
        demos.fixed_demonstrations("diverse", train, num_labels=3, k=3, seed=0)
    with pytest.raises(ConfigError, match="`similar` picks demonstrations per input"):
        demos.fixed_demonstrations("similar", train, num_labels=3, k=3, seed=0)
    with pytest.raises(ConfigError, match="'nearest' is not one of random, balanced, similar, diverse"):
        demos.fixed_demonstrations("nearest", train, num_labels=3, k=3, seed=0)


def test_k_centers_covers_every_cluster_once() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    points = np.concatenate([c + rng.normal(0, 0.3, (20, 2)) for c in centers])
    chosen = demos.k_centers(points, 4)
    assert sorted(i // 20 for i in chosen) == [0, 1, 2, 3]
    assert demos.k_centers(points, 4) == chosen  # deterministic


def test_similar_picks_the_nearest_rows_nearest_last() -> None:
    train = np.eye(4, dtype=np.float32)
    query = np.array([[0.9, 0.1, 0.4, 0.0], [0.0, 0.0, 0.2, 1.0]], dtype=np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    assert demos.similar_demonstrations(train, query, 2) == [[2, 0], [2, 3]]


def test_sentence_embeddings_are_unit_length_and_padding_free(demo_cfg: object, tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    texts = ["my parcel is late", "refund please", "the app crashes when I log in every single morning"]
    seqs = [encode_input(tok, "{text}", t) for t in texts]
    together = demos.sentence_embeddings(tiny.model, seqs, tok.pad_token_id, batch_size=8)
    alone = np.concatenate([demos.sentence_embeddings(tiny.model, [s], tok.pad_token_id) for s in seqs])
    assert together.shape == (3, tiny.model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-4)  # padding in a batch changes nothing


def test_demonstration_ids_and_cost_per_row() -> None:
    train = Split(input_ids=[[5, 6], [7]], label_ids=[1, 0])
    assert demos.demonstration_ids(train, [1, 0], [[50], [51, 52]], [9]) == [7, 50, 9, 5, 6, 51, 52, 9]
    assert demos.cost_tokens(30, [10, 20]) == 30.0  # the shared prefix is computed once
    assert demos.cost_tokens(30, [10, 20], per_input_prefix=[30, 30]) == 45.0
