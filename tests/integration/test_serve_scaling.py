"""Ray Serve autoscaling of the prompt deployment (1 -> 2 -> 1 replicas) under load, with a prediction
log whose store fails every write (a bucket that does not exist on moto's server): no request notices."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve import TOKEN, build_artifacts, call, start_app

from softprompt.serve import ServeConfig

CFG = ServeConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=3,
                  max_batch=4, max_wait_ms=5, replica_cpus=0.5, shutdown_s=3, max_ongoing_requests=8,
                  prediction_log="s3://no-such-bucket/registry")


@pytest.fixture(scope="module")
def url(ray_session: dict[str, str], s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    artifacts: dict[str, Path] = build_artifacts(tmp_path_factory.mktemp("serve-scaling"))
    try:
        yield start_app([f"{n}={p}" for n, p in artifacts.items() if n != "echo"], CFG, token=TOKEN, s3_endpoint=s3_endpoint)
    finally:
        serve.shutdown()


def _running() -> int:
    from ray import serve

    deployment = serve.status().applications["softprompt"].deployments["prompts-tiny"]
    return int(deployment.replica_states.get("RUNNING", 0))


def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_replicas_scale_up_under_load_and_back_down(url: str) -> None:
    assert _running() == 1
    stop = threading.Event()
    statuses: list[int] = []

    def client(i: int) -> None:
        while not stop.is_set():
            statuses.append(call(f"{url}/v1/predict", {"inputs": [{"prompt": "intent", "text": f"load {i} {k}"} for k in range(4)]})[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        assert _until(lambda: _running() == 2, 60), "no second replica within 60 s of load"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}
    assert _until(lambda: _running() == 1, 60), "still two replicas 60 s after the load stopped"


def test_a_failing_log_store_never_fails_a_request(url: str) -> None:
    for k in range(3):
        status, body, _ = call(f"{url}/v1/predict", {"prompt": "urgency", "text": f"help {k}"})
        assert status == 200 and len(body["predictions"][0]["id"]) == 24
    assert _until(lambda: call(f"{url}/healthz")[1]["prediction_log"]["urgency"]["failed_flushes"] > 0, 30)
    assert call(f"{url}/healthz")[1]["prediction_log"]["urgency"]["written"] == 0
