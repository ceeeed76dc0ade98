"""`softprompt serve` on Ray Serve: one deployment per base model, its prompts multiplexed onto it.

    softprompt serve --artifact s3://bucket/registry/support-intent/smollm2-135m/champion \\
                     --artifact sentiment=runs/sst2/artifact --s3-endpoint http://minio:9000 [--ray-address auto]

    GET  /healthz      {"ok": true, "model", "prompts", "versions", "requests", "rows", "batches", ...}
    GET  /v1/prompts   {"prompts": [{"name", "task", "kind", "labels", "version", "num_virtual_tokens", ...}]}
    POST /v1/predict   {"prompt": NAME, "text": ...} or {"inputs": [{"prompt": NAME, "text": ...}, ...]}
                       -> {"predictions": [{"id", "version", "token", "prompt", "text", "label", "scores"} or {..., "generated"}]}
    POST /v1/feedback  {"prompt": NAME, "token", "text", "kind": "correction|up|down", "label"} or {"feedback": [...]}
                       -> {"accepted": [{"row", "id", "prediction_id", "conflict"}], "rejects": [{"row", "field", "value", "reason"}]}

A replica holds the base model once and every prompt (a few KB each). Each row of a request goes to
the replica's batcher (`serve.batcher`: while a batch runs, rows queue and go together next), so
rows of different prompts and clients share one forward pass (each row gathers its own prompt,
`predict.predict_rows`), a batch bounded by `serve.max_batch` rows and `serve.max_batch_tokens`
padded positions (`Predictor.batch_size`). Why not `@serve.multiplexed`:
it routes each model id to replicas holding it and loads one model per id, so a batch would hold one
prompt; here every replica holds every prompt and a batch mixes them, which is the point.

Backpressure: Ray's proxy queues at most `serve.max_queued_requests` and a replica holds at most
`serve.max_queued_rows` rows; past either, 503 with Retry-After. A request has a deadline
(`serve.request_timeout_s`); when it passes, or the client disconnects (Ray cancels the request),
its queued rows are dropped before they reach the model. The forward pass runs in a thread, so the
replica's event loop keeps parsing, refusing and cancelling meanwhile. Aliases are re-read every
`serve.refresh_s` (`serve.live`). Metrics (`softprompt_serve_*`) go to Ray's Prometheus endpoint
and dashboard, beside Ray Serve's own request metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from softprompt.serve.batcher import Batcher
from softprompt.serve.config import TOKEN_ENV, ServeConfig
from softprompt.serve.feedback import FEEDBACK_SECRET_ENV, FeedbackDesk
from softprompt.serve.live import log_location
from softprompt.serve.predictor import Predictor, Row
from softprompt.serve.requests import ROUTES, RequestError, describe_prompt, parse_length, parse_request

log = logging.getLogger("softprompt.serve")

APP_NAME = "softprompt"
WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray's setting (read by a raylet this process starts) for its workers' nice value: 15 by default,
which puts a serving replica behind every other process on its machine, the clients included."""
METHODS = {"/healthz": ("GET",), "/v1/prompts": ("GET",), "/v1/predict": ("POST",), "/v1/feedback": ("POST",)}


