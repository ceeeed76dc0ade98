"""`POST /v1/feedback`: people's corrections of served predictions, checked and stored (no Ray here).

    {"prompt": NAME, "token": ..., "text": ..., "kind": "correction", "label": "refund"}
    or {"feedback": [{...}, ...]}

Every prediction a server answers carries a `token` (`softprompt.feedback.sign`: its id, prompt
version and input hash, signed with the server's feedback secret); feedback sends it back with the
text that was predicted. `FeedbackDesk.submit` checks the body and each item (`softprompt.feedback`
validates token, text, kind, label), appends what it accepts to the task's feedback store in the
registry (beside the prediction log) and answers per item: `accepted` (row, id, whether it
superseded a conflicting label) and `rejects` (row, field, value, reason). A body where every item
is refused is a 400; a client over `serve.feedback_per_minute` gets a 429 with Retry-After, so one
client cannot flood the store (poisoning); the limit counts per client address and replica.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from softprompt.feedback import FeedbackStore
from softprompt.registry.store import ArtifactStore
from softprompt.serve.requests import RequestError, load_object

FEEDBACK_SECRET_ENV = "SOFTPROMPT_FEEDBACK_SECRET"
"""The environment variable holding the secret prediction tokens are signed with (without it a
server makes one at start: tokens then stop verifying when it restarts)."""
EXAMPLE = '{"prompt": "NAME", "token": "...", "text": "...", "kind": "correction|up|down", "label": "..."} or {"feedback": [...]}'


class RateLimit:
    """A token bucket per client: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = per_minute / 60.0, clock
        self.burst = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """0 when `client` may go now (and takes a token), else the seconds until it may."""
        with self._lock:
            now = self.clock()
            tokens, when = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                if len(self._buckets) > 100_000:  # forget full buckets: they hold nothing
                    self._buckets = {c: b for c, b in self._buckets.items() if b[0] + (now - b[1]) * self.rate < self.burst}
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate


class FeedbackDesk:
    """Feedback for the prompts a replica serves: per-task stores, the rate limit, the answers."""

    def __init__(self, store: ArtifactStore, prompts: Callable[[], Mapping[str, tuple[str, list[str]]]], secret: bytes,
                 *, per_minute: int, max_items: int) -> None:
        """`prompts()` maps each served prompt's name to its task and labels (read at every request,
        so refreshed versions are seen)."""
        self.store, self.prompts, self.secret, self.max_items = store, prompts, secret, max_items
        self.limit = RateLimit(per_minute)
        self._stores: dict[str, FeedbackStore] = {}
        self._lock = threading.Lock()  # one submit at a time: duplicates are checked against what is stored

    def submit(self, body: bytes, client: str) -> dict[str, Any]:
        """Check and store one request's feedback; the answer body, or a RequestError (400, 429)."""
        wait = self.limit.wait_s(client)
        if wait > 0:
            raise RequestError(f"too much feedback from {client} (serve.feedback_per_minute {self.limit.burst:g}); retry in {wait:.0f}s",
                               None, HTTPStatus.TOO_MANY_REQUESTS, retry_after_s=max(1, round(wait)))
        data = load_object(body, EXAMPLE)
        items = data.get("feedback", [data]) if "feedback" in data else [data]
        if "feedback" in data and (set(data) - {"feedback"} or not isinstance(items, list) or not items):
            raise RequestError(f"'feedback' must be the only field, a non-empty list of objects; send {EXAMPLE}", "feedback")
        if len(items) > self.max_items:
            raise RequestError(f"'feedback' has {len(items)} items; at most {self.max_items} per request (serve.max_request_rows): split it", "feedback")
        served = self.prompts()
        by_prompt: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
        rejects: list[dict[str, Any]] = []
        for row, item in enumerate(items, 1):
            name = item.get("prompt") if isinstance(item, Mapping) else None
            if name is None and len(served) == 1:
                name = next(iter(served))
            if not isinstance(name, str) or name not in served:
                rejects.append({"row": row, "field": "prompt", "value": name if isinstance(name, str) else None,
                                "reason": f"name the prompt that predicted it; served prompts: {sorted(served)}"})
                continue
            by_prompt.setdefault(name, []).append((row, item))
        accepted: list[dict[str, Any]] = []
        with self._lock:
            for name, rows in by_prompt.items():
                result = self._store(*served[name]).submit([item for _, item in rows], client=client)
                numbered = {i: row for i, (row, _) in enumerate(rows, 1)}
                for reject in result.rejects:
                    rejects.append({**reject, "row": numbered[reject["row"]]})
                kept = iter(result.accepted)
                refused = {r["row"] for r in result.rejects}
                for i, row in numbered.items():
                    if i not in refused:
                        rec = next(kept)
                        accepted.append({"row": row, "id": rec["id"], "prediction_id": rec["prediction_id"], "conflict": bool(rec.get("conflict"))})
        answer = {"accepted": sorted(accepted, key=lambda a: a["row"]), "rejects": sorted(rejects, key=lambda r: r["row"])}
        if not accepted:
            first = answer["rejects"][0]
            raise FeedbackRefused(f"no feedback accepted; item {first['row']}: {first['field']}: {first['reason']}", answer)
        return answer

    def _store(self, task: str, labels: list[str]) -> FeedbackStore:
        if task not in self._stores:
            self._stores[task] = FeedbackStore(self.store, task=task, labels=labels, secret=self.secret)
        return self._stores[task]


class FeedbackRefused(RequestError):
    """Every item of a feedback request was refused: a 400 whose body lists each reject."""

    def __init__(self, message: str, answer: dict[str, Any]) -> None:
        super().__init__(message, "feedback")
        self.answer = answer

    def body(self) -> dict[str, Any]:
        """The error, and every item's reject."""
        return {**super().body(), **self.answer}
