"""`softprompt serve` for real: the HTTP service on 127.0.0.1 (port 0) over a tiny model, hit with urllib.

Three prompts of different lengths (two classification tasks with their own templates and labels, one
generation task) share the model; answers must equal `predict_rows` on the same table.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from softprompt import predict, serve
from softprompt.cli import build_parser
from softprompt.config import ModelConfig, config_from_dict, to_dict
from softprompt.errors import ConfigError
from softprompt.modeling import load_model
from softprompt.registry import compute_version
from softprompt.testing import build_tiny_model

TASKS: dict[str, tuple[dict[str, Any], int]] = {  # name: (task section, prompt length)
    "intent": ({
        "name": "intent", "template": "Customer message: {text}\nThe message is about",
        "labels": ["billing", "delivery", "account"],
        "verbalizer": {"billing": [" billing"], "delivery": [" delivery"], "account": [" account"]},
    }, 4),
    "urgency": ({
        "name": "urgency", "template": "{text} Urgent?", "labels": ["no", "yes"],
        "verbalizer": {"no": [" no"], "yes": [" yes"]},
    }, 9),
    "echo": ({"name": "echo", "kind": "generation", "template": "Q: {text}\nA:", "max_new_tokens": 3}, 2),
}
TEXTS = ["I was billed twice this month.", "Where is my parcel?", "Please close my account", "refund", "The app crashes on start."]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One artifact folder per task: the prompt as safetensors, plus a run manifest with the config."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("serve")
    corpus = [f"{t['template'].replace('{text}', x)}{w}" for t, _ in TASKS.values() for x in TEXTS for ws in t.get("verbalizer", {"": [" ok"]}).values() for w in ws]
    model_dir = build_tiny_model(root / "tiny", corpus * 4, vocab_size=400)
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads; the 2-core CI box is busy
    table = load_model(ModelConfig(name=str(model_dir), device="cpu")).model.get_input_embeddings().weight.detach()
    out = {}
    for seed, (name, (task, n)) in enumerate(TASKS.items()):
        folder = root / name
        folder.mkdir()
        g = torch.Generator().manual_seed(seed)
        embeds = table[torch.randint(0, 300, (n,), generator=g)] + 0.2 * torch.randn(n, table.shape[1], generator=g)
        save_file({"prompt_embeddings": embeds.contiguous()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n}))
        cfg = config_from_dict({"task": task, "data": {"train": "unused.csv"}, "model": {"name": str(model_dir), "device": "cpu"}, "prompt": {"num_virtual_tokens": n, "init": "vocab"}, "evaluate": {"calibrate": task.get("kind") != "generation"}})
        manifest = {"config": to_dict(cfg), "base_model": {"name": "tiny", "weights_sha256": "ab" * 32}}
        (folder / "run_manifest.json").write_text(json.dumps(manifest))
        out[name] = folder
    # As a pulled registry version: a manifest whose files hash to its id (predict verifies it).
    files = [{"name": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
             for f in sorted(out["intent"].iterdir())]
    version = compute_version([(f["name"], f["sha256"]) for f in files])
    (out["intent"] / "MANIFEST.json").write_text(json.dumps({
        "format": "softprompt.registry.version/1", "task": "intent", "base_model": {"key": "tiny", "name": "tiny"},
        "version": version, "files": files, "metric": {"name": "accuracy", "value": 0.5}, "eval_fingerprint": "e",
    }))
    return out


@pytest.fixture(scope="module")
def table(artifacts: dict[str, Path]) -> predict.PromptTable:
    return predict.load_prompts(predict.resolve_prompts([f"{n}={p}" for n, p in artifacts.items()]))


@pytest.fixture(scope="module")
def server(table: predict.PromptTable, artifacts: dict[str, Path]) -> Iterator[serve.PromptServer]:
    cfg = serve.ServeConfig(port=0, max_batch=8, max_wait_ms=400, max_request_rows=6, max_body_bytes=4096)
    with serve.PromptServer(table, cfg, {"intent": "s3://bucket/registry/intent/tiny/champion"}) as s:
        yield s


def call(url: str, body: Any = None, *, raw: bytes | None = None, method: str | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def same(got: list[dict[str, Any]], want: list[predict.Prediction]) -> None:
    assert [(g["prompt"], g["text"], g.get("label"), g.get("generated")) for g in got] == [(w.prompt, w.text, w.label, w.generated) for w in want]
    for g, w in zip(got, want, strict=True):
        if w.scores is not None:
            assert list(g["scores"]) == list(w.scores)
            assert list(g["scores"].values()) == pytest.approx(list(w.scores.values()), abs=1e-5)


def test_health_and_prompts(server: serve.PromptServer, table: predict.PromptTable, artifacts: dict[str, Path]) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    status, health = call(f"{server.url}/healthz")
    assert status == 200 and health["ok"] is True and health["model"] == "tiny" and health["device"] == "cpu"
    assert health["prompts"] == ["echo", "intent", "urgency"]
    assert all(table.prompts[n].verbalizer.single_token for n in ("intent", "urgency"))  # type: ignore[union-attr]
    status, body = call(f"{server.url}/v1/prompts")
    assert status == 200
    by_name = {p["name"]: p for p in body["prompts"]}
    assert [p["name"] for p in body["prompts"]] == ["echo", "intent", "urgency"]
    assert by_name["intent"]["labels"] == ["billing", "delivery", "account"] and by_name["intent"]["version"] == json.loads((artifacts["intent"] / "MANIFEST.json").read_text())["version"]
    assert by_name["intent"]["artifact"] == "s3://bucket/registry/intent/tiny/champion"
    assert by_name["echo"]["kind"] == "generation" and by_name["echo"]["labels"] is None and by_name["echo"]["version"] is None
    assert [by_name[n]["num_virtual_tokens"] for n in ("intent", "urgency", "echo")] == [4, 9, 2]
    idle = serve.PromptServer(table, serve.ServeConfig(port=0))
    assert idle.health()["ok"] is False  # its batching thread never started: /healthz answers 503
    idle.stop()


def test_single_and_batch_requests_equal_predict_rows(server: serve.PromptServer, table: predict.PromptTable) -> None:
    status, body = call(f"{server.url}/v1/predict", {"prompt": "intent", "text": TEXTS[0]})
    assert status == 200
    same(body["predictions"], predict.predict_rows(table, [("intent", TEXTS[0])]))
    assert set(body["predictions"][0]) == {"prompt", "text", "label", "scores"}
    rows = [(["intent", "urgency", "echo"][i % 3], t) for i, t in enumerate(TEXTS)]
    status, body = call(f"{server.url}/v1/predict", {"inputs": [{"prompt": p, "text": t} for p, t in rows]})
    assert status == 200
    same(body["predictions"], [predict.predict_rows(table, [row])[0] for row in rows])
    assert body["predictions"][2]["generated"] is not None


def test_concurrent_mixed_requests_are_batched_together(server: serve.PromptServer, table: predict.PromptTable) -> None:
    requests = [[(["intent", "urgency", "echo"][(i + j) % 3], TEXTS[(i + j) % len(TEXTS)]) for j in range(1 + i % 2)] for i in range(6)]
    results: dict[int, tuple[int, dict[str, Any]]] = {}
    barrier = threading.Barrier(len(requests))

    def client(i: int) -> None:
        barrier.wait()
        results[i] = call(f"{server.url}/v1/predict", {"inputs": [{"prompt": p, "text": t} for p, t in requests[i]]})

    before = server.batcher.stats()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.batcher.stats()
    for i, rows in enumerate(requests):
        assert results[i][0] == 200
        same(results[i][1]["predictions"], [predict.predict_rows(table, [row])[0] for row in rows])
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)  # requests shared forward passes


@pytest.mark.parametrize(
    ("body", "status", "field", "fragments"),
    [
        (b"", 400, "body", ["body is empty"]),
        (b"{not json", 400, "body", ["not JSON"]),
        (b"[1, 2]", 400, "body", ["JSON list, not an object"]),
        (json.dumps({"prompt": "intent"}).encode(), 400, "text", ["text must be a non-empty string", "it is missing"]),
        (json.dumps({"prompt": "intent", "text": 3}).encode(), 400, "text", ["got 3"]),
        (json.dumps({"text": "hi"}).encode(), 400, "prompt", ["prompt: it is missing", "['echo', 'intent', 'urgency']"]),
        (json.dumps({"inputs": [{"prompt": "intent", "text": "a"}, {"prompt": "nope", "text": "b"}]}).encode(), 400, "inputs[1].prompt", ["unknown prompt 'nope'", "loaded prompts: ['echo', 'intent', 'urgency']"]),
        (json.dumps({"inputs": [{"prompt": "intent", "text": "a"}, "b"]}).encode(), 400, "inputs[1]", ["must be an object"]),
        (json.dumps({"inputs": []}).encode(), 400, "inputs", ["non-empty list"]),
        (json.dumps({"inputs": [{"prompt": "intent", "text": "a"}] * 7}).encode(), 400, "inputs", ["7 rows; at most 6", "--max-request-rows"]),
        (json.dumps({"inputs": [{"prompt": "intent", "text": "a"}], "text": "b"}).encode(), 400, "inputs", ["not both"]),
        (json.dumps({"prompt": "intent", "text": "x" * 5000}).encode(), 413, "body", ["at most 4096"]),
    ],
)
def test_bad_requests_name_the_field(server: serve.PromptServer, body: bytes, status: int, field: str, fragments: list[str]) -> None:
    got_status, got = call(f"{server.url}/v1/predict", raw=body, method="POST")
    assert (got_status, got["field"]) == (status, field), got
    for fragment in fragments:
        assert fragment in got["error"], (fragment, got["error"])


def test_unknown_paths_are_404(server: serve.PromptServer) -> None:
    for path, method in (("/nope", "GET"), ("/v1/predict", "GET"), ("/v1/prompts", "POST")):
        status, body = call(f"{server.url}{path}", raw=b"{}" if method == "POST" else None, method=method)
        assert status == 404 and f"no route {method} {path}" in body["error"] and "POST /v1/predict" in body["error"]


def test_one_loaded_prompt_needs_no_name_and_configs_are_validated() -> None:
    assert serve.parse_request(b'{"text": "hi"}', ["only"], 4) == [("only", "hi")]
    with pytest.raises(ConfigError, match=r"--max-batch 0.*--max-wait-ms -1"):
        serve.ServeConfig(max_batch=0, max_wait_ms=-1)
    args = build_parser().parse_args(["serve", "--artifact", "a=x", "--artifact", "y"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms, args.artifact) == ("127.0.0.1", 8080, 32, 10.0, ["a=x", "y"])


def test_prompts_of_another_base_model_or_twice_the_same_name_are_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\['intent'\] are given twice"):
        predict.resolve_prompts([str(artifacts["intent"]), f"intent={artifacts['urgency']}"])
    other = tmp_path / "other"
    other.mkdir()
    for f in artifacts["urgency"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((other / "run_manifest.json").read_text())
    (other / "run_manifest.json").write_text(json.dumps({**manifest, "base_model": {"name": "big", "weights_sha256": "cd" * 32}}))
    with pytest.raises(ConfigError, match=r"\['other'\] were trained on another base model.*each base model's prompts separately"):
        predict.load_prompts(predict.resolve_prompts([str(artifacts["intent"]), f"other={other}"]))


def test_sigterm_stops_gracefully_after_answering_requests_in_flight(table: predict.PromptTable) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    answers: list[tuple[int, dict[str, Any]]] = []

    def client() -> None:
        for _ in range(200):  # wait for the server to listen
            try:
                call(f"{url}/healthz")
                break
            except urllib.error.URLError:
                time.sleep(0.05)
        inflight = threading.Thread(target=lambda: answers.append(call(f"{url}/v1/predict", {"prompt": "intent", "text": "hi"})))
        inflight.start()
        time.sleep(0.1)  # the request now waits in the batcher (max_wait_ms=500)
        os.kill(os.getpid(), signal.SIGTERM)
        inflight.join()

    helper = threading.Thread(target=client)
    helper.start()
    serve.run(table, serve.ServeConfig(port=port, max_wait_ms=500))  # returns once SIGTERM is handled
    helper.join()
    assert answers and answers[0][0] == 200 and answers[0][1]["predictions"][0]["prompt"] == "intent"
    with pytest.raises(urllib.error.URLError):
        call(f"{url}/healthz")
