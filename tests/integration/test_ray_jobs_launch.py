"""The tune step's Jobs API launch (`rayjob.run_ray_job`) against a real local Ray head: the
session's Ray from tests/integration/conftest.py (`ray_session`), reached through its dashboard
like a Ray cluster in Kubernetes. Drivers here are one-line Python commands, not tuning runs."""

from __future__ import annotations

import uuid

import pytest

from softprompt.kubeflow.rayjob import RayLaunchError, run_ray_job

pytestmark = pytest.mark.slow


@pytest.fixture()
def dashboard(ray_session: dict[str, str]) -> str:
    import ray

    url = ray._private.worker.get_dashboard_url()
    assert url, "the session's Ray runs without a dashboard"
    return url if url.startswith("http") else f"http://{url}"


def test_submit_follow_and_reattach(dashboard: str, capfd: pytest.CaptureFixture[str]) -> None:
    sid = f"softprompt-tune-{uuid.uuid4().hex[:12]}"
    entrypoint = "python -c \"print('driver: best trial accuracy=0.9')\""
    first = run_ray_job(dashboard, entrypoint, sid)
    assert (first.name, first.job_status, first.attached) == (sid, "SUCCEEDED", False)
    assert "driver: best trial accuracy=0.9" in capfd.readouterr().out  # the driver's log, in the step's log
    again = run_ray_job(dashboard, entrypoint, sid)  # a retried step
    assert (again.name, again.job_status, again.attached) == (sid, "SUCCEEDED", True)


def test_a_failed_job_fails_the_step_and_a_retry_is_a_new_attempt(dashboard: str) -> None:
    sid = f"softprompt-tune-{uuid.uuid4().hex[:12]}"
    with pytest.raises(RayLaunchError, match=f"Ray job {sid} at .* ended FAILED"):
        run_ray_job(dashboard, "python -c 'import sys; sys.exit(3)'", sid)
    retry = run_ray_job(dashboard, "python -c 'print(1)'", sid)
    assert (retry.name, retry.job_status, retry.attached) == (f"{sid}-r2", "SUCCEEDED", False)