@serve.deployment(name="prompts")
class PromptDeployment:
    """A replica: the base model, every prompt, the batcher, the prediction logs and the HTTP routes."""

    def __init__(self, specs: list[str], cfg: ServeConfig, model: str | None, s3_endpoint: str | None,
                       token_sha256: str | None, log_uri: str | None, feedback_secret: bytes | None = None) -> None:
        from ray.serve import metrics

        from softprompt.serve.live import LivePrompts

        self.cfg, self.token_sha256 = cfg, token_sha256
        self.live = LivePrompts(specs, model=model, s3_endpoint=s3_endpoint)
        self.m_requests = metrics.Counter("softprompt_serve_requests", description="Predict requests by HTTP status.", tag_keys=("status",))
        self.m_rows = metrics.Histogram("softprompt_serve_batch_rows", description="Rows per forward batch.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.m_positions = metrics.Histogram("softprompt_serve_batch_positions", description="Padded token positions per forward batch.",
                                             boundaries=[64, 256, 1024, 2048, 4096, 8192, 16384, 32768])
        self.m_dropped = metrics.Counter("softprompt_serve_rows_dropped", description="Queued rows dropped (deadline passed or client gone).")
        self.m_log = metrics.Counter("softprompt_serve_prediction_log", description="Prediction-log records written or dropped.", tag_keys=("event",))
        logs = _open_logs(log_uri, s3_endpoint, cfg, self.live, lambda event, n: self.m_log.inc(n, tags={"event": event}))
        self.predictor = Predictor(self.live, cfg, logs, on_batch=self._observe, feedback_secret=feedback_secret if log_uri else None)
        self.desk = _feedback_desk(log_uri, s3_endpoint, cfg, self.live, feedback_secret)
        self.queued = 0
        self.batcher: Batcher[Row, dict[str, Any] | RequestError] = Batcher(
            self.predictor.run, self.predictor.batch_size, max_size=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000)
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_loop, name="softprompt-refresh", daemon=True).start()

    async def __call__(self, request: Request) -> Response:
        """Route one HTTP request; every answer is JSON, errors name the field."""
        path, method = request.url.path, request.method
        root = str(request.scope.get("root_path") or "")  # the application's route prefix, when not "/"
        path = (path[len(root):] if root and path.startswith(root) else path).rstrip("/") or "/"
        allowed = METHODS.get(path)
        if allowed is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}; routes: {ROUTES}", "field": "path"})
        if method not in allowed:
            return _json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes {', '.join(allowed)}, not {method}; routes: {ROUTES}", "field": "method"},
                         {"Allow": ", ".join(allowed)})
        if path != "/healthz" and not self._authorized(request.headers.get("authorization", "")):
            return _json(HTTPStatus.UNAUTHORIZED, {"error": "send the bearer token: Authorization: Bearer <token>", "field": "Authorization"},
                         {"WWW-Authenticate": "Bearer"})
        if path == "/healthz":
            return _json(HTTPStatus.OK, self.health())
        if path == "/v1/prompts":
            return _json(HTTPStatus.OK, {"prompts": self.prompts()})
        try:
            answer = await (self._predict(request) if path == "/v1/predict" else self._feedback(request))
        except RequestError as exc:
            self.m_requests.inc(tags={"status": str(exc.status)})
            headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
            return _json(exc.status, exc.body(), headers)
        self.m_requests.inc(tags={"status": "200"})
        return _json(HTTPStatus.OK, answer)

    def health(self) -> dict[str, Any]:
        """The `/healthz` body."""
        loaded = self.live.table.loaded
        served = self.live.served
        plogs = {task: plog.stats() for task, plog in self.predictor.logs.items()}
        return {"ok": True, "model": loaded.identity.get("name"), "device": str(loaded.device), "prompts": sorted(served),
                "versions": {n: s.version for n, s in sorted(served.items())}, "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "queued_rows": self.queued, **self.predictor.counts, "prediction_log": plogs}

    def prompts(self) -> list[dict[str, Any]]:
        """The `/v1/prompts` entries."""
        out = []
        for name, s in sorted(self.live.served.items()):
            p = s.prompt
            out.append(describe_prompt(name, p.cfg.task.name, p.cfg.task.kind, list(p.verbalizer.labels) if p.verbalizer else None,
                                       s.version, s.manifest, int(p.embeds.shape[0]), len(p.members), s.ref))
        return out

    async def _predict(self, request: Request) -> dict[str, Any]:
        cfg = self.cfg
        parse_length(request.headers.get("content-length"), cfg.max_body_bytes)
        body = await _read_body(request, cfg.max_body_bytes)
        rows = self.predictor.prepare(parse_request(body, sorted(self.live.served), cfg.max_request_rows), time.monotonic() + cfg.request_timeout_s)
        if self.queued + len(rows) > cfg.max_queued_rows:
            raise RequestError(f"this replica holds {self.queued} rows (serve.max_queued_rows {cfg.max_queued_rows}); retry later",
                               None, HTTPStatus.SERVICE_UNAVAILABLE, retry_after_s=cfg.retry_after_s)
        self.predictor.counts["requests"] += 1
        self.queued += len(rows)
        calls = [asyncio.ensure_future(self.batcher.submit(r)) for r in rows]
        try:
            done = await asyncio.wait_for(asyncio.gather(*calls), timeout=max(0.0, rows[0].deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestError(f"no prediction within {cfg.request_timeout_s:g}s (serve.request_timeout_s); the server is busy, retry later",
                               None, HTTPStatus.SERVICE_UNAVAILABLE, retry_after_s=cfg.retry_after_s) from None
        finally:
            for call in calls:  # a client gone or a deadline passed: rows still queued are dropped
                call.cancel()  # (a cancelled request has cancelled them already, through gather)
                if call.cancelled():
                    self.m_dropped.inc()
                    self.predictor.counts["dropped"] += 1
            self.queued -= len(rows)
        for answer in done:
            if isinstance(answer, RequestError):
                raise answer
        return {"predictions": done}

    async def _feedback(self, request: Request) -> dict[str, Any]:
        if self.desk is None:
            raise RequestError("feedback is off on this server: it is stored in the registry beside the prediction log; serve a registry "
                               "version or alias, or set --prediction-log URI", "path", HTTPStatus.NOT_FOUND)
        parse_length(request.headers.get("content-length"), self.cfg.max_body_bytes)
        body = await _read_body(request, self.cfg.max_body_bytes)
        client = request.client.host if request.client else "unknown"
        answer: dict[str, Any] = await asyncio.to_thread(self.desk.submit, body, client)
        return answer

    def _observe(self, rows: int, positions: int) -> None:
        self.m_rows.observe(rows)
        self.m_positions.observe(positions)

    def _authorized(self, header: str) -> bool:
        if self.token_sha256 is None:
            return True
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "replace")).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token_sha256)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.cfg.refresh_s):
            self.live.refresh()

    def __del__(self) -> None:
        self._stop.set()
        self.predictor.close(timeout_s=min(5.0, self.cfg.shutdown_s / 2))


