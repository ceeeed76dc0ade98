"""`softprompt run --submit`: the whole job (ingest -> tune on Ray Train -> evaluate -> publish) as a
Ray Job on a real `ray start --head` cluster on 127.0.0.1; a second submit re-attaches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from softprompt.cli import main
from softprompt.ray import jobs

if TYPE_CHECKING:
    from conftest import TinyTask

pytestmark = pytest.mark.slow


def test_submission_ids_follow_the_config_and_the_data(tiny_task: TinyTask, tmp_path: Path) -> None:
    cfg = tiny_task.config("run_name=a")
    assert jobs.submission_id("run", cfg) == jobs.submission_id("run", tiny_task.config("run_name=a"))
    assert jobs.submission_id("run", cfg).startswith("softprompt-run-a-")
    assert jobs.submission_id("run", cfg) != jobs.submission_id("tune", cfg)
    assert jobs.submission_id("run", cfg) != jobs.submission_id("run", tiny_task.config("run_name=a", "train.lr=0.1"))
    # Same config, same path, different rows: a different job.
    copy = tmp_path / "train.csv"
    copy.write_text(tiny_task.csv_path.read_text())
    before = jobs.submission_id("run", tiny_task.config("run_name=a", f"data.train={copy}"))
    copy.write_text(tiny_task.csv_path.read_text() + "one more row,pos\n")
    assert jobs.submission_id("run", tiny_task.config("run_name=a", f"data.train={copy}")) != before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A separate Ray head (`ray start --head --block`) on loopback ports of its own, shared by this
    module's tests (each names its own jobs); stopped by signalling the process group it leads (never
    `ray stop`, which would stop every Ray here).

    On a loaded 2-core machine a head sometimes fails to start its dashboard (Ray's own start-up
    timeout); it is then stopped and started once more, on fresh ports."""
    for attempt in (1, 2):
        head = _RayHead(tmp_path_factory.mktemp("ray-head") / f"ray-head-{attempt}.log")
        try:
            url = head.start()
        except RuntimeError:
            head.stop()
            if attempt == 2:
                raise
            continue
        except BaseException:  # anything else (an auth error, Ctrl-C): never leave the head running
            head.stop()
            raise
        try:
            yield url
        finally:
            head.stop()
        return


class _RayHead:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        bin_dir = Path(sys.executable).parent
        port, dashboard = _free_port(), _free_port()
        ports = {
            "--node-manager-port": _free_port(), "--object-manager-port": _free_port(), "--metrics-export-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(), "--ray-client-server-port": _free_port(),
        }
        cmd = [
            str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items()),
        ]
        # The job's entrypoint is `softprompt ...`: this environment's scripts must come first on PATH.
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        # As softprompt.ray.cluster.init_ray does for a local Ray: Ray Train's placement-group cleaner must find
        # this cluster's dashboard, not the session's.
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{dashboard}"
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 180
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                return url
            except (OSError, RuntimeError, ValueError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start --head did not come up: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)  # a graceful stop takes ~35 s here; a throwaway test head need not wait for it
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def test_run_submitted_as_a_ray_job_and_a_retry_reattaches(
    tiny_task: TinyTask, ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray.job_submission import JobSubmissionClient

    argv = [
        "run", "--no-progress", *tiny_task.overrides,
        "tune.num_samples=1", "ray.num_workers=1", "tune.top_k_ensemble=1",
        f"workdir={tmp_path / 'runs'}", "run_name=job", f"publish.registry={tmp_path / 'registry'}",
        "--submit", ray_head,
    ]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted Ray job softprompt-run-job-" in out
    assert "[2/4] tune (1 trial, 1 Ray Train workers each)" in out  # the job's log, streamed
    assert "on a Ray worker (1 CPUs) to export and evaluate the winners" in out  # not on the head
    assert "SUCCEEDED" in out.splitlines()[-1]
    metrics = json.loads((tmp_path / "runs" / "job" / "artifact" / "metrics.json").read_text())
    assert metrics["split"] == "eval" and metrics["tuned"]["accuracy"] == pytest.approx(0.8)
    assert any((tmp_path / "registry").rglob("MANIFEST*"))

    assert main(argv) == 0  # the same command again: no second job
    again = capsys.readouterr().out
    assert "re-attaching" in again and "SUCCEEDED" in again.splitlines()[-1]
    jobs = [j for j in JobSubmissionClient(ray_head).list_jobs() if (j.submission_id or "").startswith("softprompt-run-job-")]
    assert len(jobs) == 1


def test_the_pipeline_tune_step_runs_on_a_ray_cluster_through_the_jobs_api(
    tiny_task: TinyTask, ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The KFP tune step's `ray-jobs` launcher against a real `ray start --head`: config and data
    go to a scratch folder, `python -m softprompt.kubeflow.remote` tunes on the cluster as a Ray
    Job, the ranked winners come back; a retried step (same run id) re-attaches to the same job."""
    from ray.job_submission import JobSubmissionClient

    from softprompt.kubeflow import rayjob, steps
    from softprompt.outcome import TrainOutcome

    config = tmp_path / "tune.yaml"
    steps.write_config(tiny_task.config("tune.num_samples=2", "tune.scheduler=none", "tune.top_k_ensemble=2", "ray.num_workers=1",
                                        f"publish.registry={tmp_path / 'registry'}"), config)
    args = dict(launcher="ray-jobs", ray_address=ray_head, run_id="run-42", scratch_uri=str(tmp_path / "scratch"))
    out = steps.tune(config, tiny_task.data_dir, tmp_path / "winners", **args)

    assert out["launcher"] == "ray-jobs" and out["ray_job_status"] == "SUCCEEDED" and out["winners"] == 2
    assert out["ray_job"] == rayjob.job_name("run-42")
    outcome = TrainOutcome.read(tmp_path / "winners")
    assert [p.parent.name for p in outcome.winners] == ["00", "01"] and outcome.trainer == "ray-tune"
    assert all((p / "adapter_model.safetensors").is_file() for p in outcome.winners)
    logs = capsys.readouterr().out
    assert "tune: 2 trial(s)" in logs  # the job's driver log, surfaced in the step's log

    again = steps.tune(config, tiny_task.data_dir, tmp_path / "winners-retry", **args)
    assert again["ray_job"] == out["ray_job"]
    jobs_on_head = [j for j in JobSubmissionClient(ray_head).list_jobs() if j.submission_id == out["ray_job"]]
    assert len(jobs_on_head) == 1  # the retried step re-attached instead of starting a second job
