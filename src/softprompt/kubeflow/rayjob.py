"""Launching the tune step's Ray work from a pipeline pod: a KubeRay `RayJob` or a Ray Jobs API
submission to a running cluster.

Both paths share the rules that make a pipeline step safe to retry:

- the job's name derives from the pipeline run id (`job_name`), so a retried step finds the job
  its first attempt started (HTTP 409 on create, "already exists" on submit) and re-attaches to
  it instead of starting a second one;
- success is the Ray job's own status (`status.jobStatus` of the RayJob, the Jobs API's status),
  never the exit code of a submitter pod;
- the driver's log goes into the step's log as it runs, so the KFP UI shows it (the RayJob
  submitter pod's log, read again every poll; a Jobs API submission's log via `softprompt.jobs.follow`);
- a SIGTERM while the step waits (KFP cancelling the run) deletes the RayJob or stops the Jobs API
  submission before the step exits, so a cancelled run leaves no Ray cluster holding GPUs.

A RayJob also carries `activeDeadlineSeconds` (a hard wall-clock limit) and
`ttlSecondsAfterFinished` with `shutdownAfterJobFinishes`, so its Ray cluster is torn down even
when the pipeline is gone. Its cluster spec mirrors `infra/kuberay/rayjob.yaml` (a test compares
them). Kubernetes and Ray clients are passed in by tests and built lazily otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from softprompt import __version__
from softprompt.errors import SoftpromptError
from softprompt.kubeflow import pods
from softprompt.ray import jobs

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TERMINAL_JOB_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
IMAGE = f"ghcr.io/softprompt/softprompt:{__version__}"
"""The one image of every step and Ray pod, pinned to the package version."""
RAY_VERSION = "2.60.0"
"""Must match the ray wheel in the image (Dockerfile RAY_VERSION)."""
POLL_SECONDS = 10.0
"""How often a RayJob's status and its submitter's log are read."""
SUBMIT_WAIT_SECONDS = jobs.SUBMIT_WAIT_SECONDS
"""How long a Jobs API submission is retried while the head asks to "try again later"."""
S3_SECRET = "softprompt-s3"
"""Kubernetes Secret with the Ray pods' S3 key (infra/minio/policies/ray.json: writes only tmp/)."""
Echo = Callable[[str], None]


class RayLaunchError(SoftpromptError):
    """The Ray job could not be started, failed, or did not finish in time."""


@dataclass(frozen=True)
class WorkerResources:
    """What each Ray Train worker of a trial gets: one GPU worker pod per Ray Train worker."""

    num_workers: int = 1
    """Ray Train workers per trial; also the most GPU worker pods the autoscaler may add."""
    gpus: float = 1
    """GPUs per worker (`nvidia.com/gpu`, rounded up for the pod); 0 makes CPU-only workers."""
    cpus: float = 8
    """CPUs per worker pod (KubeRay gives Ray as many logical CPUs)."""
    memory: str = "48Gi"
    """Memory per worker pod (a Kubernetes quantity)."""


@dataclass(frozen=True)
class RayJobResult:
    """How a Ray job ended."""

    name: str
    """RayJob name or Jobs API submission id."""
    namespace: str
    """Kubernetes namespace ("" for a Jobs API submission)."""
    job_status: str
    """SUCCEEDED, FAILED or STOPPED."""
    deployment_status: str
    """RayJob `jobDeploymentStatus` (Complete, Failed, ...); "" for the Jobs API."""
    attached: bool
    """True when the job already existed (a retried step re-attached to it)."""
    logs: str
    """The driver's log as printed."""


def job_name(run_id: str) -> str:
    """`softprompt-tune-<12 hex>`: deterministic per pipeline run, a valid DNS label, and short
    enough for the names KubeRay derives from it (cluster, head service)."""
    return "softprompt-tune-" + hashlib.sha256(run_id.encode()).hexdigest()[:12]


