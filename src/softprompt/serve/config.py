"""`ServeConfig`: how `softprompt serve` listens, batches, refreshes, logs and scales (one frozen dataclass).

Every field is a `serve.<name>` setting and a `--<name>` flag of `softprompt serve` (dashes for
underscores); the docstring under each field names its trade-off.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from softprompt.errors import ConfigError

TOKEN_ENV = "SOFTPROMPT_SERVE_TOKEN"
"""The environment variable holding the bearer token (a flag's value would show in `ps`)."""


@dataclass(frozen=True)
class ServeConfig:
    """How `softprompt serve` listens, batches, refreshes versions, logs predictions and scales."""

    host: str = "127.0.0.1"
    """Interface Ray Serve's HTTP proxy binds. Loopback by default; set a bearer token
    (`SOFTPROMPT_SERVE_TOKEN`) before binding 0.0.0.0."""
    port: int = 8000
    """TCP port of the HTTP proxy."""
    max_batch: int = 32
    """Most rows per forward pass. Larger batches raise throughput under load and memory use."""
    max_batch_tokens: int = 8192
    """Most token positions per forward pass, counted padded (rows x the longest prompt + input):
    one long row cannot make a batch of 32 cost 32 long rows."""
    max_row_tokens: int = 512
    """Most input tokens one row may have (template included); longer rows get a 413 naming this
    limit. The model's context, less the longest prompt, caps it further."""
    max_wait_ms: float = 10.0
    """How long the first queued row waits for others to join its batch: a lone request pays up
    to this much latency; under load batches fill before it expires."""
    max_request_rows: int = 256
    """Most inputs one request may carry; larger requests get a 400 (split them)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; larger ones get a 413."""
    request_timeout_s: float = 30.0
    """A request's deadline: its rows still queued then are dropped, and it gets a 503."""
    max_queued_rows: int = 2048
    """Rows a replica holds (queued or running) before it answers 503 with Retry-After."""
    max_ongoing_requests: int = 128
    """Requests Ray sends one replica at a time; must be at least `max_batch`."""
    max_queued_requests: int = 512
    """Requests Ray's proxy queues for the deployment before answering 503 with Retry-After."""
    retry_after_s: int = 1
    """The Retry-After header of a 503 (seconds)."""
    refresh_s: float = 15.0
    """How often a replica re-reads each alias (`champion`) and loads a moved pointer's version."""
    log_inputs: bool = True
    """Whether the prediction log keeps each input text (false: the record has no input)."""
    prediction_log: str = "auto"
    """Where predictions are logged: `auto` (the registry the first registry artifact came from;
    none for a run folder), `off`, or a registry URI (a folder or s3://BUCKET/PREFIX)."""
    feedback_per_minute: int = 60
    """Feedback requests (`POST /v1/feedback`) one client address may send a replica a minute,
    bursts up to as many; more get 429 with Retry-After (one client cannot flood the store)."""
    min_replicas: int = 1
    """Fewest replicas of the deployment."""
    max_replicas: int = 1
    """Most replicas; above `min_replicas`, Ray Serve autoscales between the two."""
    target_ongoing_requests: float = 16.0
    """Autoscaling target: requests in flight per replica."""
    upscale_delay_s: float = 10.0
    """How long load must stay above the target before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long load must stay below the target before a replica is removed."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves for each replica (its model's forward passes)."""
    shutdown_s: float = 15.0
    """Deadline for a graceful shutdown (SIGTERM): requests in flight get this long, then replicas
    are killed."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.port <= 65535:
            problems.append(f"serve.port {self.port}: use 1-65535")
        for name in ("max_batch", "max_batch_tokens", "max_row_tokens", "max_request_rows", "max_queued_rows",
                     "max_ongoing_requests", "max_queued_requests", "min_replicas", "max_replicas", "feedback_per_minute"):
            if getattr(self, name) < 1:
                problems.append(f"serve.{name} {getattr(self, name)}: use 1 or more")
        if self.max_row_tokens > self.max_batch_tokens:
            problems.append(f"serve.max_row_tokens {self.max_row_tokens}: at most serve.max_batch_tokens ({self.max_batch_tokens}), or one row could never be batched")
        if self.max_ongoing_requests < self.max_batch:
            problems.append(f"serve.max_ongoing_requests {self.max_ongoing_requests}: at least serve.max_batch ({self.max_batch}), or batches never fill")
        if not 0 <= self.max_wait_ms <= 10_000:
            problems.append(f"serve.max_wait_ms {self.max_wait_ms}: use 0-10000 (0 disables waiting for company)")
        if self.max_body_bytes < 1024:
            problems.append(f"serve.max_body_bytes {self.max_body_bytes}: use at least 1024")
        for name in ("request_timeout_s", "refresh_s", "shutdown_s", "replica_cpus", "target_ongoing_requests"):
            if getattr(self, name) <= 0:
                problems.append(f"serve.{name} {getattr(self, name)}: use a positive number")
        if self.retry_after_s < 0 or self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            problems.append("serve.retry_after_s, serve.upscale_delay_s and serve.downscale_delay_s: use 0 or more")
        if self.max_replicas < self.min_replicas:
            problems.append(f"serve.max_replicas {self.max_replicas}: at least serve.min_replicas ({self.min_replicas})")
        if not self.prediction_log.strip():
            problems.append("serve.prediction_log '': use auto, off, or a registry URI")
        if problems:
            raise ConfigError("invalid serve settings: " + "; ".join(problems))

    @property
    def autoscaling(self) -> bool:
        """True when Ray Serve scales the deployment (max_replicas above min_replicas)."""
        return self.max_replicas > self.min_replicas


def flag(name: str) -> str:
    """The `softprompt serve` flag of a ServeConfig field: `max_batch` -> `--max-batch`."""
    if name not in {f.name for f in fields(ServeConfig)}:
        raise KeyError(name)
    return "--" + name.replace("_", "-")
