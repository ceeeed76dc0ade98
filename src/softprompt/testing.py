"""A tiny random Llama and a small byte-level BPE tokenizer, built in-process for tests and smoke runs.

Nothing is downloaded: the tokenizer is trained on the texts given, and the model's weights are random.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

DEFAULT_TEXTS = [
    "Review: a gripping , funny film\nSentiment: positive",
    "Review: dull and far too long\nSentiment: negative",
    "Question: What is the capital of France ?\nType: location",
    "My card was charged twice for the same order, please fix the billing.",
    "Where is my package? The delivery is late and tracking shows nothing.",
    "I want to cancel my subscription and get a refund.",
    "The app crashes when I open settings, a technical problem.",
    "I cannot log in to my account after the password reset.",
    "Does this product come in a larger size?",
]


def build_tiny_model(
    path: str | Path,
    texts: Iterable[str] = (),
    *,
    vocab_size: int = 600,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama and a trained byte-level BPE tokenizer to `path`.

    Args:
        path: Output folder (created); loadable with `AutoModelForCausalLM.from_pretrained`.
        texts: Extra texts to train the tokenizer on (label words and templates belong here).
        vocab_size: Tokenizer vocabulary size (the model's embedding matrix matches it).
        hidden_size: Model width.
        num_layers: Transformer layers.
        seed: Seed for the random weights.

    Returns:
        The folder.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(DEFAULT_TEXTS) + list(texts)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="right"
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # Real checkpoints have embedding rows of norm ~1-4; keep the tiny model in that regime so
    # initialization code sees realistic scales.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.1)  # type: ignore[operator]
    model.save_pretrained(out)
    return out
