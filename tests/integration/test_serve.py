"""`softprompt serve` on a real local Ray Serve: three prompts on a tiny model, hit over real HTTP.

Three prompts of different lengths (two classification tasks with their own templates and labels, one
generation task) share the model; answers must equal `predict_rows` on the same table. One Serve
application serves the whole module (a bearer token on, small limits so that each guard is reachable).
Helpers here (`build_artifacts`, `call`, `start_app`) are shared by the other `test_serve_*` modules.
"""

from __future__ import annotations

import hashlib
import json
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

from softprompt import predict
from softprompt.cli import build_parser
from softprompt.cli.inference import serve_config
from softprompt.config import ModelConfig, config_from_dict, to_dict
from softprompt.errors import ConfigError
from softprompt.modeling import load_model
from softprompt.registry import compute_version
from softprompt.serve import ServeConfig, parse_request
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
TOKEN = "s3cret-token"


def build_artifacts(root: Path) -> dict[str, Path]:
    """One artifact folder per task (the prompt as safetensors, a run manifest with the config); "intent"
    is also a registry version (a MANIFEST.json whose files hash to its id)."""
    from safetensors.torch import save_file

    corpus = [f"{t['template'].replace('{text}', x)}{w}" for t, _ in TASKS.values() for x in TEXTS for ws in t.get("verbalizer", {"": [" ok"]}).values() for w in ws]
    model_dir = build_tiny_model(root / "tiny", corpus * 4, vocab_size=400)
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
    files = [{"name": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
             for f in sorted(out["intent"].iterdir())]
    version = compute_version([(f["name"], f["sha256"]) for f in files])
    (out["intent"] / "MANIFEST.json").write_text(json.dumps({
        "format": "softprompt.registry.version/1", "task": "intent", "base_model": {"key": "tiny", "name": "tiny"},
        "version": version, "files": files, "metric": {"name": "accuracy", "value": 0.5}, "eval_fingerprint": "e",
    }))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_app(specs: list[str], cfg: ServeConfig, token: str | None = None, s3_endpoint: str | None = None) -> str:
    """Start Ray Serve on a free loopback port with our application; returns its base URL."""
    from ray import serve

    from softprompt.ray.internals import serve_http_options
    from softprompt.ray.serving import APP_NAME, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": cfg.request_timeout_s, "keep_alive_timeout_s": 5})
    assert serve_http_options() == {"host": "127.0.0.1", "port": port}, "a Serve left running by an earlier test kept its own port"
    serve.run(build_app(specs, cfg, token=token, model_name="tiny", s3_endpoint=s3_endpoint), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def call(url: str, body: Any = None, *, raw: bytes | None = None, method: str | None = None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"), headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _body(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, _body(exc.read()), dict(exc.headers)


def _body(raw: bytes) -> Any:
    """A JSON answer, or Ray Serve's own plain-text one (a route not yet known to its proxy) as {"text": ...}."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"text": raw.decode("utf-8", "replace")}


def same(got: list[dict[str, Any]], want: list[predict.Prediction]) -> None:
    assert [(g["prompt"], g["text"], g.get("label"), g.get("generated")) for g in got] == [(w.prompt, w.text, w.label, w.generated) for w in want]
    for g, w in zip(got, want, strict=True):
        if w.scores is not None:
            assert list(g["scores"]) == list(w.scores)
            assert list(g["scores"].values()) == pytest.approx(list(w.scores.values()), abs=1e-5)


CFG = ServeConfig(max_batch=8, max_batch_tokens=1024, max_row_tokens=48, max_wait_ms=300, max_request_rows=6, max_body_bytes=600_000,
                  max_queued_rows=24, max_ongoing_requests=32, replica_cpus=0.5, prediction_log="s3://slow/registry", request_timeout_s=60,
                  shutdown_s=3)
"""The prediction log goes to a store that never answers (`blackhole`): requests must not notice."""


@pytest.fixture(scope="module")
def blackhole() -> Iterator[str]:
    """An S3 endpoint that accepts connections and never answers: the slowest store there is."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads; the 2-core CI box is busy
    return build_artifacts(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def table(artifacts: dict[str, Path]) -> predict.PromptTable:
    return predict.load_prompts(predict.resolve_prompts([f"{n}={p}" for n, p in artifacts.items()]))


@pytest.fixture(scope="module")
def url(ray_session: dict[str, str], artifacts: dict[str, Path], blackhole: str) -> Iterator[str]:
    from ray import serve

    try:
        yield start_app([f"{n}={p}" for n, p in artifacts.items()], CFG, token=TOKEN, s3_endpoint=blackhole)
    finally:
        serve.shutdown()


def test_health_and_prompts_show_versions_not_local_paths(url: str, artifacts: dict[str, Path]) -> None:
    status, health, _ = call(f"{url}/healthz", token=None)  # open: a load balancer's probe has no token
    assert status == 200 and health["ok"] is True and health["model"] == "tiny" and health["device"] == "cpu"
    assert health["prompts"] == ["echo", "intent", "urgency"]
    version = json.loads((artifacts["intent"] / "MANIFEST.json").read_text())["version"]
    assert health["versions"] == {"echo": None, "intent": version, "urgency": None}
    status, body, _ = call(f"{url}/v1/prompts")
    assert status == 200
    by_name = {p["name"]: p for p in body["prompts"]}
    assert [p["name"] for p in body["prompts"]] == ["echo", "intent", "urgency"]
    assert by_name["intent"]["labels"] == ["billing", "delivery", "account"] and by_name["intent"]["version"] == version
    assert by_name["echo"]["kind"] == "generation" and by_name["echo"]["labels"] is None and by_name["echo"]["version"] is None
    assert [by_name[n]["num_virtual_tokens"] for n in ("intent", "urgency", "echo")] == [4, 9, 2]
    assert str(artifacts["intent"].parent) not in json.dumps(body) and by_name["intent"]["artifact"] == "intent"  # no local paths


def test_single_and_batch_requests_equal_predict_rows(url: str, table: predict.PromptTable) -> None:
    status, body, _ = call(f"{url}/v1/predict", {"prompt": "intent", "text": TEXTS[0]})
    assert status == 200
    same(body["predictions"], predict.predict_rows(table, [("intent", TEXTS[0])]))
    assert set(body["predictions"][0]) == {"id", "version", "token", "prompt", "text", "label", "scores"}  # token: feedback is on (a log store is set)
    assert len(body["predictions"][0]["id"]) == 24 and body["predictions"][0]["version"] is not None
    rows = [(["intent", "urgency", "echo"][i % 3], t) for i, t in enumerate(TEXTS)]
    status, body, _ = call(f"{url}/v1/predict", {"inputs": [{"prompt": p, "text": t} for p, t in rows]})
    assert status == 200
    same(body["predictions"], [predict.predict_rows(table, [row])[0] for row in rows])
    assert body["predictions"][2]["generated"] is not None
    assert len({p["id"] for p in body["predictions"]}) == len(rows)


def test_concurrent_mixed_requests_are_batched_together(url: str, table: predict.PromptTable) -> None:
    requests = [[(["intent", "urgency", "echo"][(i + j) % 3], TEXTS[(i + j) % len(TEXTS)]) for j in range(1 + i % 2)] for i in range(6)]
    results = _concurrently(url, [{"inputs": [{"prompt": p, "text": t} for p, t in rows]} for rows in requests])
    _, after, _ = call(f"{url}/healthz")
    for i, rows in enumerate(requests):
        assert results[i][0] == 200, results[i]
        same(results[i][1]["predictions"], [predict.predict_rows(table, [row])[0] for row in rows])
    assert after["batches"] < after["requests"]  # requests shared forward passes


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
        (json.dumps({"prompt": "intent", "text": "x" * 700_000}).encode(), 413, "body", ["at most 600000", "serve.max_body_bytes"]),
        (b'{"prompt": "intent", "text": "\\ud800"}', 400, "text", ["lone surrogate", "'\\ud800' at character 0"]),
        (b"[" * 200_000 + b"]" * 200_000, 400, "body", ["nests JSON too deep"]),
        (b'{"prompt": "intent", "text": "a", "n": ' + b"7" * 5000 + b"}", 400, "body", ["not JSON we accept", "digits"]),
        (json.dumps({"prompt": "intent", "text": "word " * 200}).encode(), 413, "text", ["at most 48 tokens per row", "serve.max_row_tokens"]),
    ],
)
def test_bad_requests_name_the_field(url: str, body: bytes, status: int, field: str, fragments: list[str]) -> None:
    got_status, got, _ = call(f"{url}/v1/predict", raw=body, method="POST")
    assert (got_status, got["field"]) == (status, field), got
    for fragment in fragments:
        assert fragment in got["error"], (fragment, got["error"])


def test_unknown_paths_and_methods_answer_json(url: str) -> None:
    for path, method, status in (("/nope", "GET", 404), ("/v1/predict", "GET", 405), ("/v1/prompts", "POST", 405), ("/v1/predict", "PUT", 405),
                                 ("/healthz", "DELETE", 405)):
        got, body, headers = call(f"{url}{path}", raw=b"{}" if method in ("POST", "PUT") else None, method=method)
        assert got == status and body["field"] in ("path", "method") and "POST /v1/predict" in body["error"], (path, method, body)
        assert headers["content-type"] == "application/json"


def test_the_bearer_token_guards_everything_but_health(url: str) -> None:
    for token in (None, "wrong"):
        for path, body in (("/v1/prompts", None), ("/v1/predict", {"prompt": "intent", "text": "hi"})):
            status, got, headers = call(f"{url}{path}", body, token=token)
            assert status == 401 and got["field"] == "Authorization" and headers["www-authenticate"] == "Bearer"
    assert call(f"{url}/healthz", token=None)[0] == 200


def test_a_lone_surrogate_fails_its_own_request_only(url: str, table: predict.PromptTable) -> None:
    """98c578d: the bad row passed validation and failed the whole micro-batch (five valid requests got 500)."""
    bodies: list[Any] = [{"prompt": "intent", "text": t} for t in TEXTS]
    bodies.insert(2, b'{"inputs": [{"prompt": "intent", "text": "ok"}, {"prompt": "urgency", "text": "bad \\ud800 row"}]}')
    results = _concurrently(url, bodies)
    assert results[2][0] == 400 and results[2][1]["field"] == "inputs[1].text" and "lone surrogate" in results[2][1]["error"]
    for i, text in enumerate(TEXTS):
        status, body = results[i if i < 2 else i + 1][:2]
        assert status == 200, body
        same(body["predictions"], predict.predict_rows(table, [("intent", text)]))


def test_an_overlong_text_is_refused_without_holding_others(url: str) -> None:
    """98c578d: a 24,000-character text held the batcher over 60 s; a queued one-row request got 503 after 120 s."""
    long = {"prompt": "intent", "text": "refund please " * 1715}  # 24,010 characters
    results = _concurrently(url, [long, {"prompt": "urgency", "text": "hi"}])
    assert results[0][0] == 413 and "at most 48 tokens per row" in results[0][1]["error"], results[0]
    assert results[1][0] == 200


def test_a_client_that_disconnects_has_its_queued_rows_dropped(url: str) -> None:
    """A lone row waits up to max_wait_ms (300 ms) for company; its client gives up after 50 ms."""
    before = call(f"{url}/healthz")[1]["dropped"]
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        call(f"{url}/v1/predict", {"prompt": "intent", "text": "gone"}, timeout=0.05)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and call(f"{url}/healthz")[1]["dropped"] == before:
        time.sleep(0.1)
    assert call(f"{url}/healthz")[1]["dropped"] == before + 1


def test_backpressure_answers_503_with_retry_after(url: str) -> None:
    six = {"inputs": [{"prompt": "echo", "text": f"hello {i}"} for i in range(6)]}  # 30 rows at once > max_queued_rows 24
    results = _concurrently(url, [six] * 5)
    statuses = sorted(r[0] for r in results)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    refused = next(r for r in results if r[0] == 503)
    assert refused[2]["retry-after"] == "1" and "serve.max_queued_rows" in refused[1]["error"]


def test_malformed_http_gets_400_not_a_dropped_connection(url: str) -> None:
    """98c578d: `Content-Length: ²` ("²".isdigit() is true) dropped the connection with a traceback."""
    host, port = url.removeprefix("http://").split(":")
    for length in ("\u00b2", "-1", "1e3"):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            # latin-1, as HTTP/1.1 headers are read: "²" is the one byte 0xb2
            conn.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n{{}}".encode("latin-1"))
            reply = conn.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400"), (length, reply[:200])


def test_twenty_clients_with_a_poison_request_all_answered_and_memory_returns(url: str, table: predict.PromptTable) -> None:
    """98c578d: listen backlog 5 (20 clients x 10 requests: one reset); a poison row failed its batch; a long text
    kept 0.75 GB. Here: every valid request answered right, the poison ones refused alone, the replica's RSS back
    within 10% of its baseline, and the prediction log's store never answering (blackhole) changes nothing."""
    import psutil

    _, health, _ = call(f"{url}/healthz")
    replica = psutil.Process(health["pid"])
    baseline = replica.memory_info().rss
    poison = [b'{"prompt": "intent", "text": "\ud800"}', json.dumps({"prompt": "intent", "text": "refund please " * 1715}).encode(),
              b"[" * 100_000 + b"]" * 100_000]
    failures: list[Any] = []

    def client(i: int) -> None:
        for j in range(10):
            if i == 7 and j in (3, 5, 7):
                status, body, _ = call(f"{url}/v1/predict", raw=poison[(j - 3) // 2], method="POST")
                if status not in (400, 413):
                    failures.append(("poison", status, body))
                continue
            name, text = ["intent", "urgency"][(i + j) % 2], TEXTS[(i * 3 + j) % len(TEXTS)]
            status, body, _ = call(f"{url}/v1/predict", {"prompt": name, "text": text})
            if status != 200 or body["predictions"][0]["label"] != want[(name, text)]:
                failures.append((name, text, status, body))

    want = {(n, t): predict.predict_rows(table, [(n, t)])[0].label for n in ("intent", "urgency") for t in TEXTS}
    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert replica.memory_info().rss <= baseline * 1.10, (replica.memory_info().rss, baseline)
    _, health, _ = call(f"{url}/healthz")
    assert health["prediction_log"]["intent"]["written"] == 0  # the store never answered; the requests did


def test_core_validation_and_settings_without_ray() -> None:
    assert parse_request(b'{"text": "hi"}', ["only"], 4) == [("only", "hi")]
    with pytest.raises(ConfigError, match=r"serve.max_batch 0.*serve.max_wait_ms -1"):
        ServeConfig(max_batch=0, max_wait_ms=-1)
    with pytest.raises(ConfigError, match=r"serve.max_row_tokens 9000: at most serve.max_batch_tokens \(8192\)"):
        ServeConfig(max_row_tokens=9000)
    args = build_parser().parse_args(["serve", "--artifact", "a=x", "--artifact", "y", "--max-batch-tokens", "4096", "--log-inputs", "false"])
    cfg = serve_config(args)
    assert (cfg.host, cfg.port, cfg.max_batch, cfg.max_batch_tokens, cfg.log_inputs, args.artifact) == ("127.0.0.1", 8000, 32, 4096, False, ["a=x", "y"])


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


# --------------------------------------------------------------------------------------------------


def _concurrently(url: str, bodies: list[Any]) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """POST every body at once (released by a barrier); bytes bodies are sent as they are."""
    results: dict[int, tuple[int, dict[str, Any], dict[str, str]]] = {}
    barrier = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        raw = bodies[i] if isinstance(bodies[i], bytes) else json.dumps(bodies[i]).encode()
        barrier.wait()
        results[i] = call(f"{url}/v1/predict", raw=raw, method="POST")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(bodies))]

