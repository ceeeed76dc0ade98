"""Serving a registry's champion: a promotion under load moves traffic with no failed request, every
answer names its version, and every prediction lands in the prediction log on S3 (moto's server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_serve import TOKEN, build_artifacts, call, start_app

from softprompt import predict
from softprompt.registry import compute_version
from softprompt.serve import ServeConfig


def _publish(src: Path, registry: Path, seed: int) -> str:
    """Write `src` (the intent artifact) into `registry` as a version, its prompt re-drawn with `seed`."""
    from safetensors.torch import load_file, save_file

    staging = registry / "staging"
    shutil.copytree(src, staging)
    (staging / "MANIFEST.json").unlink()
    embeds = load_file(str(staging / "adapter_model.safetensors"))["prompt_embeddings"]
    save_file({"prompt_embeddings": (embeds + torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed))).contiguous()},
              str(staging / "adapter_model.safetensors"))
    files = [{"name": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size} for f in sorted(staging.iterdir())]
    version = compute_version([(f["name"], f["sha256"]) for f in files])
    (staging / "MANIFEST.json").write_text(json.dumps({
        "format": "softprompt.registry.version/1", "task": "intent", "base_model": {"key": "tiny", "name": "tiny"},
        "version": version, "files": files, "metric": {"name": "accuracy", "value": 0.5}, "eval_fingerprint": "e",
    }))
    staging.rename(registry / "intent" / "tiny" / version)
    return version


def _point(registry: Path, version: str) -> None:
    """Move the champion pointer the way a store does: a whole new object, atomically."""
    tmp = registry / "intent" / "tiny" / ".champion.tmp"
    tmp.write_text(json.dumps({"version": version, "previous": None}))
    os.replace(tmp, registry / "intent" / "tiny" / "champion.json")


@pytest.fixture(scope="module")
def setup(ray_session: dict[str, str], s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import boto3
    from ray import serve

    root = tmp_path_factory.mktemp("serve-registry")
    artifacts = build_artifacts(root / "artifacts")
    registry = root / "registry"
    (registry / "intent" / "tiny").mkdir(parents=True)
    v1, v2 = _publish(artifacts["intent"], registry, 1), _publish(artifacts["intent"], registry, 2)
    _point(registry, v1)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="serve-log")
    cfg = ServeConfig(max_batch=8, max_wait_ms=20, refresh_s=1.0, replica_cpus=0.5, shutdown_s=3, max_ongoing_requests=32,
                      prediction_log="s3://serve-log/registry")
    try:
        url = start_app([f"intent={registry}/intent/tiny/champion", f"urgency={artifacts['urgency']}"], cfg, token=TOKEN, s3_endpoint=s3_endpoint)
        yield {"url": url, "registry": registry, "v1": v1, "v2": v2, "s3": s3_endpoint}
    finally:
        serve.shutdown()


def test_a_promotion_under_load_moves_traffic_with_no_failed_request(setup: dict[str, Any]) -> None:
    url, v1, v2 = setup["url"], setup["v1"], setup["v2"]
    seen: dict[int, list[tuple[int, str | None, str]]] = {i: [] for i in range(4)}
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                status, body, _ = call(f"{url}/v1/predict", {"inputs": [{"prompt": "intent", "text": f"message {i} {len(seen[i])}"}, {"prompt": "urgency", "text": "now"}]})
            except OSError as exc:  # a refused or dropped connection is a failed request too
                status, body = 0, {"error": repr(exc)}
            seen[i].append((status, body["predictions"][0]["version"] if status == 200 else None, json.dumps(body)[:200]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    _point(setup["registry"], v2)
    moved = time.monotonic()
    while time.monotonic() - moved < 20 and not any(v == v2 for rows in seen.values() for _, v, _ in rows[-3:]):
        time.sleep(0.2)
    picked_up = time.monotonic() - moved
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    answers = [a for rows in seen.values() for a in rows]
    assert all(seen.values()) and [a for a in answers if a[0] != 200] == []
    assert picked_up < 1.0 + 5, picked_up  # serve.refresh_s plus loading the new version
    for rows in seen.values():  # each client sees v1, then v2, never back
        versions = [v for _, v, _ in rows]
        assert set(versions) <= {v1, v2} and versions == sorted(versions, key=lambda v: v == v2), versions
    assert any(v == v1 for _, v, _ in answers) and any(v == v2 for _, v, _ in answers)
    assert call(f"{url}/healthz")[1]["versions"]["intent"] == v2


def test_answers_equal_predict_with_the_version_they_name_and_are_logged(setup: dict[str, Any]) -> None:
    from softprompt.predlog import read_records
    from softprompt.registry.store import open_store

    url, registry = setup["url"], setup["registry"]
    rows = [("intent", "I was billed twice"), ("urgency", "Where is my parcel?"), ("intent", "close my account")]
    status, body, _ = call(f"{url}/v1/predict", {"inputs": [{"prompt": p, "text": t} for p, t in rows]})
    assert status == 200
    preds = body["predictions"]
    version = preds[0]["version"]
    table = predict.load_prompts(predict.resolve_prompts([f"intent={registry}/intent/tiny/{version}", f"urgency={registry.parent}/artifacts/urgency"]))
    want = predict.predict_rows(table, rows)
    assert [p["label"] for p in preds] == [w.label for w in want]
    store = open_store("s3://serve-log/registry", endpoint_url=setup["s3"])
    ids = {p["id"] for p in preds if p["prompt"] == "intent"}
    deadline = time.monotonic() + 20
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and not ids <= set(found):
        found = {r["id"]: r for r in read_records(store, "intent")}
        time.sleep(0.5)
    assert ids <= set(found), "the served predictions were not logged within 20 s"
    for p in preds:
        if p["prompt"] == "intent":
            rec = found[p["id"]]
            assert (rec["prompt_version"], rec["input"], rec["label"], rec["task"]) == (version, p["text"], p["label"], "intent")
            assert rec["scores"] == pytest.approx(p["scores"], abs=1e-6)


def test_feedback_with_a_predictions_token_is_stored_and_a_forged_one_refused(setup: dict[str, Any]) -> None:
    from softprompt.feedback import FeedbackStore
    from softprompt.registry.store import open_store

    url = setup["url"]
    status, body, _ = call(f"{url}/v1/predict", {"inputs": [{"prompt": "intent", "text": "I was billed twice"}, {"prompt": "urgency", "text": "now"}]})
    assert status == 200
    intent, urgency = body["predictions"]
    items = [{"prompt": "intent", "token": intent["token"], "text": intent["text"], "kind": "correction", "label": "billing", "subject": "c-7"},
             {"prompt": "urgency", "token": intent["token"], "text": urgency["text"], "kind": "up", "label": "yes"}]  # another row's token
    status, answer, _ = call(f"{url}/v1/feedback", {"feedback": items})
    assert status == 200 and [a["row"] for a in answer["accepted"]] == [1], answer
    assert answer["accepted"][0]["prediction_id"] == intent["id"] and answer["rejects"][0]["field"] == "text"
    stored = FeedbackStore(open_store("s3://serve-log/registry", endpoint_url=setup["s3"]), task="intent", labels=[], secret=b"").read()
    assert [(r["id"], r["prediction_id"], r["label"], r["input"], r["subject"]) for r in stored] == [
        (answer["accepted"][0]["id"], intent["id"], "billing", "I was billed twice", "c-7")]
    assert call(f"{url}/v1/feedback", {"feedback": items[1:]})[0] == 400
    assert call(f"{url}/v1/feedback", {"feedback": items[:1]}, token=None)[0] == 401
