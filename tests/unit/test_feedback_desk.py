"""`POST /v1/feedback`'s core (no Ray) and `softprompt feedback import | delete`: items routed to their
prompt's task, per-item answers, a body of refusals is a 400 listing each, a flooding client gets 429."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from softprompt import feedback
from softprompt.cli import main
from softprompt.predlog import new_id
from softprompt.registry.store import LocalStore
from softprompt.serve.feedback import FeedbackDesk, FeedbackRefused, RateLimit
from softprompt.serve.requests import RequestError

SECRET = b"desk-secret"
PROMPTS = {"intent": ("support", ["billing", "refund"]), "urgency": ("urgency", ["no", "yes"])}


def _item(text: str, **fields: Any) -> dict[str, Any]:
    return {"token": feedback.sign(SECRET, new_id(), "0123456789abcdef", text), "text": text, **fields}


def test_items_go_to_their_task_and_each_gets_its_answer(tmp_path: Path) -> None:
    desk = FeedbackDesk(LocalStore(tmp_path), lambda: PROMPTS, SECRET, per_minute=60, max_items=8)
    body = {"feedback": [
        _item("charged twice", prompt="intent", kind="correction", label="refund"),
        _item("now!", prompt="urgency", kind="up", label="yes"),
        _item("hello", prompt="intent", kind="correction", label="yes"),  # a label of another task
        _item("nothing", prompt="nope", kind="down"),
        {**_item("forged", prompt="intent", kind="down"), "text": "not what was predicted"},
    ]}
    answer = desk.submit(json.dumps(body).encode(), "10.0.0.1")
    assert [a["row"] for a in answer["accepted"]] == [1, 2]
    assert [(r["row"], r["field"]) for r in answer["rejects"]] == [(3, "label"), (4, "prompt"), (5, "text")]
    assert "billing, refund" in answer["rejects"][0]["reason"] and "['intent', 'urgency']" in answer["rejects"][1]["reason"]
    stored = feedback.FeedbackStore(LocalStore(tmp_path), task="support", labels=[], secret=b"").read()
    assert [(r["id"], r["label"], r["client"]) for r in stored] == [(answer["accepted"][0]["id"], "refund", "10.0.0.1")]

    with pytest.raises(FeedbackRefused) as refused:  # nothing accepted: a 400 whose body lists every reject
        desk.submit(json.dumps({"feedback": [_item("x", prompt="intent", kind="nope")]}).encode(), "10.0.0.1")
    assert refused.value.status == 400 and refused.value.body()["rejects"][0]["field"] == "kind"
    for bad, field in ((b"[1]", "body"), (b'{"feedback": []}', "feedback"), (json.dumps({"feedback": [{}] * 9}).encode(), "feedback")):
        with pytest.raises(RequestError) as exc:
            desk.submit(bad, "10.0.0.2")
        assert exc.value.field == field and exc.value.status == 400


def test_a_client_past_its_rate_gets_429_with_when_to_retry_and_others_are_not_held() -> None:
    now = [0.0]
    limit = RateLimit(per_minute=3, clock=lambda: now[0])
    assert [limit.wait_s("a") for _ in range(3)] == [0, 0, 0]
    assert limit.wait_s("a") == pytest.approx(20.0) and limit.wait_s("b") == 0
    now[0] = 20.0
    assert limit.wait_s("a") == 0

    desk = FeedbackDesk(LocalStore(Path("/nonexistent")), lambda: PROMPTS, SECRET, per_minute=1, max_items=8)
    with pytest.raises(RequestError):
        desk.submit(b"{}", "c")  # the first request is checked (and refused for its body)
    with pytest.raises(RequestError) as exc:
        desk.submit(b"{}", "c")
    assert exc.value.status == 429 and exc.value.retry_after_s == 60


def _artifact(tmp_path: Path) -> Path:
    from softprompt.config import config_from_dict, to_dict

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    cfg = config_from_dict({"task": {"name": "support", "template": "{text} is about", "labels": ["billing", "refund"],
                                     "verbalizer": {"billing": [" billing"], "refund": [" refund"]}}, "data": {"train": "unused.csv"}})
    (artifact / "run_manifest.json").write_text(json.dumps({"config": to_dict(cfg)}))
    (artifact / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))  # no model is loaded
    return artifact


def test_cli_imports_a_file_with_rejects_and_deletes_by_subject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    artifact = _artifact(tmp_path)
    rows = [_item("charged twice", kind="correction", label="refund", subject="cust-1"), _item("ok", kind="up", label="billing"),
            _item("bad", kind="correction", label="shipping")]
    path = tmp_path / "fb.csv"
    path.write_text("token,text,kind,label,subject\n" + "".join(f"{r['token']},{r['text']},{r['kind']},{r['label']},{r.get('subject', '')}\n" for r in rows))
    argv = ["feedback", "import", str(path), "--artifact", str(artifact), "--prediction-log", str(tmp_path / "registry")]
    assert main(argv) == 2 and "set SOFTPROMPT_FEEDBACK_SECRET" in capsys.readouterr().err
    monkeypatch.setenv("SOFTPROMPT_FEEDBACK_SECRET", SECRET.decode())
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 accepted into support" in err and f"1 refused, written to {path}.rejects.jsonl" in err
    reject = json.loads((tmp_path / "fb.csv.rejects.jsonl").read_text())
    assert (reject["where"], reject["field"], reject["value"]) == (f"{path} row 3", "label", "shipping")
    store = feedback.FeedbackStore(LocalStore(tmp_path / "registry"), task="support", labels=[], secret=b"")
    assert [(r["label"], r["subject"]) for r in store.read()] == [("refund", "cust-1"), ("billing", None)]

    assert main(["feedback", "delete", "--artifact", str(artifact), "--prediction-log", str(tmp_path / "registry"), "--subject", "cust-1"]) == 0
    assert "deleted 1 records of support" in capsys.readouterr().err
    assert [r["label"] for r in store.read()] == ["billing"]


def test_cli_queue_for_label_studio_and_its_export_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from softprompt.predlog import record_batch

    artifact, registry = _artifact(tmp_path), tmp_path / "registry"
    rows = [{"task": "support", "prompt_version": "local", "text": text, "label": "billing", "scores": {"billing": top, "refund": 1 - top},
             "model": "tiny"} for text, top in (("charged twice", 0.55), ("an invoice question", 0.9), ("money back please", 0.51))]
    record_batch(LocalStore(registry), rows)
    monkeypatch.setenv("SOFTPROMPT_FEEDBACK_SECRET", SECRET.decode())
    target = ["--artifact", str(artifact), "--prediction-log", str(registry)]
    assert main(["feedback", "queue", *target, "--budget", "2", "--audit-share", "0", "--output", str(tmp_path / "q.json"), "--label-studio"]) == 0
    assert "review queue: 2 of budget 2 for support (0 down, 0 disagreement, 2 uncertain, 0 audit)" in capsys.readouterr().err
    tasks = json.loads((tmp_path / "q.json").read_text())
    assert [t["data"]["text"] for t in tasks] == ["money back please", "charged twice"]  # the least certain first
    assert "<Choices name=\"label\"" in (tmp_path / "q.json.label_config.xml").read_text()
    choice = {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["refund"]}}
    export = [{"id": i, "data": t["data"], "annotations": [{"result": [choice], "was_cancelled": False}]} for i, t in enumerate(tasks)]
    (tmp_path / "export.json").write_text(json.dumps(export))
    assert main(["feedback", "import", str(tmp_path / "export.json"), "--label-studio", *target]) == 0
    assert "2 accepted into support" in capsys.readouterr().err
