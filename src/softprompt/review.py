"""The review queue: which logged predictions are most worth a person's time, and Label Studio's formats.

    queue = build_queue(read_records(store, task), fb.read(), budget=50, audit_share=0.2, seed=0)
    tasks = to_label_studio(queue)                       # import into a Label Studio project
    items = from_label_studio(export)                    # its JSON export -> feedback items to submit

A queue of `budget` predictions: first those a person marked `down` (wrong, right label unknown),
then the most uncertain (smallest margin between the top two label probabilities; predictions of
one input by different prompt versions that disagree count as margin 0), spread over slices (the
predicted label, or a metadata field) in turns so no label crowds out the others, skipping
near-duplicate texts. An audit share of the budget (default 20%) is drawn uniformly at random from
everything eligible: only audit rows may join an eval set, which a queue of hard rows would bias.

Predictions that already have feedback are not queued again (unless marked `down`), nor are those
logged without their input (`serve.log_inputs: false`): there is nothing for a person to read.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from softprompt.errors import DataError
from softprompt.feedback import effective, input_sha256, sign

LABEL_CONTROL = "label"
"""The name of the Choices control in the Label Studio labeling config (`label_config`)."""
_WORD = re.compile(r"\w+")


def build_queue(predictions: Iterable[Mapping[str, Any]], feedback: Iterable[Mapping[str, Any]], *, budget: int,
                audit_share: float = 0.2, seed: int = 0, slice_key: str | None = None, near_duplicate: float = 0.9,
                secret: bytes | None = None) -> list[dict[str, Any]]:
    """Up to `budget` queue rows (see the module docstring), each with `prediction_id`, `text`, `label`
    (predicted), `scores`, `margin`, `slice`, `reason` (`down`, `disagreement`, `uncertain` or
    `audit`), `audit` and, with `secret`, the feedback `token` that a person's answer is sent with."""
    if budget < 1 or not 0 <= audit_share <= 1:
        raise DataError(f"review queue budget={budget}, audit_share={audit_share}: use a budget of 1 or more and a share in [0, 1]")
    verdicts = effective(feedback)
    rows = [_row(rec, slice_key) for rec in predictions if rec.get("input")]
    labels_of_input: dict[str, set[str | None]] = {}  # what each logged input was predicted as, by every version
    for r in rows:
        labels_of_input.setdefault(r["input_sha256"], set()).add(r["label"])
    eligible = []
    for r in rows:
        verdict = verdicts.get(r["prediction_id"])
        if verdict is not None and verdict.get("kind") != "down":
            continue
        r["reason"] = "down" if verdict is not None else "disagreement" if len(labels_of_input[r["input_sha256"]]) > 1 else "uncertain"
        if r["reason"] == "disagreement":
            r["margin"] = 0.0
        eligible.append(r)
    n_audit = round(budget * audit_share)
    rng = random.Random(seed)
    picked: list[dict[str, Any]] = []
    seen: list[set[str]] = []
    for r in rng.sample(eligible, len(eligible)):  # uniform: a random order, the first non-duplicates
        if len(picked) >= n_audit:
            break
        if _fresh(r, seen, near_duplicate):
            picked.append({**r, "reason": "audit", "audit": True})
    ranked = sorted((r for r in eligible if r["reason"] == "down"), key=lambda r: r["prediction_id"])
    ranked += _in_turns(sorted((r for r in eligible if r["reason"] != "down"), key=lambda r: (r["margin"], r["prediction_id"])))
    for r in ranked:
        if len(picked) >= budget:
            break
        if _fresh(r, seen, near_duplicate):
            picked.append({**r, "audit": False})
    out = []
    for r in picked:
        row = {k: v for k, v in r.items() if k != "words"}
        if secret is not None:
            row["token"] = sign(secret, row["prediction_id"], row["prompt_version"], row["text"])
        out.append(row)
    return out


def to_label_studio(queue: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Label Studio tasks (its JSON import): the text and what a feedback answer needs in `data`, the
    model's label as a pre-annotation (`predictions`), for a project labeled with `label_config`."""
    tasks = []
    for r in queue:
        data = {k: r.get(k) for k in ("text", "prediction_id", "prompt_version", "token", "label", "slice", "reason", "audit")}
        tasks.append({"data": data, "predictions": [{"model_version": str(r.get("prompt_version")), "score": 1 - float(r.get("margin") or 0),
                                                     "result": [_choice(r["label"])]}] if r.get("label") else []})
    return tasks


def label_config(labels: Sequence[str]) -> str:
    """The Label Studio labeling config: the text and one Choices control over the task's labels."""
    choices = "".join(f'<Choice value="{_xml(label)}"/>' for label in labels)
    return f'<View><Text name="text" value="$text"/><Choices name="{LABEL_CONTROL}" toName="text" choice="single">{choices}</Choices></View>'


def from_label_studio(export: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Feedback items from Label Studio's JSON export (the latest annotation of each task counts):
    `up` where the person kept the model's label, `correction` where they chose another. Returns the
    items and the tasks that gave none (no annotation, a skipped or cancelled one, no choice), each
    with its reason."""
    items, skipped = [], []
    for n, task in enumerate(export, 1):
        data = task.get("data") if isinstance(task, Mapping) else None
        if not isinstance(data, Mapping) or not data.get("token"):
            skipped.append({"task": n, "id": task.get("id") if isinstance(task, Mapping) else None,
                            "reason": "no data.token: export tasks that softprompt feedback queue made"})
            continue
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        choice = None
        if done:
            latest = max(done, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
            for result in latest.get("result") or []:
                if result.get("from_name") == LABEL_CONTROL and result.get("value", {}).get("choices"):
                    choice = result["value"]["choices"][0]
        if choice is None:
            skipped.append({"task": n, "id": task.get("id"), "reason": "no completed annotation with a label choice"})
            continue
        kind = "up" if choice == data.get("label") else "correction"
        items.append({"token": data["token"], "text": data["text"], "kind": kind, "label": choice, "note": f"label-studio task {task.get('id')}"})
    return items, skipped


def _row(rec: Mapping[str, Any], slice_key: str | None) -> dict[str, Any]:
    scores = sorted((float(v) for v in (rec.get("scores") or {}).values()), reverse=True)
    margin = scores[0] - scores[1] if len(scores) >= 2 else 1.0
    meta = rec.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    text = str(rec["input"])
    return {
        "prediction_id": rec["id"], "prompt_version": rec.get("prompt_version"), "text": text, "input_sha256": input_sha256(text),
        "label": rec.get("label"), "scores": rec.get("scores"), "margin": round(margin, 6),
        "slice": str(meta.get(slice_key)) if slice_key else rec.get("label"), "words": set(_WORD.findall(text.lower())),
    }


def _in_turns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in rounds over their slices: each slice's best, then each slice's second, ..."""
    by_slice: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_slice.setdefault(r["slice"], []).append(r)
    out = []
    for k in range(max((len(v) for v in by_slice.values()), default=0)):
        out += sorted((v[k] for v in by_slice.values() if k < len(v)), key=lambda r: (r["margin"], r["prediction_id"]))
    return out


def _fresh(row: dict[str, Any], seen: list[set[str]], threshold: float) -> bool:
    """True (and remembered) unless the row's words nearly equal a picked row's (Jaccard >= threshold)."""
    words = row["words"]
    for other in seen:
        union = len(words | other)
        if union == 0 or len(words & other) / union >= threshold:
            return False
    seen.append(words)
    return True


def _choice(label: str) -> dict[str, Any]:
    return {"from_name": LABEL_CONTROL, "to_name": "text", "type": "choices", "value": {"choices": [label]}}


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
