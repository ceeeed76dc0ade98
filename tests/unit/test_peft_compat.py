"""A trained adapter is PEFT's own: `PeftModel.from_pretrained` loads it and scores like our engine.

PEFT's forward prepends the prompt to `input_ids` itself (and drops `position_ids`); one row at a
time with no padding its positions are ours, so the label log-probabilities must agree.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from softprompt import prompts, train
from softprompt.config import config_from_dict
from softprompt.dataset import Split
from softprompt.engine import Prefix, label_scores
from softprompt.modeling import LoadedModel
from softprompt.tasks import build_verbalizer, encode_input

TASK = {
    "name": "compat",
    "template": "Customer message: {text}\nThe message is about",
    "labels": ["refund", "delivery", "other"],
    # " refund" and " delivery" are single tokens for the tiny tokenizer; " positive" is not.
    "verbalizer": {"refund": [" refund", " billing"], "delivery": [" delivery"], "other": [" positive"]},
}
TEXTS = ["I want my money back.", "Where is my package?", "The app keeps crashing on start.", "ok"]


def _peft_label_scores(peft_model: object, ids: list[int], words: tuple[tuple[tuple[int, ...], ...], ...]) -> torch.Tensor:
    """Summed log-probability of each label word, from PEFT's forward on `input_ids` (one row)."""
    out = []
    for ws in words:
        per_word = []
        for w in ws:
            row = torch.as_tensor([ids + list(w)])
            with torch.no_grad():
                logits = peft_model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0]  # type: ignore[operator]
            n = logits.shape[0] - row.shape[1]  # PEFT returns logits at the virtual tokens too
            logp = F.log_softmax(logits[n:].float(), -1)
            per_word.append(sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(w)))
        out.append(torch.logsumexp(torch.stack(per_word), 0))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_adapter_reloads_with_peft_and_gives_the_same_scores(tiny_ctx: LoadedModel, tmp_path: Path, method: str) -> None:
    from peft import PeftModel

    fresh_base = copy.deepcopy(tiny_ctx.model)  # before training wraps the model in PEFT
    tok = tiny_ctx.tokenizer
    cfg = config_from_dict(
        {
            "task": TASK,
            "data": {"train": "unused.csv"},
            "prompt": {"method": method, "num_virtual_tokens": 5, "init": "label_words", "encoder_hidden_size": 32},
            "train": {"steps": 3, "warmup_steps": 1, "batch_size": 4, "eval_every": 0, "lr": 0.1},
        }
    )
    seqs = [encode_input(tok, TASK["template"], t) for t in TEXTS]
    data = Split(input_ids=seqs, label_ids=[0, 1, 2, 0], texts=TEXTS, labels=["refund", "delivery", "other", "refund"])
    adapter_dir = train.run(cfg, tiny_ctx, data, None, tmp_path).adapter_dir

    peft_model = PeftModel.from_pretrained(fresh_base, str(adapter_dir))
    peft_model.eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    embeds = prompts.load_prompt_embeddings(adapter_dir)
    vb = build_verbalizer(cfg.task, tok)
    assert not vb.single_token
    for ids in seqs:
        with torch.no_grad():
            ours = label_scores(tiny_ctx.model, Prefix(embeds=embeds), [ids], vb, tok.pad_token_id)[0]
        theirs = _peft_label_scores(peft_model, ids, vb.words)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # Not a vacuous match: the prompt moves the scores away from the bare model's.
    with torch.no_grad():
        bare = label_scores(tiny_ctx.model, Prefix.none(), [seqs[0]], vb, tok.pad_token_id)[0]
    assert float((bare - _peft_label_scores(peft_model, seqs[0], vb.words)).abs().max()) > 1e-2
