"""`softprompt serve` as people run it: a process joined to a Ray cluster, stopped by SIGTERM within its
deadline even while a slow client holds a connection open (98c578d's server was still alive after 75 s)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error

import pytest
from test_serve import build_artifacts, call, free_port


def test_sigterm_stops_within_the_deadline_despite_a_slow_client(ray_session: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    import ray

    artifacts = build_artifacts(tmp_path_factory.mktemp("serve-cli"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "softprompt.cli", "serve", "--artifact", f"intent={artifacts['intent']}", "--port", str(port),
           "--ray-address", ray.get_runtime_context().gcs_address, "--shutdown-s", "3", "--replica-cpus", "0.5", "--prediction-log", "off"]
    env = {**os.environ, "SOFTPROMPT_SERVE_TOKEN": "cli-token"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    slow = socket.socket()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if call(f"{url}/v1/predict", {"text": "hi"}, token="cli-token", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)  # refused, or Serve's proxy does not know the route yet (its own 404)
        else:
            pytest.fail(f"softprompt serve never answered: {proc.communicate(timeout=30)[0][-3000:] if proc.poll() is not None else 'still starting'}")
        assert call(f"{url}/v1/predict", {"text": "hi"}, token=None)[0] == 401  # the token from the environment guards it
        second = subprocess.run([*cmd[:cmd.index("--port") + 1], str(free_port()), *cmd[cmd.index("--port") + 2:]],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "already runs an application named 'softprompt'" in second.stdout + second.stderr, second
        slow.connect(("127.0.0.1", port))
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"te")  # and then nothing
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        took = time.monotonic() - started
    finally:
        slow.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            from ray import serve

            serve.shutdown()  # what the killed process left on the shared Ray
    assert proc.returncode == 0, out[-3000:]
    assert took < 3 + 5 + 15, took  # serve.shutdown_s, the shutdown's own margin, Ray's disconnect
    assert "listening on" in out and "shutting down" in out
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        call(f"{url}/healthz", timeout=5)
