"""What a replica does with rows: check their tokens, run them in mixed batches, log and answer each.

    predictor = Predictor(LivePrompts(specs), cfg, logs)
    rows = predictor.prepare(parse_request(body, ...), deadline)    # 413 for a row over its token cap
    answers = predictor.run(rows)                                    # one dict or RequestError per row

`prepare` counts each row's tokens (the template included) against `serve.max_row_tokens`, capped
again by the model's context less the prompt, before a row is queued: a 24,000-character text gets
a 413 naming the limit instead of holding the batcher for a minute and growing the heap. Texts far
longer than any allowed row are refused before tokenizing (the tokenizer's memory is the cost).

`run` is one forward batch: rows of any prompts, one snapshot of the served versions. Rows whose
deadline has passed are answered 503 and never computed. Should the batch still fail (a row no check
foresaw), each row is retried alone, so only the row that fails gets the error. Every answer
carries its prediction id and the version that answered (and, where feedback is on, the signed
token `POST /v1/feedback` takes back); the prediction log gets each record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from softprompt.predict import Prediction, PromptTable, predict_rows
from softprompt.serve.config import ServeConfig
from softprompt.serve.live import LivePrompts, Served
from softprompt.serve.requests import RequestError
from softprompt.tasks import encode_input

log = logging.getLogger("softprompt.serve")

CHARS_PER_TOKEN_MAX = 16
"""No tokenizer we load averages more characters a token; texts longer than the cap times this are
refused unread."""


@dataclass(frozen=True)
class Row:
    """One checked row, ready to queue."""

    prompt: str
    text: str
    positions: int
    """Token positions it takes in a forward pass: its prompt's virtual tokens plus its input's."""
    deadline: float
    """`time.monotonic()` after which it is dropped unanswered (503)."""
    where: str = ""
    """Its place in the request (`inputs[3]`), for messages."""


class Predictor:
    """Rows to predictions over live prompts, with token caps, per-row failures and the prediction log."""

    def __init__(self, live: LivePrompts, cfg: ServeConfig, logs: dict[str, Any] | None = None,
                 on_batch: Callable[[int, int], None] | None = None, feedback_secret: bytes | None = None) -> None:
        """`logs` maps a task name to its `PredictionLog` (none: ids are made, nothing is written);
        `on_batch(rows, positions)` is told each forward batch (metrics); with `feedback_secret`,
        each answer carries its signed feedback `token` (`softprompt.feedback.sign`)."""
        self.live, self.cfg, self.logs, self.on_batch = live, cfg, logs or {}, on_batch
        self.feedback_secret = feedback_secret
        self.context = int(getattr(live.table.loaded.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.counts = {"requests": 0, "rows": 0, "batches": 0, "dropped": 0}

    @property
    def model_name(self) -> str:
        """The base model's name, as the prediction log records it."""
        return str(self.live.table.loaded.identity.get("name"))

    def row_limit(self, name: str) -> int:
        """Most input tokens a row of prompt `name` may have."""
        prompt = self.live.served[name].prompt
        return max(1, min(self.cfg.max_row_tokens, self.context - int(prompt.embeds.shape[0]) - _new_tokens(prompt)))

    def prepare(self, rows: Sequence[tuple[str, str]], deadline: float) -> list[Row]:
        """Check every row's token count; raises RequestError 413 naming the first row over its cap."""
        tok = self.live.table.loaded.tokenizer
        served = self.live.served
        out = []
        for i, (name, text) in enumerate(rows):
            where = f"inputs[{i}].text" if len(rows) > 1 else "text"
            limit = self.row_limit(name)
            if len(text) > limit * CHARS_PER_TOKEN_MAX:
                raise _too_long(where, f"{len(text)} characters", limit)
            prompt = served[name].prompt
            n = len(encode_input(tok, prompt.cfg.task.template, text))
            if n > limit:
                raise _too_long(where, f"{n} tokens", limit)
            out.append(Row(name, text, int(prompt.embeds.shape[0]) + n, deadline, where))
        return out

    def batch_size(self, rows: Sequence[Row]) -> int:
        """A batch's size against `serve.max_batch`: its rows, or its padded token positions scaled so
        that `serve.max_batch_tokens` counts as `serve.max_batch` — whichever is larger."""
        if not rows:
            return 0
        positions = len(rows) * max(r.positions for r in rows)
        return max(len(rows), -(-positions * self.cfg.max_batch // self.cfg.max_batch_tokens))

    def run(self, rows: Sequence[Row]) -> list[dict[str, Any] | RequestError]:
        """Predict one batch; one answer per row, in order: a prediction dict or the row's error."""
        table, served = self.live.snapshot()
        now = time.monotonic()
        live = [i for i, r in enumerate(rows) if r.deadline > now]
        out: list[dict[str, Any] | RequestError] = [_expired(r) for r in rows]
        self.counts["dropped"] += len(rows) - len(live)
        if not live:
            return out
        batch = [rows[i] for i in live]
        preds = self._predict(table, batch)
        self.counts["rows"] += len(batch)
        self.counts["batches"] += 1
        if self.on_batch is not None:
            self.on_batch(len(batch), len(batch) * max(r.positions for r in batch))
        for i, pred in zip(live, preds, strict=True):
            out[i] = pred if isinstance(pred, RequestError) else self._answer(pred, served[pred.prompt])
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush the prediction logs (bounded by `timeout_s` each)."""
        for plog in self.logs.values():
            plog.close(timeout_s=timeout_s)

    def _predict(self, table: PromptTable, batch: list[Row]) -> list[Prediction | RequestError]:
        pairs = [(r.prompt, r.text) for r in batch]
        try:
            return list(predict_rows(table, pairs, batch_size=len(pairs)))
        except Exception:  # one bad row must not fail the others: retry each alone
            log.exception("a batch of %d rows failed; retrying each row alone", len(pairs))
        out: list[Prediction | RequestError] = []
        for r, pair in zip(batch, pairs, strict=True):
            try:
                out.append(predict_rows(table, [pair], batch_size=1)[0])
            except Exception as exc:  # answered as this row's 500, logged with its traceback
                log.exception("row %s of prompt %r failed", r.where or "text", r.prompt)
                out.append(RequestError(f"{r.where or 'text'}: the model failed on this row ({type(exc).__name__}); "
                                        "other rows were answered; report it with the text", r.where or "text", HTTPStatus.INTERNAL_SERVER_ERROR))
        return out

    def _answer(self, pred: Prediction, served: Served) -> dict[str, Any]:
        version = served.version or "local"
        plog = self.logs.get(served.prompt.cfg.task.name)
        if plog is not None:
            pid = plog.record(prompt_version=version, text=pred.text, label=pred.output,
                              scores=pred.scores, model=self.model_name)
        else:
            from softprompt.predlog import new_id

            pid = new_id()
        answer = {"id": pid, "version": served.version, **pred.to_dict()}
        if self.feedback_secret is not None:
            from softprompt.feedback import sign

            answer["token"] = sign(self.feedback_secret, pid, version, pred.text)
        return answer


def _too_long(where: str, size: str, limit: int) -> RequestError:
    return RequestError(f"{where} is {size}; at most {limit} tokens per row (serve.max_row_tokens, capped by the model's context): "
                        "shorten or split the text", where, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def _expired(row: Row) -> RequestError:
    return RequestError("the request passed its deadline (serve.request_timeout_s) while queued; the server is busy, retry later",
                        None, HTTPStatus.SERVICE_UNAVAILABLE, retry_after_s=1)


def _new_tokens(prompt: Any) -> int:
    return int(prompt.cfg.task.max_new_tokens) if prompt.cfg.task.kind == "generation" else 0