def build_rayjob(
    name: str,
    entrypoint: str,
    *,
    run_id: str = "",
    image: str = IMAGE,
    resources: WorkerResources | None = None,
    active_deadline_seconds: int = 43200,
    ttl_seconds_after_finished: int = 600,
) -> dict[str, Any]:
    """The RayJob manifest: a fresh Ray cluster (CPU head, autoscaling GPU workers from 0) that
    runs `entrypoint` on its head and is deleted `ttl_seconds_after_finished` after the job ends."""
    res = resources or WorkerResources()
    if res.num_workers < 1 or res.gpus < 0 or res.cpus <= 0:
        raise RayLaunchError(f"worker resources {res} need num_workers >= 1, gpus >= 0 and cpus > 0")
    labels = {"app.kubernetes.io/name": "softprompt", "app.kubernetes.io/component": "tune"}
    if run_id:
        labels["softprompt.io/pipeline-run-id"] = _label_value(run_id)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "activeDeadlineSeconds": active_deadline_seconds,
            # The step's retry policy decides about retries; a second submission would re-tune.
            "backoffLimit": 0,
            "rayClusterSpec": cluster_spec(image, res),
        },
    }


def cluster_spec(image: str, res: WorkerResources) -> dict[str, Any]:
    """The RayJob's `rayClusterSpec` (the shape of infra/kuberay/rayjob.yaml)."""
    worker_resources: dict[str, Any] = {"cpu": _quantity(res.cpus), "memory": res.memory}
    if res.gpus > 0:
        worker_resources["nvidia.com/gpu"] = _gpu_count(res.gpus)
    gpu_worker = _container("ray-worker", image, [{"name": "metrics", "containerPort": 8080}], worker_resources)
    head = _container("ray-head", image, [
        {"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001}, {"name": "metrics", "containerPort": 8080},
        {"name": "as-metrics", "containerPort": 44217}, {"name": "dash-metrics", "containerPort": 44227},
    ], {"cpu": "2", "memory": "8Gi"})
    return {
        "rayVersion": RAY_VERSION,
        # Token authentication: KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN from this Secret on the
        # containers it adds (autoscaler, wait-gcs-ready, submitter) and uses it for its own calls.
        "authOptions": {"mode": "token", "secretName": pods.RAY_AUTH_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "500m", "memory": "512Mi"}},
        },
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # num-cpus 0: trials must land on GPU workers, which is what makes the autoscaler add them.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "num-cpus": "0"},
            "template": _pod(head, "2Gi"),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": res.num_workers,
            "rayStartParams": {"metrics-export-port": "8080"},
            "template": _pod(gpu_worker, "8Gi", tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
        }],
    }


def run_rayjob(
    body: dict[str, Any],
    namespace: str,
    *,
    api_client: Any = None,
    poll_seconds: float | None = None,
    timeout_seconds: float | None = None,
    echo: Echo = print,
) -> RayJobResult:
    """Create the RayJob (or re-attach to it on 409), print the submitter's log as it grows until
    a final `status.jobStatus`, and return how it ended.

    A SIGTERM while it waits (KFP cancelling the run) deletes the RayJob, and with it its Ray
    cluster, and exits with status 143.

    Raises:
        RayLaunchError: on a create error other than 409, a FAILED/STOPPED job, a failed
            deployment (e.g. reason DeadlineExceeded) or when `timeout_seconds` passes
            (default: the RayJob's activeDeadlineSeconds plus 15 minutes).
    """
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = api_client or _kube_api_client()
    custom = k8s.CustomObjectsApi(api)
    name = body["metadata"]["name"]
    where = f"RayJob {namespace}/{name}"
    log = SubmitterLog(k8s.CoreV1Api(api), namespace, name, echo)
    limit = timeout_seconds if timeout_seconds is not None else body["spec"].get("activeDeadlineSeconds", 43200) + 900
    deadline = time.monotonic() + limit

    def delete() -> None:
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=10)
            echo(f"deleted {where}; KubeRay removes its Ray cluster")
        except ApiException as exc:
            if exc.status != 404:
                echo(f"warning: could not delete {where}: HTTP {exc.status} {exc.reason}; "
                     f"run `kubectl -n {namespace} delete rayjob {name}`")

    with _on_sigterm(delete, where, echo):
        attached = False
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            echo(f"created {where}")
        except ApiException as exc:
            if exc.status != 409:
                hint = " (is the pipeline's ServiceAccount bound to infra/rbac's Role?)" if exc.status == 403 else ""
                raise RayLaunchError(f"could not create {where}: HTTP {exc.status} {exc.reason}{hint}") from exc
            attached = True
            echo(f"{where} already exists (this step is a retry): re-attaching to it")
        seen: tuple[str, str] | None = None
        while True:
            try:
                status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
            except ApiException as exc:
                raise RayLaunchError(f"could not read {where}: HTTP {exc.status} {exc.reason}") from exc
            job_status, deployment = str(status.get("jobStatus", "")), str(status.get("jobDeploymentStatus", ""))
            if (job_status, deployment) != seen:
                seen = (job_status, deployment)
                echo(f"{where}: jobStatus={job_status or '-'} jobDeploymentStatus={deployment or '-'}"
                     + (f" cluster={status['rayClusterName']}" if status.get("rayClusterName") else ""))
            if job_status in TERMINAL_JOB_STATUSES or deployment == "Failed":
                break
            log.poll()
            if time.monotonic() > deadline:
                logs = log.finish()
                raise RayLaunchError(f"{where} still {job_status or deployment or 'pending'} after {limit:.0f}s; "
                                     f"see `kubectl -n {namespace} describe rayjob {name}`" + ("" if logs else " (no submitter log yet)"))
            time.sleep(POLL_SECONDS if poll_seconds is None else poll_seconds)
        logs = log.finish()
    if job_status != "SUCCEEDED":
        reason = status.get("reason") or "-"
        raise RayLaunchError(
            f"{where} ended with jobStatus={job_status or '-'} (jobDeploymentStatus={deployment}, reason={reason}): "
            f"{status.get('message', '')}; the driver's log is above. To run it again, delete it "
            f"(`kubectl -n {namespace} delete rayjob {name}`) and retry the step.")
    return RayJobResult(name, namespace, job_status, deployment, attached, logs)


