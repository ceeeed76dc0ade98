"""Launching Ray from the tune step: the KubeRay RayJob against a fake Kubernetes API, the Jobs API
path against a fake JobSubmissionClient, and the scratch-store hand-over of the tune step.

The fake Kubernetes API is an HTTP server on 127.0.0.1 that records the requests of the real
kubernetes client (configured with Configuration(host=...)) and answers the custom-object and pod
calls like an API server: create -> 201, create again -> 409 AlreadyExists, get -> the scripted
status transitions, delete -> 200, the submitter pod list and its log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from softprompt.config import JobConfig, load_config, with_values
from softprompt.errors import SoftpromptError
from softprompt.kubeflow import pods, rayjob, remote, steps
from softprompt.kubeflow.rayjob import (
    RayLaunchError,
    WorkerResources,
    build_rayjob,
    job_name,
    run_ray_job,
    run_rayjob,
)
from softprompt.outcome import TrainOutcome

REPO = Path(__file__).resolve().parents[2]
NS = "softprompt-dev"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"


@dataclass
class FakeKube:
    """Stored RayJobs, the statuses successive GETs return, and what the submitter pod logged."""

    statuses: list[dict[str, Any]] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    log: str = "driver: tuning...\ndriver: best trial accuracy=0.91\n"
    on_status: Callable[[dict[str, Any]], None] | None = None
    create_status: int | None = None
    ray_token: str = ""
    """The token in the Secret softprompt-ray-auth ("" = no such Secret)."""

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        if method == "POST" and path == RAYJOBS:
            if self.create_status:
                return self.create_status, _status_obj(self.create_status, "Forbidden"), "application/json"
            name = body["metadata"]["name"]
            if name in self.objects:
                return 409, _status_obj(409, "AlreadyExists", f'rayjobs.ray.io "{name}" already exists'), "application/json"
            self.objects[name] = body
            return 201, body, "application/json"
        if method == "GET" and path.startswith(RAYJOBS + "/"):
            name = path.rsplit("/", 1)[-1]
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            if self.on_status:
                self.on_status(status)
            return 200, {**self.objects[name], "status": status}, "application/json"
        if method == "DELETE" and path.startswith(RAYJOBS + "/"):
            name = path.rsplit("/", 1)[-1]
            if self.objects.pop(name, None) is None:
                return 404, _status_obj(404, "NotFound"), "application/json"
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}, "application/json"
        if method == "GET" and path == f"/api/v1/namespaces/{NS}/pods":
            name = query["labelSelector"].removeprefix("job-name=")
            pods = [{"metadata": {"name": f"{name}-x7k2p", "namespace": NS}}] if name in self.objects else []
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}, "application/json"
        if method == "GET" and path.startswith(f"/api/v1/namespaces/{NS}/pods/") and path.endswith("/log"):
            return 200, self.log, "text/plain"
        if method == "GET" and path == f"/api/v1/namespaces/{NS}/secrets/softprompt-s3":
            data = {k: base64.b64encode(v.encode()).decode() for k, v in (("AWS_ACCESS_KEY_ID", "pipeline"), ("AWS_SECRET_ACCESS_KEY", "s3cr3t"))}
            return 200, {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "softprompt-s3"}, "data": data}, "application/json"
        if method == "GET" and path == f"/api/v1/namespaces/{NS}/secrets/softprompt-ray-auth" and self.ray_token:
            data = {"auth_token": base64.b64encode(self.ray_token.encode()).decode()}
            return 200, {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "softprompt-ray-auth"}, "data": data}, "application/json"
        return 404, _status_obj(404, "NotFound"), "application/json"


def _status_obj(code: int, reason: str, message: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}


@pytest.fixture()
def kube() -> Iterator[tuple[Any, FakeKube]]:
    """A kubernetes ApiClient pointed at a fake API server on 127.0.0.1."""
    from kubernetes import client

    fake = FakeKube()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            fake.requests.append((self.command, url.path, query, body))
            status, payload, kind = fake.handle(self.command, url.path, query, body)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        yield api, fake
    finally:
        api.close()
        server.shutdown()
        server.server_close()


RUNNING = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "rayClusterName": "softprompt-tune-abc-raycluster-x1"}
SUCCEEDED = {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}


def test_job_name_is_deterministic_and_a_dns_label() -> None:
    name = job_name("0b6a2bc4-1c0e-4a57-9d0c-8f7f2f1b5e21")
    assert name == job_name("0b6a2bc4-1c0e-4a57-9d0c-8f7f2f1b5e21") != job_name("another run")
    assert name.startswith("softprompt-tune-") and len(name) <= 30 and name.replace("-", "").isalnum() and name.islower()


def test_rayjob_spec_matches_the_infra_manifest() -> None:
    manifest = yaml.safe_load((REPO / "infra/kuberay/rayjob.yaml").read_text())
    body = build_rayjob("softprompt-tune", manifest["spec"]["entrypoint"], run_id="run-1",
                        resources=WorkerResources(num_workers=4, gpus=1, cpus=8, memory="48Gi"))
    assert body["apiVersion"] == manifest["apiVersion"] == "ray.io/v1" and body["kind"] == "RayJob"
    assert body["spec"] == manifest["spec"]  # same cluster, same lifecycle settings
    assert manifest["metadata"]["labels"].items() <= body["metadata"]["labels"].items()
    assert body["metadata"]["labels"]["softprompt.io/pipeline-run-id"] == "run-1"


def test_rayjob_resources_deadline_and_ttl_follow_the_parameters() -> None:
    body = build_rayjob("n", "python -m x", resources=WorkerResources(num_workers=2, gpus=0.5, cpus=4.5, memory="16Gi"),
                        active_deadline_seconds=3600, ttl_seconds_after_finished=120)
    spec = body["spec"]
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"], spec["shutdownAfterJobFinishes"]) == (3600, 120, True)
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 0, 2)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "4500m", "memory": "16Gi", "nvidia.com/gpu": 1}
    cpu_only = build_rayjob("n", "x", resources=WorkerResources(gpus=0))["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in cpu_only["template"]["spec"]["containers"][0]["resources"]["limits"]
    with pytest.raises(RayLaunchError, match="num_workers >= 1"):
        build_rayjob("n", "x", resources=WorkerResources(num_workers=0))


def test_creates_watches_until_succeeded_and_prints_the_submitter_log(kube: tuple[Any, FakeKube]) -> None:
    api, fake = kube
    fake.statuses = [{}, RUNNING, RUNNING, SUCCEEDED]
    lines: list[str] = []
    body = build_rayjob(job_name("run-a"), "python -m softprompt.kubeflow.remote --scratch s3://b/tmp/x", run_id="run-a")
    result = run_rayjob(body, NS, api_client=api, poll_seconds=0, echo=lines.append)
    assert (result.job_status, result.deployment_status, result.attached) == ("SUCCEEDED", "Complete", False)
    assert result.logs == fake.log
    method, path, _, sent = fake.requests[0]
    assert (method, path) == ("POST", RAYJOBS) and sent == body
    gets = [r for r in fake.requests if r[0] == "GET" and r[1].startswith(RAYJOBS)]
    assert len(gets) == 4 and all(r[1] == f"{RAYJOBS}/{body['metadata']['name']}" for r in gets)
    pods = [r for r in fake.requests if r[1] == f"/api/v1/namespaces/{NS}/pods"]
    assert pods[0][2]["labelSelector"] == f"job-name={body['metadata']['name']}"
    text = "\n".join(lines)
    assert "jobStatus=RUNNING" in text and "jobStatus=SUCCEEDED" in text and "best trial accuracy=0.91" in text
    assert text.count("jobStatus=RUNNING") == 1  # transitions, not every poll


def test_a_retried_step_reattaches_on_409(kube: tuple[Any, FakeKube]) -> None:
    api, fake = kube
    body = build_rayjob(job_name("run-b"), "python -m x", run_id="run-b")
    fake.objects[body["metadata"]["name"]] = body  # the first attempt created it
    fake.statuses = [RUNNING, SUCCEEDED]
    lines: list[str] = []
    result = run_rayjob(body, NS, api_client=api, poll_seconds=0, echo=lines.append)
    assert result.attached and result.job_status == "SUCCEEDED"
    assert [r[0] for r in fake.requests[:2]] == ["POST", "GET"] and len(fake.objects) == 1
    assert "already exists (this step is a retry): re-attaching" in lines[0]


@pytest.mark.parametrize(("status", "expected"), [
    ({"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "reason": "AppFailed", "message": "exit 1"}, "jobStatus=FAILED"),
    ({"jobStatus": "STOPPED", "jobDeploymentStatus": "Complete"}, "jobStatus=STOPPED"),
    # The deadline fails the deployment while the job itself still reads RUNNING.
    ({"jobStatus": "RUNNING", "jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "reason=DeadlineExceeded"),
])
def test_success_is_read_from_the_job_status(kube: tuple[Any, FakeKube], status: dict[str, Any], expected: str) -> None:
    api, fake = kube
    fake.statuses = [RUNNING, status]
    lines: list[str] = []
    with pytest.raises(RayLaunchError, match=expected) as info:
        run_rayjob(build_rayjob("softprompt-tune-failed", "x"), NS, api_client=api, poll_seconds=0, echo=lines.append)
    assert "kubectl -n softprompt-dev delete rayjob softprompt-tune-failed" in str(info.value)
    assert any("best trial accuracy" in line for line in lines)  # the log is surfaced on failure too


def test_create_errors_and_timeouts_are_explained(kube: tuple[Any, FakeKube]) -> None:
    api, fake = kube
    fake.create_status = 403
    with pytest.raises(RayLaunchError, match=r"HTTP 403.*bound to infra/rbac's Role"):
        run_rayjob(build_rayjob("a", "x"), NS, api_client=api, poll_seconds=0, echo=lambda _: None)
    fake.create_status = None
    fake.statuses = [RUNNING]
    with pytest.raises(RayLaunchError, match="still RUNNING after 0s"):
        run_rayjob(build_rayjob("b", "x"), NS, api_client=api, poll_seconds=0, timeout_seconds=0, echo=lambda _: None)


def test_the_submitter_log_streams_while_the_job_runs(kube: tuple[Any, FakeKube]) -> None:
    """Each poll prints the whole lines the driver added since the last one, before the job ends;
    a line still being written waits for the next poll, and nothing is printed twice."""
    api, fake = kube
    pieces = iter(["driver: starting\n", "driver: trial 1 acc", "uracy=0.8\n", "driver: done"])
    fake.log = ""

    def driver_writes(status: dict[str, Any]) -> None:
        fake.log += next(pieces, "")

    fake.statuses, fake.on_status = [RUNNING, RUNNING, RUNNING, SUCCEEDED], driver_writes
    lines: list[str] = []
    result = run_rayjob(build_rayjob("softprompt-tune-stream", "x"), NS, api_client=api, poll_seconds=0, echo=lines.append)
    assert result.logs == "driver: starting\ndriver: trial 1 accuracy=0.8\ndriver: done"
    done = next(i for i, line in enumerate(lines) if "jobStatus=SUCCEEDED" in line)
    assert lines.index("driver: starting") < lines.index("driver: trial 1 accuracy=0.8") < done < lines.index("driver: done")
    text = "\n".join(lines)
    assert text.count("driver: starting") == 1 and text.count("----- log of softprompt-tune-stream-x7k2p") == 1


def test_a_rotated_submitter_log_is_printed_from_its_new_start() -> None:
    reads = ["one\ntwo\n", "one\ntwo\nthree\n", "four\n"]  # the kubelet rotated it before the third read
    pod = type("Pod", (), {"metadata": type("Meta", (), {"name": "submitter-x"})})

    class Core:
        def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
            return type("PodList", (), {"items": [pod]})

        def read_namespaced_pod_log(self, name: str, namespace: str) -> str:
            return reads.pop(0) if len(reads) > 1 else reads[0]

    lines: list[str] = []
    log = rayjob.SubmitterLog(Core(), NS, "softprompt-tune-x", lines.append)
    for _ in range(3):
        log.poll()
    assert log.finish() == "four\n"
    assert lines[1:] == ["one\ntwo", "three", "four", "----- end of the log of submitter-x -----"]


@pytest.fixture()
def sigterm_guard() -> Iterator[Callable[..., None]]:
    """A SIGTERM handler that fails the test instead of killing pytest where the code under test
    installs none; the test's previous handler comes back afterwards."""

    def no_handler(signum: int, frame: Any) -> None:
        raise AssertionError("SIGTERM arrived and the code under test installed no handler")

    previous = signal.signal(signal.SIGTERM, no_handler)
    try:
        yield no_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_while_waiting_deletes_the_rayjob(kube: tuple[Any, FakeKube], sigterm_guard: Callable[..., None]) -> None:
    """KFP cancels a run by sending its step SIGTERM: the RayJob (and so its Ray cluster) is deleted
    before the step exits with 143, and the step's own SIGTERM handler is restored."""
    api, fake = kube
    sent: list[int] = []

    def cancel_once(status: dict[str, Any]) -> None:  # the step is cancelled while the job runs
        if not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    fake.statuses, fake.on_status = [RUNNING], cancel_once
    body = build_rayjob(job_name("run-cancelled"), "x")
    name = body["metadata"]["name"]
    lines: list[str] = []
    with pytest.raises(SystemExit) as info:
        run_rayjob(body, NS, api_client=api, poll_seconds=0.05, timeout_seconds=30, echo=lines.append)
    assert info.value.code == 143
    assert ("DELETE", f"{RAYJOBS}/{name}") in [(method, path) for method, path, _, _ in fake.requests]
    assert name not in fake.objects
    assert any(line.startswith(f"deleted RayJob {NS}/{name}") for line in lines)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_no_sigterm_handler_is_left_behind(kube: tuple[Any, FakeKube], sigterm_guard: Callable[..., None]) -> None:
    api, fake = kube
    fake.statuses = [SUCCEEDED]
    run_rayjob(build_rayjob("softprompt-tune-ok", "x"), NS, api_client=api, poll_seconds=0, echo=lambda _: None)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard
    assert "DELETE" not in [r[0] for r in fake.requests]  # a job that ends on its own is left to its TTL


