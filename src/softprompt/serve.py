"""Serve (`softprompt serve`): many published prompts on one frozen base model over HTTP, micro-batched.

    softprompt serve --artifact s3://bucket/registry/support-intent/smollm2-135m/champion \\
                     --artifact sentiment=runs/sst2/artifact --endpoint-url http://minio:9000

    GET  /healthz      {"ok": true, "model": ..., "prompts": [...], "requests": n, "rows": n, "batches": n}
    GET  /v1/prompts   {"prompts": [{"name", "task", "kind", "labels", "version", "num_virtual_tokens", ...}]}
    POST /v1/predict   {"prompt": NAME, "text": ...} or {"inputs": [{"prompt": NAME, "text": ...}, ...]}
                       -> {"predictions": [{"prompt", "text", "label", "scores"} or {..., "generated"}]}

One batching thread owns the model. Request threads only parse and validate, queue their rows and
wait; the batcher takes what has queued, up to `max_batch` rows or until the oldest row has waited
`max_wait_ms`, and runs one mixed `predict_rows` call, so rows of different prompts from different
clients share forward passes. Running the model from every request thread instead would make the
threads contend for the same cores and pay one small, inefficient forward per request.

Standard library only (`http.server`): no authentication and no TLS, so it binds to 127.0.0.1 by
default; put it behind a proxy that has both before exposing it.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from softprompt.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only when a server starts, so `softprompt --help` stays fast
    from softprompt.predict import Prediction, PromptTable

log = logging.getLogger("softprompt.serve")

ROUTES = "GET /healthz, GET /v1/prompts, POST /v1/predict"


@dataclass(frozen=True)
class ServeConfig:
    """How `softprompt serve` listens and batches."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: the service has no authentication of its own."""
    port: int = 8080
    """TCP port; 0 picks a free one (tests, benchmarks)."""
    max_batch: int = 32
    """Most rows per forward pass. Larger batches raise throughput under load and memory use."""
    max_wait_ms: float = 10.0
    """How long the oldest queued row waits for others to join its batch. The trade-off: a lone
    request pays up to this much extra latency; under load, batches fill before it expires."""
    max_request_rows: int = 256
    """Most inputs one request may carry; larger requests get a 400 (split them)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; larger ones get a 413."""
    request_timeout_s: float = 120.0
    """A request whose rows are not predicted within this time gets a 503."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port}: use 0-65535 (0 picks a free port)")
        if self.max_batch < 1:
            problems.append(f"--max-batch {self.max_batch}: use 1 or more rows")
        if not 0 <= self.max_wait_ms <= 10_000:
            problems.append(f"--max-wait-ms {self.max_wait_ms}: use 0-10000 (0 disables waiting for company)")
        if self.max_request_rows < 1:
            problems.append(f"--max-request-rows {self.max_request_rows}: use 1 or more")
        if self.max_body_bytes < 1024:
            problems.append(f"max_body_bytes {self.max_body_bytes}: use at least 1024")
        if self.request_timeout_s <= 0:
            problems.append(f"request_timeout_s {self.request_timeout_s}: use a positive number of seconds")
        if problems:
            raise ConfigError("invalid serve settings: " + "; ".join(problems))


class RequestError(Exception):
    """A request the client must fix: answered with `status` and a message naming the field."""

    def __init__(self, message: str, field: str | None = None, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class PromptServer:
    """The HTTP service over one `PromptTable`; `start()` serves in background threads, `stop()` drains.

    Use as a context manager in tests and benchmarks; `run` adds signal handling for the CLI.
    """

    def __init__(self, table: PromptTable, cfg: ServeConfig = ServeConfig(), artifacts: dict[str, str] | None = None) -> None:
        self.table = table
        self.cfg = cfg
        self.prompts = describe_prompts(table, artifacts or {})
        self.batcher = MicroBatcher(table, cfg.max_batch, cfg.max_wait_ms / 1000)
        self.started = time.monotonic()
        self._httpd = _HTTPServer((cfg.host, cfg.port), _Handler)
        self._httpd.service = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="softprompt-http", daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:8080` (the real port when the config asked for 0)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> PromptServer:
        """Start the batching thread and the HTTP accept loop; returns self."""
        self.batcher.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, then stop the batcher."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()  # joins the request threads (daemon_threads is off)
        self.batcher.close()

    def health(self) -> dict[str, Any]:
        """The `/healthz` body; `ok` is false (and the status 503) once the batching thread is gone."""
        return {
            "ok": self.batcher.alive,
            "model": self.table.loaded.identity.get("name"),
            "device": str(self.table.loaded.device),
            "prompts": sorted(self.table.prompts),
            "uptime_s": round(time.monotonic() - self.started, 1),
            **self.batcher.stats(),
        }

    def predict(self, body: bytes) -> dict[str, Any]:
        """The `/v1/predict` answer for a raw request body (raises RequestError for bad requests)."""
        rows = parse_request(body, sorted(self.table.prompts), self.cfg.max_request_rows)
        preds = self.batcher.submit(rows, self.cfg.request_timeout_s)
        return {"predictions": [p.to_dict() for p in preds]}

    def __enter__(self) -> PromptServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(table: PromptTable, cfg: ServeConfig, artifacts: dict[str, str] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully (requests in flight are answered)."""
    stop = threading.Event()
    server = PromptServer(table, cfg, artifacts)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        names = ", ".join(f"{p['name']} ({p['task']}, {p['version'] or 'local'})" for p in server.prompts)
        print(f"serving {len(server.prompts)} prompts on {table.loaded.identity.get('name')}: {names}", flush=True)
        print(f"listening on {server.url} ({ROUTES}); Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down: finishing requests in flight", flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_request(body: bytes, prompts: Sequence[str], max_rows: int) -> list[tuple[str, str]]:
    """`(prompt, text)` rows from a `/v1/predict` body, or a RequestError naming the bad field.

    A request without "prompt" uses the only loaded prompt; with several loaded, "prompt" is required.
    """
    example = '{"prompt": "NAME", "text": "..."} or {"inputs": [{"prompt": "NAME", "text": "..."}]}'
    if not body.strip():
        raise RequestError(f"the request body is empty; send JSON such as {example}", "body")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the body is not JSON ({exc}); send {example}", "body") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body is a JSON {type(data).__name__}, not an object; send {example}", "body")
    if "inputs" not in data:
        return [_row(data, "", prompts)]
    items = data["inputs"]
    if set(data) - {"inputs"}:
        raise RequestError(f"give either 'inputs' or 'prompt' and 'text', not both (got fields {sorted(data)})", "inputs")
    if not isinstance(items, list) or not items:
        raise RequestError(f"'inputs' must be a non-empty list of objects (got {type(items).__name__} {items!r:.60})", "inputs")
    if len(items) > max_rows:
        raise RequestError(f"'inputs' has {len(items)} rows; at most {max_rows} per request (--max-request-rows): split it", "inputs")
    return [_row(item, f"inputs[{i}].", prompts) for i, item in enumerate(items)]


def describe_prompts(table: PromptTable, artifacts: dict[str, str]) -> list[dict[str, Any]]:
    """The `/v1/prompts` entries: name, task, kind, labels, registry version and where it came from."""
    out = []
    for name, p in sorted(table.prompts.items()):
        manifest = _read_json(Path(p.source) / "MANIFEST.json")  # registry versions carry one
        out.append({
            "name": name,
            "task": p.cfg.task.name,
            "kind": p.cfg.task.kind,
            "labels": list(p.verbalizer.labels) if p.verbalizer is not None else None,
            "version": manifest.get("version"),
            "metric": manifest.get("metric"),
            "num_virtual_tokens": int(p.embeds.shape[0]),
            "ensemble_members": len(p.members),
            "artifact": artifacts.get(name, p.source),
        })
    return out


# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    rows: list[tuple[str, str]]
    queued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Prediction] | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Collects queued requests into mixed batches and runs them on one thread (the model's owner)."""

    def __init__(self, table: PromptTable, max_batch: int, max_wait_s: float) -> None:
        self.table, self.max_batch, self.max_wait_s = table, max_batch, max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="softprompt-batcher", daemon=True)
        self._closed = False
        self._counts = {"requests": 0, "rows": 0, "batches": 0}

    def start(self) -> None:
        """Start the batching thread."""
        self._thread.start()

    def submit(self, rows: list[tuple[str, str]], timeout_s: float) -> list[Prediction]:
        """Queue `rows` and wait for their predictions (in order)."""
        if self._closed:
            raise RequestError("the server is shutting down; retry on another replica", status=HTTPStatus.SERVICE_UNAVAILABLE)
        job = _Job(rows)
        self._queue.put(job)
        if not job.done.wait(timeout_s):
            raise RequestError(f"no prediction within {timeout_s:g}s; the server is overloaded, retry later", status=HTTPStatus.SERVICE_UNAVAILABLE)
        if job.error is not None:
            raise RequestError(f"prediction failed: {job.error}", status=HTTPStatus.INTERNAL_SERVER_ERROR)
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    @property
    def alive(self) -> bool:
        """True while the batching thread runs."""
        return self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Requests, rows and forward batches (`predict_rows` calls) served so far."""
        return dict(self._counts)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, n = [first], len(first.rows)
            deadline = first.queued + self.max_wait_s  # counted from arrival: time queued behind a busy model counts
            while n < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if time.monotonic() < deadline else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                n += len(job.rows)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        from softprompt.predict import predict_rows

        rows = [row for job in jobs for row in job.rows]
        try:
            preds = predict_rows(self.table, rows, batch_size=self.max_batch)
        except Exception as exc:  # answer every waiting client, keep serving
            log.exception("prediction failed for a batch of %d rows", len(rows))
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        self._counts["requests"] += len(jobs)
        self._counts["rows"] += len(rows)
        self._counts["batches"] += 1
        start = 0
        for job in jobs:
            job.result = preds[start : start + len(job.rows)]
            start += len(job.rows)
            job.done.set()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() then waits for requests in flight: a graceful stop
    service: PromptServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 30  # a client that stalls mid-request cannot hold a thread (or shutdown) forever
    server_version = "softprompt"

    def do_GET(self) -> None:
        service = self.server.service
        path = urlsplit(self.path).path
        if path == "/healthz":
            health = service.health()
            self._send(HTTPStatus.OK if health["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, health)
        elif path == "/v1/prompts":
            self._send(HTTPStatus.OK, {"prompts": service.prompts})
        else:
            self._not_found("GET")

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/v1/predict":
            self._not_found("POST")
            return
        try:
            self._send(HTTPStatus.OK, self.server.service.predict(self._body()))
        except RequestError as exc:
            self._send(exc.status, {"error": str(exc), "field": exc.field})

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("send the body with a Content-Length header", "Content-Length", HTTPStatus.LENGTH_REQUIRED)
        limit = self.server.service.cfg.max_body_bytes
        if int(length) > limit:
            raise RequestError(f"the body is {length} bytes; at most {limit} per request: split it", "body", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(int(length))

    def _not_found(self, method: str) -> None:
        self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {method} {self.path}; routes: {ROUTES}", "field": "path"})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _row(item: Any, where: str, prompts: Sequence[str]) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise RequestError(f"{where.rstrip('.') or 'the body'} must be an object with 'prompt' and 'text' (got {type(item).__name__})", where.rstrip(".") or "body")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        got = "it is missing" if "text" not in item else f"got {text!r:.60}"
        raise RequestError(f"{where}text must be a non-empty string ({got}; fields: {sorted(item)})", f"{where}text")
    name = item.get("prompt")
    if name is None and len(prompts) == 1:
        name = prompts[0]
    if name not in prompts:
        got = "it is missing" if name is None else f"unknown prompt {name!r}"
        raise RequestError(f"{where}prompt: {got}; loaded prompts: {list(prompts)}", f"{where}prompt")
    return str(name), text


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