def build_app(specs: Sequence[str], cfg: ServeConfig, *, model: str | None = None, s3_endpoint: str | None = None,
              token: str | None = None, model_name: str = "model", feedback_secret: bytes | None = None) -> Any:
    """The Ray Serve application: one deployment (named after the base model) over `specs`.

    Feedback tokens are signed with `feedback_secret`, else `$SOFTPROMPT_FEEDBACK_SECRET`, else a
    secret made now (tokens then verify only until the application is redeployed). The replicas
    receive it as an argument, as Ray stores a deployment's arguments."""
    options: dict[str, Any] = {
        "name": "prompts-" + (re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")[-40:] or "model"),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "graceful_shutdown_timeout_s": cfg.shutdown_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas, "initial_replicas": cfg.min_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
            "metrics_interval_s": 1.0, "look_back_period_s": max(2.0, min(10.0, cfg.upscale_delay_s)),
        }
    else:
        options["num_replicas"] = cfg.min_replicas
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if token else None  # the replicas never hold the token
    secret = feedback_secret or os.environ.get(FEEDBACK_SECRET_ENV, "").encode() or secrets.token_bytes(32)
    return PromptDeployment.options(**options).bind(  # type: ignore[attr-defined]
        list(specs), cfg, model, s3_endpoint, token_sha256, log_location(specs, cfg.prediction_log), secret)


def app_builder(args: dict[str, Any]) -> Any:
    """The application for a Serve config file (KubeRay's RayService `serveConfigV2`,
    `import_path: softprompt.ray.serving:app_builder`); `args`: `artifacts` (list of specs), `s3_endpoint`,
    `model`, and `serve` (ServeConfig fields). The bearer token comes from `SOFTPROMPT_SERVE_TOKEN`.

    Raises:
        ConfigError: an unknown key, naming the valid ones, or invalid settings.
    """
    from dataclasses import fields

    from softprompt.errors import ConfigError

    unknown = sorted(set(args) - {"artifacts", "s3_endpoint", "model", "serve"})
    valid = {f.name for f in fields(ServeConfig)}
    unknown += sorted(f"serve.{k}" for k in set(args.get("serve") or {}) - valid)
    if unknown or not args.get("artifacts"):
        raise ConfigError(f"serveConfigV2 args: unknown keys {unknown} or no 'artifacts' list; valid: artifacts, s3_endpoint, model, "
                          f"serve.{{{', '.join(sorted(valid))}}}")
    specs = [str(a) for a in args["artifacts"]]
    cfg = ServeConfig(**(args.get("serve") or {}))
    model = args.get("model")
    return build_app(specs, cfg, model=model, s3_endpoint=args.get("s3_endpoint"), token=os.environ.get(TOKEN_ENV) or None,
                     model_name=str(model or _model_name(specs)))


def _model_name(specs: Sequence[str]) -> str:
    """The base-model segment of the first registry reference: names the deployment without loading anything."""
    from softprompt.predict import split_spec

    parts = split_spec(specs[0])[1].rstrip("/").split("/")
    return parts[-2] if len(parts) >= 3 else "model"


def run(specs: Sequence[str], cfg: ServeConfig, *, model: str | None = None, s3_endpoint: str | None = None,
        ray_address: str | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C on a local Ray this starts (or the cluster at `ray_address`);
    then delete the application, its replicas given `serve.shutdown_s` to answer what they hold.

    On a cluster where Ray Serve already runs, the application joins it (on Serve's own address,
    printed) and only the application is deleted at the end; Serve itself stays for its other users.

    Raises:
        ConfigError: the cluster's Serve already runs an application of this name (another
            `softprompt serve`), which this would silently replace.
    """
    import ray

    from softprompt.config import RayConfig
    from softprompt.errors import ConfigError
    from softprompt.predict import resolve_prompts
    from softprompt.ray.cluster import init_ray
    from softprompt.ray.internals import serve_http_options

    refs = resolve_prompts(specs, s3_endpoint=s3_endpoint)  # a bad reference fails here, before Ray starts
    token = os.environ.get(TOKEN_ENV) or None
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")  # a local Ray's replicas at normal priority (Ray's default nices workers to 15)
    print(init_ray(RayConfig(), ray_address, tuning=False), flush=True)
    existing = serve_http_options()
    if existing is not None and APP_NAME in serve.status().applications:
        ray.shutdown()
        raise ConfigError(f"Ray Serve on this cluster already runs an application named {APP_NAME!r} (another softprompt serve, "
                          f"http://{existing['host']}:{existing['port']}); stop that one first (Ctrl-C it, or `serve shutdown` / "
                          f"`serve.delete({APP_NAME!r})`), or serve these prompts from it")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s, "keep_alive_timeout_s": 5})
        app = build_app(specs, cfg, model=model, s3_endpoint=s3_endpoint, token=token, model_name=model or refs[0].cfg.model.name)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        names = ", ".join(f"{r.name} ({r.cfg.task.name})" for r in refs)
        where = log_location(specs, cfg.prediction_log)
        print(f"serving {len(refs)} prompts: {names}; prediction log: {where or 'off'}; bearer token: {'required' if token else 'none'}", flush=True)
        host, port = (existing["host"], existing["port"]) if existing else (cfg.host, cfg.port)
        joined = "" if (host, port) == (cfg.host, cfg.port) else f" (Ray Serve already ran on this cluster: serve.port {cfg.port} does not apply)"
        print(f"listening on http://{host}:{port}{joined} ({ROUTES}); Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        print(f"shutting down: requests in flight get {cfg.shutdown_s:g}s", flush=True)
    finally:
        _shutdown(cfg.shutdown_s, app_only=existing is not None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()


def _shutdown(deadline_s: float, *, app_only: bool = False) -> None:
    """`serve.shutdown()` (or, on a Serve this did not start, deleting our application) bounded by a
    deadline: a stuck client or replica cannot keep us alive."""
    stop = (lambda: serve.delete(APP_NAME)) if app_only else serve.shutdown
    done = threading.Thread(target=stop, name="serve-shutdown", daemon=True)
    done.start()
    done.join(deadline_s + 5)
    if done.is_alive():
        log.warning("Ray Serve did not shut down within %.0fs; leaving it to Ray's shutdown", deadline_s + 5)


def _feedback_desk(uri: str | None, s3_endpoint: str | None, cfg: ServeConfig, live: Any, secret: bytes | None) -> FeedbackDesk | None:
    if uri is None or secret is None:
        return None
    from softprompt.registry.store import open_store

    def prompts() -> dict[str, tuple[str, list[str]]]:
        return {name: (s.prompt.cfg.task.name, list(s.prompt.verbalizer.labels) if s.prompt.verbalizer else [])
                for name, s in live.served.items()}

    return FeedbackDesk(open_store(uri, endpoint_url=s3_endpoint), prompts, secret, per_minute=cfg.feedback_per_minute,
                        max_items=cfg.max_request_rows)


def _open_logs(uri: str | None, s3_endpoint: str | None, cfg: ServeConfig, live: Any, on_count: Any) -> dict[str, Any]:
    if uri is None:
        return {}
    from softprompt.predlog import PredictionLog
    from softprompt.registry.store import open_store

    store = open_store(uri, endpoint_url=s3_endpoint)
    tasks = sorted({s.prompt.cfg.task.name for s in live.served.values()})
    return {t: PredictionLog(store, task=t, log_inputs=cfg.log_inputs, on_count=on_count) for t in tasks}


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the body is over {limit} bytes (serve.max_body_bytes): split it", "body", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError("the client disconnected", "body") from None
    return b"".join(chunks)


def _json(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(payload, status_code=int(status), headers=headers)
