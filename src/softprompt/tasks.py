"""Tasks: how an example becomes tokens, and how label words become scoreable token sequences.

A classification example is `template(text)` followed by one of the label words; its score for a
label is the log-probability of that label's words as a continuation (summed over the word's tokens,
log-sum-exp over a label's several words). Training and evaluation use the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softprompt.config import TaskConfig
from softprompt.errors import ConfigError

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
"""Inputs without content used by contextual calibration (Zhao et al. 2021)."""


def render(template: str, text: str) -> str:
    """Put `text` into `template` (plain replacement, so braces in the text are safe)."""
    return template.replace("{text}", text)


def encode_input(tokenizer: Any, template: str, text: str) -> list[int]:
    """Token ids of the rendered template, with the tokenizer's own special tokens (BOS if it uses one)."""
    ids: list[int] = tokenizer(render(template, text), add_special_tokens=True)["input_ids"]
    return ids


def encode_target(tokenizer: Any, target: str) -> list[int]:
    """Token ids of a generation target, followed by EOS so the model learns to stop."""
    ids: list[int] = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, int(tokenizer.eos_token_id)]
    return ids


@dataclass(frozen=True)
class Verbalizer:
    """Label words as token ids: `words[label_index][word_index]` is a token-id sequence."""

    labels: tuple[str, ...]
    words: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def single_token(self) -> bool:
        """Every label word is one token, so one position scores every label."""
        return all(len(w) == 1 for ws in self.words for w in ws)

    @property
    def candidates(self) -> list[tuple[int, tuple[int, ...]]]:
        """Flat list of (label index, word token ids) pairs."""
        return [(i, w) for i, ws in enumerate(self.words) for w in ws]

    def first_words(self) -> list[tuple[int, ...]]:
        """The first word of every label (used to write few-shot demonstrations)."""
        return [ws[0] for ws in self.words]


def build_verbalizer(task: TaskConfig, tokenizer: Any) -> Verbalizer:
    """Tokenize the label words of a classification task.

    Raises:
        ConfigError: when a label word encodes to no tokens, or two labels share an identical word
            (their scores could never differ).
    """
    problems: list[str] = []
    words: list[tuple[tuple[int, ...], ...]] = []
    seen: dict[tuple[int, ...], str] = {}
    for label in task.labels:
        ids_for_label = []
        for word in task.verbalizer.get(label, []):
            ids = tuple(tokenizer(word, add_special_tokens=False)["input_ids"])
            if not ids:
                problems.append(f"task.verbalizer.{label}: label word {word!r} encodes to no tokens")
                continue
            if ids in seen and seen[ids] != label:
                problems.append(
                    f"task.verbalizer: labels {seen[ids]!r} and {label!r} share the label word {word!r}; "
                    "give each label its own words"
                )
            seen[ids] = label
            ids_for_label.append(ids)
        words.append(tuple(ids_for_label))
    if problems:
        raise ConfigError(problems)
    return Verbalizer(labels=tuple(task.labels), words=tuple(words))
