"""Launching the tune step's Ray work from a pipeline pod: a KubeRay `RayJob` or a Ray Jobs API
submission to a running cluster.

Both paths share the rules that make a pipeline step safe to retry:

- the job's name derives from the pipeline run id (`job_name`), so a retried step finds the job
  its first attempt started (HTTP 409 on create, "already exists" on submit) and re-attaches to
  it instead of starting a second one;
- success is the Ray job's own status (`status.jobStatus` of the RayJob, the Jobs API's status),
  never the exit code of a submitter pod;
- the driver's log goes into the step's log, so the KFP UI shows it (the RayJob submitter pod's
  log when the job ends; a Jobs API submission's log as it runs, via `softprompt.jobs.follow`).

A RayJob also carries `activeDeadlineSeconds` (a hard wall-clock limit) and
`ttlSecondsAfterFinished` with `shutdownAfterJobFinishes`, so its Ray cluster is torn down even
when the pipeline is gone. Its cluster spec mirrors `infra/kuberay/rayjob.yaml` (a test compares
them). Kubernetes and Ray clients are passed in by tests and built lazily otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from softprompt import __version__
from softprompt.errors import SoftpromptError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TERMINAL_JOB_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
IMAGE = f"ghcr.io/softprompt/softprompt:{__version__}"
"""The one image of every step and Ray pod, pinned to the package version."""
RAY_VERSION = "2.60.0"
"""Must match the ray wheel in the image (Dockerfile RAY_VERSION)."""
POLL_SECONDS = 10.0
"""How often a RayJob's status is read."""
SUBMIT_WAIT_SECONDS = 120.0
"""How long a Jobs API submission is retried while the head asks to "try again later"."""
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
    """Create the RayJob (or re-attach to it on 409), wait for a final `status.jobStatus`, print
    the submitter's log, and return how it ended.

    Raises:
        RayLaunchError: on a create error other than 409, a FAILED/STOPPED job, a failed
            deployment (e.g. reason DeadlineExceeded) or when `timeout_seconds` passes
            (default: the RayJob's activeDeadlineSeconds plus 15 minutes).
    """
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = api_client or _kube_api_client()
    custom, core = k8s.CustomObjectsApi(api), k8s.CoreV1Api(api)
    name = body["metadata"]["name"]
    where = f"RayJob {namespace}/{name}"
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
    limit = timeout_seconds if timeout_seconds is not None else body["spec"].get("activeDeadlineSeconds", 43200) + 900
    deadline = time.monotonic() + limit
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
        if time.monotonic() > deadline:
            logs = submitter_logs(core, namespace, name, echo)
            raise RayLaunchError(f"{where} still {job_status or deployment or 'pending'} after {limit:.0f}s; "
                                 f"see `kubectl -n {namespace} describe rayjob {name}`" + ("" if logs else " (no submitter log yet)"))
        time.sleep(POLL_SECONDS if poll_seconds is None else poll_seconds)
    logs = submitter_logs(core, namespace, name, echo)
    if job_status != "SUCCEEDED":
        reason = status.get("reason") or "-"
        raise RayLaunchError(
            f"{where} ended with jobStatus={job_status or '-'} (jobDeploymentStatus={deployment}, reason={reason}): "
            f"{status.get('message', '')}; the driver's log is above. To run it again, delete it "
            f"(`kubectl -n {namespace} delete rayjob {name}`) and retry the step.")
    return RayJobResult(name, namespace, job_status, deployment, attached, logs)


def submitter_logs(core: Any, namespace: str, name: str, echo: Echo = print) -> str:
    """Print and return the log of the RayJob's submitter pod(s) (the Kubernetes Job of the same
    name, which follows the driver's output). Unreadable logs only warn."""
    from kubernetes.client.exceptions import ApiException

    chunks: list[str] = []
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        for pod in pods:
            text = core.read_namespaced_pod_log(pod.metadata.name, namespace)
            text = text if isinstance(text, str) else str(text)
            echo(f"----- log of {pod.metadata.name} (RayJob submitter) -----\n{text.rstrip()}\n----- end of log -----")
            chunks.append(text)
        if not pods:
            echo(f"no submitter pod of {name} found (job-name={name}); see `kubectl -n {namespace} get pods`")
    except ApiException as exc:
        echo(f"warning: could not read the submitter log of {namespace}/{name}: HTTP {exc.status} {exc.reason}")
    return "".join(chunks)


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

    Raises:
        RayLaunchError: when the cluster cannot be reached or the job does not succeed.
    """
    from softprompt import jobs

    if client is None:
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(address)
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
    code = jobs.follow(client, sid)  # streams the driver's log into this step's log
    status = str(client.get_job_status(sid))
    if code != 0:
        raise RayLaunchError(f"Ray job {sid} at {address} ended {status}; the driver's log is above")
    return RayJobResult(sid, "", status, "", attached, "")


# --------------------------------------------------------------------------------------------------


def _submit(client: Any, address: str, sid: str, entrypoint: str, runtime_env: dict[str, Any] | None, echo: Echo) -> bool:
    """Submit; returns True when another attempt had just submitted it (re-attach)."""
    deadline = time.monotonic() + SUBMIT_WAIT_SECONDS
    attempt = 0
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                              metadata={"app": "softprompt", "component": "tune"})
            echo(f"submitted Ray job {sid} to {address}: {entrypoint}")
            return False
        except RuntimeError as exc:
            if "already exists" in str(exc):
                echo(f"Ray job {sid} was just submitted by another attempt: re-attaching")
                return True
            # A head that just started (or restarted) answers 500 "No available agent to submit
            # job, please try again later" until its job agent has registered.
            delay = min(2.0**attempt, 15.0)
            if "try again later" not in str(exc) or time.monotonic() + delay > deadline:
                raise RayLaunchError(f"could not submit Ray job {sid} to {address}: {exc}") from exc
            echo(f"Ray at {address} is not ready to take jobs yet ({exc}); retrying in {delay:.0f}s")
            time.sleep(delay)
            attempt += 1


def _kube_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # outside a cluster: the current kubectl context
    return client.ApiClient()


def _container(name: str, image: str, ports: list[dict[str, Any]], resources: dict[str, Any]) -> dict[str, Any]:
    secret = "softprompt-s3"
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "envFrom": [{"configMapRef": {"name": "softprompt-env"}}],
        "env": [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")],
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