class SubmitterLog:
    """The log of a RayJob's submitter pod(s) (the Kubernetes Job of the RayJob's name, which
    follows the driver's output), printed as it grows.

    Each `poll` reads the whole log again and prints the complete lines added since the last one;
    `finish` prints the rest and returns the text. Reading a log fails while its pod starts, so
    read errors only warn, and only in `finish`.
    """

    def __init__(self, core: Any, namespace: str, name: str, echo: Echo = print) -> None:
        self.core, self.namespace, self.name, self.echo = core, namespace, name, echo
        self.texts: dict[str, str] = {}
        """Each submitter pod's log as last read."""
        self.printed: dict[str, int] = {}
        """How many characters of each pod's log are printed."""

    def poll(self, *, final: bool = False) -> None:
        """Print what the submitter logged since the last poll (whole lines unless `final`)."""
        from kubernetes.client.exceptions import ApiException

        try:
            for pod in self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={self.name}").items:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace)
                self._show(pod.metadata.name, text if isinstance(text, str) else str(text), final)
        except ApiException as exc:
            if final:
                self.echo(f"warning: could not read the submitter log of {self.namespace}/{self.name}: HTTP {exc.status} {exc.reason}")

    def finish(self) -> str:
        """Print the rest of the log and return all of it."""
        self.poll(final=True)
        for pod in self.texts:
            self.echo(f"----- end of the log of {pod} -----")
        if not self.texts:
            self.echo(f"no submitter pod of {self.name} found (job-name={self.name}); see `kubectl -n {self.namespace} get pods`")
        return "".join(self.texts.values())

    def _show(self, pod: str, text: str, final: bool) -> None:
        if pod not in self.printed:
            self.echo(f"----- log of {pod} (RayJob submitter: the driver's output) -----")
        if len(text) < self.printed.get(pod, 0):  # shorter than before: the kubelet rotated it
            self.printed[pod] = 0
        start = self.printed.setdefault(pod, 0)
        stop = len(text) if final else text.rfind("\n", start) + 1  # a line still being written waits for the next poll
        if stop > start:
            self.echo(text[start:stop].rstrip("\n"))
            self.printed[pod] = stop
        self.texts[pod] = text


