"""Feedback: signed prediction tokens, validation with rejects, duplicates and conflicts, deletion."""

from __future__ import annotations

from pathlib import Path

import pytest

from softprompt import feedback
from softprompt.predlog import new_id
from softprompt.registry.store import LocalStore

SECRET = b"server-secret"
LABELS = ["billing", "refund", "delivery"]


def _prediction(text: str, version: str = "0123456789abcdef") -> tuple[str, str]:
    pid = new_id()
    return pid, feedback.sign(SECRET, pid, version, text)


def test_tokens_verify_and_forgeries_do_not() -> None:
    pid, token = _prediction("where is my parcel")
    claims = feedback.verify(SECRET, token)
    assert (claims.prediction_id, claims.prompt_version) == (pid, "0123456789abcdef")
    assert claims.input_sha256 == feedback.input_sha256("where is my parcel")
    with pytest.raises(feedback.FeedbackError, match="another server"):
        feedback.verify(b"other", token)
    version, _, sig = token.split(".")
    _, other = _prediction("refund please")
    with pytest.raises(feedback.FeedbackError, match="altered"):
        feedback.verify(SECRET, f"{version}.{other.split('.')[1]}.{sig}")  # claims swapped under a valid signature
    with pytest.raises(feedback.FeedbackError, match="not a prediction token"):
        feedback.verify(SECRET, "abc")
    assert feedback.input_sha256("\ud800") != feedback.input_sha256("")  # a lone surrogate hashes, never crashes


def test_submit_accepts_valid_feedback_and_rejects_each_bad_item_with_the_fix(tmp_path: Path) -> None:
    fb = feedback.FeedbackStore(LocalStore(tmp_path), task="support", labels=LABELS, secret=SECRET)
    _, t1 = _prediction("I was charged twice")
    _, t2 = _prediction("my parcel is late")
    _, t3 = _prediction("the app crashes")
    items = [
        {"token": t1, "text": "I was charged twice", "kind": "correction", "label": "billing", "subject": "user-1"},
        {"token": t2, "text": "my parcel is late", "kind": "up", "label": "delivery"},
        {"token": t3, "text": "the app crashes", "kind": "down", "label": "refund"},
        {"token": t1, "text": "I was charged thrice", "kind": "correction", "label": "billing"},
        {"token": t1 + "x", "text": "I was charged twice", "kind": "correction", "label": "billing"},
        {"token": t2, "text": "my parcel is late", "kind": "correction", "label": "shipping"},
        {"token": t2, "text": "my parcel is late", "kind": "meh", "label": "delivery"},
        "not an object",
    ]
    result = fb.submit(items, client="10.0.0.7")
    assert [r["kind"] for r in result.accepted] == ["correction", "up", "down"]
    assert result.accepted[2]["label"] is None and result.accepted[0]["input"] == "I was charged twice"
    assert [(r["row"], r["field"]) for r in result.rejects] == [(4, "text"), (5, "token"), (6, "label"), (7, "kind"), (8, "")]
    assert "billing, refund, delivery" in result.rejects[2]["reason"] and result.rejects[2]["value"] == "shipping"
    assert "not the text the token's prediction was made for" in result.rejects[0]["reason"]
    stored = fb.read()
    assert [r["id"] for r in stored] == [r["id"] for r in result.accepted] and stored[0]["client"] == "10.0.0.7"


def test_duplicates_are_refused_and_a_conflict_supersedes_on_record(tmp_path: Path) -> None:
    fb = feedback.FeedbackStore(LocalStore(tmp_path), task="support", labels=LABELS, secret=SECRET)
    pid, token = _prediction("charged twice, want my money back")
    first = fb.submit([{"token": token, "text": "charged twice, want my money back", "kind": "correction", "label": "billing"}])
    again = fb.submit([{"token": token, "text": "charged twice, want my money back", "kind": "correction", "label": "billing"}])
    assert not again.accepted and "duplicate of feedback " + first.accepted[0]["id"] in again.rejects[0]["reason"]
    later = fb.submit([{"token": token, "text": "charged twice, want my money back", "kind": "correction", "label": "refund"}])
    (rec,) = later.accepted
    assert rec["supersedes"] == first.accepted[0]["id"] and rec["conflict"] is True
    assert len(fb.read()) == 2  # both kept: append-only
    assert feedback.effective(fb.read())[pid]["label"] == "refund"  # the latest wins


def test_delete_by_id_and_by_subject(tmp_path: Path) -> None:
    fb = feedback.FeedbackStore(LocalStore(tmp_path), task="support", labels=LABELS, secret=SECRET)
    recs = []
    for i, subject in enumerate(["alice", "bob", "alice"]):
        text = f"message {i}"
        _, token = _prediction(text)
        recs += fb.submit([{"token": token, "text": text, "kind": "up", "label": "refund", "subject": subject}]).accepted
    assert fb.delete(subject="alice") == 2
    assert [r["subject"] for r in fb.read()] == ["bob"]
    assert fb.delete(ids=[recs[1]["id"]]) == 1 and fb.read() == []
    assert LocalStore(tmp_path).list("support/_feedback/") == []