def _tiny_config(tmp_path: Path, registry: str) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": {"name": "demo", "labels": ["a", "b"], "verbalizer": {"a": [" a"], "b": [" b"]}},
        "data": {"train": str(tmp_path / "train.csv")}, "publish": {"registry": registry},
    }))
    (tmp_path / "train.csv").write_text("text,label\nx,a\ny,b\n")
    return cfg


def _write_winners(out: Path, cfg: JobConfig, trials: list[str], params: dict[str, Any]) -> TrainOutcome:
    """What RayTuneTrainer leaves in `<run_dir>/train`: ranked winners and train_result.json."""
    adapters = []
    for rank, trial in enumerate(trials):
        folder = out / "winners" / f"{rank:02d}"
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"trial": trial}))
        (folder / "train_history.json").write_text(json.dumps([{"step": 10, "eval_metric": 0.75}]))
        adapters.append(folder / "adapter")
    summary = {"steps": 10, "best_eval_metric": 0.75, "tune": {"best": {"trial_id": trials[0], "params": params}}}
    outcome = TrainOutcome("ray-tune", out, tuple(adapters), with_values(cfg, params), [{"step": 10, "eval_metric": 0.75}], summary)
    outcome.write()
    return outcome


def test_tune_step_hands_over_through_the_scratch_store(kube: tuple[Any, FakeKube], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """launcher=rayjob: config and data go to the scratch store, the RayJob runs the remote driver on
    them, and the winners it leaves in <scratch>/winners become the step's output."""
    api, fake = kube
    monkeypatch.setattr(rayjob, "_kube_api_client", lambda: api)
    monkeypatch.setattr(rayjob, "POLL_SECONDS", 0.0)
    config = _tiny_config(tmp_path, str(tmp_path / "registry"))
    dataset = tmp_path / "dataset"
    (dataset / "train.parquet").parent.mkdir()
    (dataset / "train.parquet").write_bytes(b"PAR1")
    scratch = tmp_path / "scratch"

    def remote_finishes(status: dict[str, Any]) -> None:  # what the driver on the Ray head leaves behind
        if status.get("jobStatus") == "SUCCEEDED":
            _write_winners(scratch / "winners", load_config(config), ["t1"], {"train.lr": 0.1})

    fake.statuses, fake.on_status = [RUNNING, SUCCEEDED], remote_finishes
    out = tmp_path / "winners_out"
    meta = steps.tune(config, dataset, out, launcher="rayjob", run_id="run-42", ray_namespace=NS, scratch_uri=str(scratch),
                      num_workers=2, gpus_per_worker=1, cpus_per_worker=3, memory_per_worker="24Gi", max_hours=2)
    outcome = TrainOutcome.read(out)
    assert outcome.winners == (out / "winners" / "00" / "adapter",) and outcome.config.train.lr == 0.1
    assert meta == {"launcher": "rayjob", "ray_job": job_name("run-42"), "ray_job_status": "SUCCEEDED", "scratch": str(scratch),
                    "trainer": "ray-tune", "winners": 1, "best_trial": "t1", "best_params": {"train.lr": 0.1},
                    "best_eval_metric": 0.75, "steps": 10}
    assert (scratch / "data" / "train.parquet").read_bytes() == b"PAR1"
    sent = load_config(scratch / "config" / remote.CONFIG_FILE).ray  # the step's resource parameters, baked in
    assert (sent.num_workers, sent.use_gpu, sent.gpus_per_worker, sent.cpus_per_worker) == (2, True, 1.0, 3.0)
    body = fake.objects[job_name("run-42")]
    assert body["spec"]["entrypoint"] == f"python -m softprompt.kubeflow.remote --scratch {scratch}"
    assert body["spec"]["activeDeadlineSeconds"] == 7200
    group = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": 1}


def test_remote_driver_pulls_tunes_and_pushes_the_winners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver side: config and data from the scratch store, a sweep on the cluster it runs in
    (`auto`), the winners and train_result.json back. The sweep itself is faked here (the
    integration test `test_jobs` runs this driver for real on `ray start --head`)."""
    from softprompt.ray import trainers

    scratch = tmp_path / "scratch"
    config = _tiny_config(tmp_path, str(tmp_path / "registry"))
    steps.write_config(load_config(config), scratch / "config" / remote.CONFIG_FILE)
    (scratch / "data").mkdir()
    (scratch / "data" / "train.parquet").write_bytes(b"PAR1")
    calls: list[str | None] = []

    class FakeSweep:
        def __init__(self, address: str | None = None, **_: Any) -> None:
            calls.append(address)

        def train(self, cfg: JobConfig, data: Path, run_dir: Path, models: Any) -> TrainOutcome:
            assert (Path(data) / "train.parquet").read_bytes() == b"PAR1"
            return _write_winners(run_dir / "train", cfg, ["t2", "t1"], {"train.lr": 0.05, "prompt.num_virtual_tokens": 8})

    monkeypatch.setattr(trainers, "RayTuneTrainer", FakeSweep)
    assert remote.main(["--scratch", str(scratch)]) == 0
    assert calls == ["auto"]
    winners = scratch / "winners"
    assert sorted(p.relative_to(winners).as_posix() for p in winners.rglob("*") if p.is_file()) == sorted(
        [*(f"winners/{n}/{f}" for n in ("00", "01") for f in ("adapter/adapter_config.json", "train_history.json")),
         "train_result.json"])
    outcome = TrainOutcome.read(winners)  # what evaluate runs with: best first, and the winner's values
    assert json.loads((outcome.winners[0] / "adapter_config.json").read_text()) == {"trial": "t2"}
    assert (outcome.config.train.lr, outcome.config.prompt.num_virtual_tokens) == (0.05, 8)


# --------------------------------------------------------------------------------------------------
# Jobs API (an existing Ray cluster)


@dataclass
class FakeJobs:
    """Duck-typed ray.job_submission.JobSubmissionClient."""

    existing: dict[str, str] = field(default_factory=dict)
    final: str = "SUCCEEDED"
    submitted: list[dict[str, Any]] = field(default_factory=list)
    not_ready: int = 0
    """Submissions answered like a head whose job agent has not registered yet."""
    cancel: bool = False
    """Send this process SIGTERM while the log streams (KFP cancelling the step)."""
    stopped: list[str] = field(default_factory=list)
    dropped: int = 0
    """Submissions whose connection drops after the head created the job."""

    def list_jobs(self) -> list[Any]:
        return [type("Job", (), {"submission_id": sid, "status": status}) for sid, status in self.existing.items()]

    def submit_job(self, **kwargs: Any) -> str:
        if self.not_ready:
            self.not_ready -= 1
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
        if kwargs["submission_id"] in self.existing:
            raise RuntimeError(f"Request failed with status code 400: Job with submission_id {kwargs['submission_id']} already exists.")
        self.submitted.append(kwargs)
        self.existing[kwargs["submission_id"]] = "PENDING"
        if self.dropped:  # the head created the job, then the connection dropped before the answer
            self.dropped -= 1
            import requests

            raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))")
        return str(kwargs["submission_id"])

    async def tail_job_logs(self, sid: str) -> AsyncIterator[str]:
        for line in (f"{sid}: starting\n", f"{sid}: best trial accuracy=0.9\n"):
            await asyncio.sleep(0)
            yield line
            if self.cancel:
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(5)  # the handler interrupts this
        self.existing[sid] = self.final

    def stop_job(self, sid: str) -> bool:
        self.stopped.append(sid)
        self.existing[sid] = "STOPPED"
        return True

    def get_job_status(self, sid: str) -> str:
        return self.existing[sid]

    def get_job_info(self, sid: str) -> Any:
        return type("Info", (), {"message": "driver exited with 1" if self.final != "SUCCEEDED" else ""})


def test_jobs_api_submits_follows_and_reads_the_final_status(capsys: pytest.CaptureFixture[str]) -> None:
    jobs = FakeJobs()
    result = run_ray_job("http://head:8265", "python -m softprompt.kubeflow.remote --scratch s3://b/t", "softprompt-tune-1",
                         client=jobs, echo=print)
    assert (result.name, result.job_status, result.attached) == ("softprompt-tune-1", "SUCCEEDED", False)
    assert jobs.submitted[0]["entrypoint"].startswith("python -m softprompt.kubeflow.remote")
    assert jobs.submitted[0]["submission_id"] == "softprompt-tune-1"
    assert "best trial accuracy=0.9" in capsys.readouterr().out


def test_jobs_api_reattaches_to_a_running_job_and_retries_a_failed_one() -> None:
    running = FakeJobs(existing={"softprompt-tune-1": "RUNNING"})
    assert run_ray_job("http://head:8265", "x", "softprompt-tune-1", client=running, echo=lambda _: None).attached
    assert running.submitted == []
    failed_before = FakeJobs(existing={"softprompt-tune-1": "FAILED"})
    result = run_ray_job("http://head:8265", "x", "softprompt-tune-1", client=failed_before, echo=lambda _: None)
    assert result.name == "softprompt-tune-1-r2" and not result.attached
    failing = FakeJobs(final="FAILED")
    with pytest.raises(RayLaunchError, match="ended FAILED"):
        run_ray_job("http://head:8265", "x", "softprompt-tune-1", client=failing, echo=lambda _: None)


def test_steps_read_s3_credentials_from_the_secret_in_a_pod(kube: tuple[Any, FakeKube], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    api, fake = kube
    (tmp_path / "namespace").write_text(NS)
    monkeypatch.setattr(pods, "SA_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "")  # restored after the test
    pods.ensure_s3_credentials(api)
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("pipeline", "s3cr3t")
    assert fake.requests[-1][:2] == ("GET", f"/api/v1/namespaces/{NS}/secrets/softprompt-s3")
    fake.requests.clear()
    pods.ensure_s3_credentials(api)  # credentials present: no API call
    assert fake.requests == []


@pytest.fixture()
def no_ray_token_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_ray_auth_headers_take_the_token_from_env_file_or_the_pods_secret(
        kube: tuple[Any, FakeKube], tmp_path: Path, no_ray_token_env: pytest.MonkeyPatch) -> None:
    api, fake = kube
    monkeypatch = no_ray_token_env
    assert pods.ray_auth_headers() == {}  # outside a pod, no token: no header (Ray adds its own if RAY_AUTH_MODE=token)
    (tmp_path / "namespace").write_text(NS)
    monkeypatch.setattr(pods, "SA_DIR", tmp_path)
    fake.ray_token = "s3cr3t-ray-token"
    assert pods.ray_auth_headers(api) == {"Authorization": "Bearer s3cr3t-ray-token"}
    assert fake.requests[-1][:2] == ("GET", f"/api/v1/namespaces/{NS}/secrets/softprompt-ray-auth")
    fake.ray_token = ""
    lines: list[str] = []
    assert pods.ray_auth_headers(api, echo=lines.append) == {}
    assert "could not read Secret softprompt-dev/softprompt-ray-auth (HTTP 404" in lines[0]
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert pods.ray_auth_headers(api) == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")  # Ray's own order: the variable, then the file
    assert pods.ray_auth_headers(api) == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SoftpromptError, match=r"RAY_AUTH_TOKEN_PATH=.*missing cannot be read"):
        pods.ray_auth_headers(api)


def test_jobs_api_client_sends_the_token(monkeypatch: pytest.MonkeyPatch, no_ray_token_env: pytest.MonkeyPatch) -> None:
    import ray.job_submission

    made: list[dict[str, Any]] = []

    class Client(FakeJobs):
        def __init__(self, address: str, **kwargs: Any) -> None:
            super().__init__()
            made.append({"address": address, **kwargs})

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0k3n")
    run_ray_job("http://head:8265", "x", "softprompt-tune-1", echo=lambda _: None)
    assert made == [{"address": "http://head:8265", "headers": {"Authorization": "Bearer t0k3n"}}]
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    run_ray_job("http://head:8265", "x", "softprompt-tune-2", echo=lambda _: None)
    assert made[-1] == {"address": "http://head:8265", "headers": None}  # no token: Ray's own lookup


def test_jobs_api_retries_while_the_head_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rayjob, "SUBMIT_WAIT_SECONDS", 1.5)  # one retry, 1 s later
    lines: list[str] = []
    jobs = FakeJobs(not_ready=1)
    result = run_ray_job("http://head:8265", "x", "softprompt-tune-1", client=jobs, echo=lines.append)
    assert result.job_status == "SUCCEEDED" and len(jobs.submitted) == 1
    assert "not ready to take jobs yet" in lines[0] and "retrying in 1s" in lines[0]
    with pytest.raises(RayLaunchError, match=r"could not submit .* try again later"):
        run_ray_job("http://head:8265", "x", "softprompt-tune-2", client=FakeJobs(not_ready=99), echo=lambda _: None)


def test_jobs_api_retries_a_dropped_connection_and_re_attaches_to_the_job_it_created(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rayjob, "SUBMIT_WAIT_SECONDS", 5.0)  # room for the retry 1 s later on a loaded machine
    lines: list[str] = []
    jobs = FakeJobs(dropped=1)
    result = run_ray_job("http://head:8265", "x", "softprompt-tune-3", client=jobs, echo=lines.append)
    assert result.job_status == "SUCCEEDED" and len(jobs.submitted) == 1  # one job, not two
    assert "connection to Ray at http://head:8265 dropped" in lines[0] and "re-attaching" in lines[1]


def test_jobs_api_sigterm_stops_the_submission(sigterm_guard: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    jobs = FakeJobs(cancel=True)
    lines: list[str] = []
    with pytest.raises(SystemExit) as info:
        run_ray_job("http://head:8265", "x", "softprompt-tune-1", client=jobs, echo=lines.append)
    assert info.value.code == 143 and jobs.stopped == ["softprompt-tune-1"]
    assert "stopped Ray job softprompt-tune-1" in lines
    assert "softprompt-tune-1: starting" in capsys.readouterr().out  # the log streamed up to the cancel
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard
