"""Feedback on predictions: signed prediction tokens, validated feedback, an append-only store.

    token = sign(secret, prediction_id, prompt_version, text)     # returned with every prediction
    fb = FeedbackStore(store, task="support-intent", labels=[...], secret=secret)
    result = fb.submit([{"token": token, "text": text, "kind": "correction", "label": "refund"}])
    result.accepted, result.rejects                                  # nothing accepted is ever lost
    labels = effective(fb.read())                                    # prediction id -> the record that counts

A prediction token carries the prediction id, the prompt version and a hash of the input, signed
with the server's secret (HMAC-SHA256), so feedback is accepted even when the prediction log
dropped that row, and a forged or altered token, or a text that is not the one predicted, is
refused. Kinds: `correction` names the right label; `up` confirms the predicted label (send it as
`label`); `down` says the prediction was wrong without saying what is right: the row stays out of
training and goes first in the review queue.

Records are appended, never rewritten (`<task>/_feedback/date=YYYY-MM-DD/<first id>.jsonl` in the
registry's store, beside the prediction log), each with its own copy of the input (the log's
retention may delete it). The same feedback twice is rejected as a duplicate; a different label
for the same prediction is accepted and supersedes the earlier one (`supersedes`, `conflict`):
the latest wins, and the conflict stays on record. Deletion by id or by subject (an erasure
request) is the only rewrite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from softprompt.errors import SoftpromptError
from softprompt.predlog import drop_records, id_time, new_id
from softprompt.registry.store import ArtifactStore

PREFIX = "_feedback"
KINDS = ("correction", "up", "down")
_TOKEN_VERSION = "v1"
MAX_TEXT_CHARS = 20_000


class FeedbackError(SoftpromptError):
    """A prediction token that is forged, altered or unreadable."""


@dataclass(frozen=True)
class Claims:
    """What a valid prediction token says."""

    prediction_id: str
    prompt_version: str
    input_sha256: str


def input_sha256(text: str) -> str:
    """The hash a token binds its input by (UTF-8, surrogates escaped)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sign(secret: bytes, prediction_id: str, prompt_version: str, text: str) -> str:
    """A prediction token: `v1.<claims>.<signature>`, both parts base64url."""
    body = json.dumps({"p": prediction_id, "v": prompt_version, "h": input_sha256(text)}, separators=(",", ":")).encode()
    claims = _b64(body)
    sig = _b64(hmac.new(secret, f"{_TOKEN_VERSION}.{claims}".encode(), hashlib.sha256).digest())
    return f"{_TOKEN_VERSION}.{claims}.{sig}"


def verify(secret: bytes, token: str) -> Claims:
    """The claims of a token this server signed.

    Raises:
        FeedbackError: the token is malformed, of another version, or its signature does not match.
    """
    parts = str(token).split(".")
    if len(parts) != 3 or parts[0] != _TOKEN_VERSION:
        raise FeedbackError("token is not a prediction token (expected v1.<claims>.<signature>, as /v1/predict returns it)")
    expected = _b64(hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, parts[2]):
        raise FeedbackError("token signature does not match: it was altered, or another server (secret) signed it")
    try:
        body = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return Claims(str(body["p"]), str(body["v"]), str(body["h"]))
    except (ValueError, KeyError, TypeError) as exc:  # signed but unreadable: only a signing bug gets here
        raise FeedbackError(f"token claims are unreadable: {exc}") from exc


@dataclass
class SubmitResult:
    """What `FeedbackStore.submit` took and refused."""

    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    """One per refused item: `row` (1-based), `field`, `value`, `reason` (with the fix)."""