def run_ray_job(
    address: str,
    entrypoint: str,
    submission_id: str,
    *,
    client: Any = None,
    runtime_env: dict[str, Any] | None = None,
    echo: Echo = print,
) -> RayJobResult:
    """Submit `entrypoint` to the Ray cluster whose dashboard is at `address` (e.g.
    http://softprompt-head-svc:8265) and follow its log to the end.

    Same conventions as `softprompt tune --submit` (`softprompt.jobs`): a submission that exists
    and is pending, running or done is re-attached to; one that FAILED or was STOPPED is retried
    under the next attempt id (`<id>-r2`, ...), so a retried step resumes rather than re-fails.
    A SIGTERM while it follows the job (KFP cancelling the run) stops the job and exits with 143.
    Every request carries the cluster's token (`ray_auth_headers`).

    Raises:
        RayLaunchError: when the cluster cannot be reached or the job does not succeed.
    """
    from softprompt.ray import jobs

    if client is None:
        from ray.job_submission import JobSubmissionClient

        headers = pods.ray_auth_headers()
        try:
            client = JobSubmissionClient(address, headers=headers or None)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayLaunchError(f"cannot reach the Ray Jobs API at {address}: {exc}; pass the dashboard address, e.g. http://HEAD:8265") from exc
    existing = {j.submission_id: str(j.status) for j in client.list_jobs() if j.submission_id}
    sid, attempt = submission_id, 1
    while existing.get(sid) in ("FAILED", "STOPPED"):
        attempt += 1
        sid = f"{submission_id}-r{attempt}"
    attached = sid in existing
    if attached:
        echo(f"Ray job {sid} at {address} exists ({existing[sid]}; this step is a retry): re-attaching")
    else:
        attached = _submit(client, address, sid, entrypoint, runtime_env, echo)
    with _on_sigterm(lambda: _stop(client, sid, echo), f"Ray job {sid} at {address}", echo):
        code = jobs.follow(client, sid)  # streams the driver's log into this step's log
    status = str(client.get_job_status(sid))
    if code != 0:
        raise RayLaunchError(f"Ray job {sid} at {address} ended {status}; the driver's log is above")
    return RayJobResult(sid, "", status, "", attached, "")


# --------------------------------------------------------------------------------------------------


class _Cancelled(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that no `except Exception` swallows it."""


@contextlib.contextmanager
def _on_sigterm(cleanup: Callable[[], None], what: str, echo: Echo) -> Iterator[None]:
    """Run `cleanup` and exit with 143 (128 + SIGTERM) when SIGTERM arrives inside the block.

    KFP stops a cancelled run's pods with SIGTERM; without this the Ray job would run on, holding
    its GPUs until `activeDeadlineSeconds`. A pod evicted mid-run gets SIGTERM too, so its retry
    starts the job afresh instead of re-attaching: the price of never leaving an orphan. Python
    sets signal handlers only in the main thread; elsewhere the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum: int, frame: Any) -> None:
        raise _Cancelled(signum)

    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    except _Cancelled:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        echo(f"SIGTERM: the step is being cancelled; stopping {what}")
        cleanup()
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _stop(client: Any, sid: str, echo: Echo) -> None:
    try:
        client.stop_job(sid)
        echo(f"stopped Ray job {sid}")
    except (OSError, RuntimeError) as exc:  # OSError: requests' ConnectionError too
        echo(f"warning: could not stop Ray job {sid}: {exc}; run `ray job stop {sid}`")


def _submit(client: Any, address: str, sid: str, entrypoint: str, runtime_env: dict[str, Any] | None, echo: Echo) -> bool:
    """Submit (retrying a head that is not ready or a dropped connection); True when re-attaching."""
    try:
        return jobs.submit_job(client, address, sid, entrypoint, runtime_env=runtime_env,
                               metadata={"app": "softprompt", "component": "tune"}, echo=echo, wait_seconds=SUBMIT_WAIT_SECONDS)
    except jobs.SubmitError as exc:
        raise RayLaunchError(str(exc)) from exc


_kube_api_client = pods.in_cluster_client


def _container(name: str, image: str, ports: list[dict[str, Any]], resources: dict[str, Any]) -> dict[str, Any]:
    env: list[dict[str, Any]] = [{"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}}}
                                 for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env += [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": pods.RAY_AUTH_SECRET, "key": pods.RAY_AUTH_SECRET_KEY}}}]
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "envFrom": [{"configMapRef": {"name": "softprompt-env"}}],
        "env": env,
        "resources": {"limits": dict(resources), "requests": copy.deepcopy(resources)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod(container: dict[str, Any], shm: str, *, tolerations: list[dict[str, str]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
    }
    if tolerations:
        spec["tolerations"] = tolerations
    spec["containers"] = [container]
    # Ray's object store lives in /dev/shm; the container default (64 MiB) is too small.
    spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "softprompt"}}, "spec": spec}


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def _gpu_count(gpus: float) -> int:
    # Kubernetes schedules whole GPUs; Ray may still pack fractional trials onto one.
    whole = int(gpus)
    return whole if whole == gpus else whole + 1


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]
    return value.strip("-_.") or "unknown"
