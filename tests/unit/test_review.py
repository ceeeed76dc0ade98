"""The review queue and Label Studio's formats: thumbs-down first, then the least certain spread over
slices, near-duplicates skipped, a uniform audit share, and a Label Studio export back to feedback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from softprompt import feedback, review
from softprompt.errors import DataError
from softprompt.predlog import new_id
from softprompt.registry.store import LocalStore

SECRET = b"review-secret"
LABELS = ["billing", "refund", "delivery"]


def _pred(text: str, label: str, top: float, version: str = "v1") -> dict[str, Any]:
    rest = (1 - top) / 2
    scores = {lab: (top if lab == label else rest) for lab in LABELS}
    return {"id": new_id(), "prompt_version": version, "input": text, "label": label, "scores": scores}


def test_down_first_then_the_least_certain_in_turns_over_labels_without_near_duplicates() -> None:
    preds = [_pred(f"billing question number {i}", "billing", 0.40 + i / 100) for i in range(6)]
    preds += [_pred(f"parcel {i} never came", "delivery", 0.60 + i / 100) for i in range(3)]
    preds += [_pred("billing question number 0", "refund", 0.9, version="v2")]  # another version disagrees on a logged input
    preds += [_pred("Billing question, number 1!", "billing", 0.3)]  # near-duplicate of row 1 once lower-cased
    preds += [{**_pred("no input kept", "refund", 0.34), "input": None}]  # logged without its input: nothing to review
    down = _pred("my refund is late", "refund", 0.95)
    done = _pred("parcel 0 never came again", "delivery", 0.35)
    fb = [{"id": new_id(), "prediction_id": down["id"], "kind": "down", "label": None},
          {"id": new_id(), "prediction_id": done["id"], "kind": "correction", "label": "refund"}]
    queue = review.build_queue([*preds, down, done], fb, budget=6, audit_share=0.0, secret=SECRET)
    assert [(r["reason"], r["slice"], r["text"]) for r in queue] == [
        ("down", "refund", "my refund is late"),
        ("disagreement", "billing", "billing question number 0"),  # margin 0; v2's prediction of it is the same text: skipped
        ("uncertain", "delivery", "parcel 0 never came"),           # each label's least certain in turn
        ("uncertain", "billing", "Billing question, number 1!"),
        ("uncertain", "delivery", "parcel 1 never came"),
        ("uncertain", "delivery", "parcel 2 never came"),           # billing's next is a near-duplicate of a picked row
    ]  # no input logged, or feedback already given (not down): never queued
    assert all(feedback.verify(SECRET, r["token"]).prediction_id == r["prediction_id"] for r in queue)


def test_the_audit_share_is_drawn_uniformly_and_marked() -> None:
    preds = [_pred(f"distinct message {i} about things", "billing", 0.34 + (i % 50) / 100) for i in range(400)]
    queue = review.build_queue(preds, [], budget=50, audit_share=0.2, seed=1)
    audit = [r for r in queue if r["audit"]]
    assert len(queue) == 50 and len(audit) == 10 and all(r["reason"] == "audit" for r in audit)
    hard = [r for r in queue if not r["audit"]]
    assert max(r["margin"] for r in hard) < 0.2  # the rest are the least certain
    assert sum(r["margin"] for r in audit) / 10 > 0.2  # the audit rows are not: drawn from everything
    with pytest.raises(DataError, match="budget=0"):
        review.build_queue(preds, [], budget=0)


def test_label_studio_tasks_and_export_become_feedback_the_store_accepts(tmp_path: Path) -> None:
    preds = [_pred("charged twice", "billing", 0.5), _pred("where is it", "delivery", 0.4), _pred("refund me", "refund", 0.45)]
    tasks = review.to_label_studio(review.build_queue(preds, [], budget=3, audit_share=0.0, secret=SECRET))
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [tasks[0]["data"]["label"]]
    assert '<Choice value="refund"/>' in review.label_config(LABELS)
    export = []  # what Label Studio's JSON export holds after people annotated
    for i, task in enumerate(tasks):
        choice = {"where is it": "delivery", "charged twice": "refund"}.get(task["data"]["text"])
        annotations = [] if choice is None else [{"id": i, "updated_at": "2026-12-03T10:00:00", "was_cancelled": False,
                                                  "result": [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [choice]}}]}]
        export.append({"id": 100 + i, "data": task["data"], "annotations": annotations})
    items, skipped = review.from_label_studio(export)
    assert sorted((it["text"], it["kind"], it["label"]) for it in items) == [("charged twice", "correction", "refund"), ("where is it", "up", "delivery")]
    assert [s["reason"] for s in skipped] == ["no completed annotation with a label choice"]
    store = feedback.FeedbackStore(LocalStore(tmp_path), task="support", labels=LABELS, secret=SECRET)
    assert len(store.submit(items).accepted) == 2
