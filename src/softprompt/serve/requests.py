"""What a client may send `/v1/predict`: the body's shape, each row's text, and the answers to bad ones.

    {"prompt": NAME, "text": ...}   or   {"inputs": [{"prompt": NAME, "text": ...}, ...]}

Everything a client controls is checked here before a row reaches the model, and each problem is a
`RequestError` with the HTTP status and the field: a JSON body nested too deep or holding a huge
integer is a 400 (Python's parser raises RecursionError or ValueError for those, not
JSONDecodeError), a text with a lone surrogate (valid JSON, `"\\ud800"`, but no UTF-8 exists for it)
is a 400 naming the row, so it can never reach the tokenizer and fail a whole batch of other
clients' rows. Token limits need the tokenizer, so the replica checks them (`serve.predictor`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

ROUTES = "GET /healthz, GET /v1/prompts, POST /v1/predict, POST /v1/feedback"
EXAMPLE = '{"prompt": "NAME", "text": "..."} or {"inputs": [{"prompt": "NAME", "text": "..."}]}'


class RequestError(Exception):
    """A request the client must fix (or retry): answered with `status` and a message naming the field."""

    def __init__(self, message: str, field: str | None = None, status: int = HTTPStatus.BAD_REQUEST, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.status = int(status)
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The JSON error body: `{"error": message, "field": field}`."""
        return {"error": str(self), "field": self.field}


def parse_request(body: bytes, prompts: Sequence[str], max_rows: int) -> list[tuple[str, str]]:
    """`(prompt, text)` rows from a `/v1/predict` body, or a RequestError naming the bad field.

    A request without "prompt" uses the only loaded prompt; with several loaded, "prompt" is required.
    """
    data = load_object(body, EXAMPLE)
    if "inputs" not in data:
        return [_row(data, "", prompts)]
    items = data["inputs"]
    if set(data) - {"inputs"}:
        raise RequestError(f"give either 'inputs' or 'prompt' and 'text', not both (got fields {sorted(data)[:10]})", "inputs")
    if not isinstance(items, list) or not items:
        raise RequestError(f"'inputs' must be a non-empty list of objects (got {type(items).__name__} {_short(items)})", "inputs")
    if len(items) > max_rows:
        raise RequestError(f"'inputs' has {len(items)} rows; at most {max_rows} per request (--max-request-rows): split it", "inputs")
    return [_row(item, f"inputs[{i}].", prompts) for i, item in enumerate(items)]


def load_object(body: bytes, example: str) -> dict[str, Any]:
    """A request body's JSON object, or a RequestError (400) naming what is wrong and showing `example`."""
    if not body.strip():
        raise RequestError(f"the request body is empty; send JSON such as {example}", "body")
    try:
        data = json.loads(body)
    except RecursionError:  # the C parser gives up near 1000 levels, quickly, with nothing allocated
        raise RequestError(f"the body nests JSON too deep; send {example}", "body") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, integers over 4300 digits
        raise RequestError(f"the body is not JSON we accept ({str(exc)[:120]}); send {example}", "body") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body is a JSON {type(data).__name__}, not an object; send {example}", "body")
    return data


def parse_length(value: str | None, limit: int) -> int | None:
    """A Content-Length header as an integer (None when absent), or a RequestError (400, 413).

    Only ASCII digits count: `"²".isdigit()` is true in Python, and `int("²")` then raises.
    """
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise RequestError(f"Content-Length {value[:20]!r} is not a byte count; send the body's length in ASCII digits", "Content-Length")
    if int(value) > limit:
        raise RequestError(f"the body is {value} bytes; at most {limit} per request (serve.max_body_bytes): split it", "body", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return int(value)


def describe_prompt(name: str, task: str, kind: str, labels: list[str] | None, version: str | None, manifest: dict[str, Any],
                    num_virtual_tokens: int, ensemble_members: int, ref: str) -> dict[str, Any]:
    """One `/v1/prompts` entry. `artifact` is the reference as given when it names a registry entry
    (`s3://...`, `.../champion`); a local folder shows only its name, never this machine's paths."""
    return {
        "name": name, "task": task, "kind": kind, "labels": labels, "version": version,
        "metric": manifest.get("metric"), "num_virtual_tokens": num_virtual_tokens,
        "ensemble_members": ensemble_members, "artifact": public_ref(ref),
    }


def public_ref(ref: str) -> str:
    """What a client may see of an artifact reference: URIs as given, local paths as their last two parts."""
    if ref.startswith("s3://"):
        return ref
    parts = Path(ref[len("file://"):] if ref.startswith("file://") else ref).parts
    return "/".join(parts[-2:]) if parts[-1:] == ("champion",) else parts[-1] if parts else ""


# --------------------------------------------------------------------------------------------------


def _row(item: Any, where: str, prompts: Sequence[str]) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise RequestError(f"{where.rstrip('.') or 'the body'} must be an object with 'prompt' and 'text' (got {type(item).__name__})", where.rstrip(".") or "body")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        got = "it is missing" if "text" not in item else f"got {_short(text)}"
        raise RequestError(f"{where}text must be a non-empty string ({got}; fields: {sorted(map(str, item))[:10]})", f"{where}text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{where}text has a lone surrogate ({text[exc.start]!r} at character {exc.start}), which is not text: "
                           "send valid UTF-8 (escape pairs like \\ud83d\\ude00 are fine)", f"{where}text") from None
    name = item.get("prompt")
    if name is None and len(prompts) == 1:
        name = prompts[0]
    if not isinstance(name, str) or name not in prompts:
        got = "it is missing" if name is None else f"unknown prompt {_short(name)}"
        raise RequestError(f"{where}prompt: {got}; loaded prompts: {list(prompts)}", f"{where}prompt")
    return name, text


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"an integer of {len(str(abs(value)))} digits"
    return text[:60]