class FeedbackStore:
    """A task's feedback in the registry's store: validated, appended, read back."""

    def __init__(self, store: ArtifactStore, *, task: str, labels: Sequence[str], secret: bytes) -> None:
        self.store, self.task, self.labels, self.secret = store, task, list(labels), secret

    def submit(self, items: Iterable[Mapping[str, Any]], *, client: str = "") -> SubmitResult:
        """Validate and append feedback items (one object per call).

        Each item: `token` (from the prediction), `text` (the input predicted), `kind`
        (`correction`, `up` or `down`), `label` (required but for `down`), optional `subject` (a key
        to delete a person's records by) and `note`.
        """
        result = SubmitResult()
        latest = {r["prediction_id"]: r for r in self.read()}
        for row, item in enumerate(items, 1):
            rec, reject = self._validate(row, item, client)
            if reject is not None:
                result.rejects.append(reject)
                continue
            assert rec is not None
            before = latest.get(rec["prediction_id"])
            if before is not None and (before["kind"], before["label"]) == (rec["kind"], rec["label"]):
                result.rejects.append(_reject(row, "token", item.get("token"), f"duplicate of feedback {before['id']} (same kind and label)"))
                continue
            if before is not None:
                rec["supersedes"], rec["conflict"] = before["id"], before["label"] != rec["label"]
            latest[rec["prediction_id"]] = rec
            result.accepted.append(rec)
        if result.accepted:
            when = id_time(result.accepted[0]["id"])
            key = f"{self.task}/{PREFIX}/date={when:%Y-%m-%d}/{result.accepted[0]['id']}.jsonl"
            self.store.put_bytes(key, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.accepted).encode(), if_none_match=True)
        return result

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first."""
        records = []
        for key in self.store.list(f"{self.task}/{PREFIX}/"):
            records += [json.loads(line) for line in self.store.get_bytes(key).decode().splitlines() if line.strip()]
        return sorted(records, key=lambda r: r["id"])

    def delete(self, *, ids: Sequence[str] = (), subject: str | None = None) -> int:
        """Remove records by feedback id or by subject; returns how many went."""
        wanted = set(ids)
        return drop_records(self.store, f"{self.task}/{PREFIX}/", lambda rec: _matches(rec, wanted, subject))

    def _validate(self, row: int, item: Mapping[str, Any], client: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if not isinstance(item, Mapping):
            return None, _reject(row, "", item, "each feedback item must be an object with token, text, kind and label")
        try:
            claims = verify(self.secret, str(item.get("token", "")))
        except FeedbackError as exc:
            return None, _reject(row, "token", item.get("token"), str(exc))
        text = item.get("text")
        if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            return None, _reject(row, "text", text, f"send the input that was predicted, as a string of at most {MAX_TEXT_CHARS} characters")
        if input_sha256(text) != claims.input_sha256:
            return None, _reject(row, "text", text, "this is not the text the token's prediction was made for; send that text unchanged")
        kind = item.get("kind")
        if kind not in KINDS:
            return None, _reject(row, "kind", kind, f"use one of {', '.join(KINDS)}")
        label = item.get("label")
        if kind == "down":
            label = None
        elif label not in self.labels:
            return None, _reject(row, "label", label, f"use one of the task's labels: {', '.join(self.labels)}")
        subject = item.get("subject")
        if subject is not None and not isinstance(subject, str):
            return None, _reject(row, "subject", subject, "subject must be a string (a key to delete a person's records by)")
        fid = new_id()
        return {
            "id": fid, "time": id_time(fid).isoformat(timespec="milliseconds"), "task": self.task,
            "prediction_id": claims.prediction_id, "prompt_version": claims.prompt_version, "input": text,
            "input_sha256": claims.input_sha256, "kind": kind, "label": label, "subject": subject,
            "note": str(item.get("note") or "")[:1000], "client": client,
        }, None


def effective(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Prediction id -> the record that counts: the latest one (records come oldest first)."""
    out: dict[str, Mapping[str, Any]] = {}
    for rec in sorted(records, key=lambda r: r["id"]):
        out[rec["prediction_id"]] = rec
    return out


def _matches(rec: Mapping[str, Any], ids: set[str], subject: str | None) -> bool:
    return rec["id"] in ids or (subject is not None and rec.get("subject") == subject)


def _reject(row: int, name: str, value: Any, reason: str) -> dict[str, Any]:
    shown = value if isinstance(value, (str, int, float, type(None))) else repr(value)
    if isinstance(shown, str) and len(shown) > 200:
        shown = shown[:200] + "..."
    return {"row": row, "field": name, "value": shown, "reason": reason}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
