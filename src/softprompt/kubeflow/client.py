"""Talking to a Kubeflow Pipelines API: upload a new pipeline version, start a run in an
experiment, and create, pause, resume and list recurring runs.

Every submission compiles the pipeline of the installed package and uploads it as a new version
of the pipeline "softprompt", named `<package version>-<spec hash>` unless `--version` says
otherwise; submitting an identical spec again reuses that version. Runs and schedules reference
the version, so the KFP UI shows which code each run used.

Auth: a bearer token (`--token`, `$KFP_TOKEN`), a token file re-read on each call (`--token-file`,
or the in-cluster ServiceAccount token KFP mounts at /var/run/secrets/kubeflow/pipelines/token),
or none (a port-forward to a single-user deployment).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt import __version__
from softprompt.errors import SoftpromptError

PIPELINE_NAME = "softprompt"
DEFAULT_SA_TOKEN = "/var/run/secrets/kubeflow/pipelines/token"
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# (name, low, high, names accepted in place of numbers)
_CRON_FIELDS = (
    ("second", 0, 59, ()), ("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day-of-week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)


class KfpError(SoftpromptError):
    """A Kubeflow Pipelines API call failed or was refused; the message says which and why."""


@dataclass(frozen=True)
class SubmitResult:
    """What `submit` created."""

    kfp: Any
    """The connected `kfp.Client` (to wait on the run)."""
    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    run_id: str


@dataclass(frozen=True)
class ScheduleResult:
    """What `schedule` created."""

    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    recurring_run_id: str


def connect(host: str | None, *, token: str | None = None, token_file: str | None = None, namespace: str | None = None) -> Any:
    """A `kfp.Client` for `host` with the first credentials available: `token`, the token file,
    the in-cluster ServiceAccount token, or none."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    credentials = None
    if not token:
        path = token_file or os.environ.get("KF_PIPELINES_SA_TOKEN_PATH") or DEFAULT_SA_TOKEN
        if token_file and not Path(token_file).is_file():
            raise KfpError(f"--token-file {token_file} does not exist")
        if Path(path).is_file():
            credentials = ServiceAccountTokenVolumeCredentials(path)
    kwargs: dict[str, Any] = {"host": host, "existing_token": token or None, "credentials": credentials}
    if namespace:
        kwargs["namespace"] = namespace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        try:
            return kfp.Client(**kwargs)
        except Exception as exc:
            raise KfpError(f"cannot reach the Kubeflow Pipelines API at {host or '(in-cluster default)'}: {exc}") from exc


def submit(
    client: Any,
    arguments: dict[str, Any],
    *,
    experiment: str = "softprompt",
    version: str | None = None,
    run_name: str | None = None,
    image: str | None = None,
    service_account: str | None = "softprompt-pipeline",
    namespace: str | None = None,
) -> SubmitResult:
    """Upload the pipeline as a new version and start one run of it in `experiment`."""
    pipeline_id, version_id, version_name = upload_version(client, version=version, image=image, namespace=namespace)
    experiment_id = _call(f"create experiment {experiment!r}", client.create_experiment, name=experiment, namespace=namespace).experiment_id
    run = _call("create run", client.run_pipeline, experiment_id=experiment_id,
                job_name=run_name or f"softprompt {dt.datetime.now():%Y-%m-%d %H:%M:%S}", params=arguments,
                pipeline_id=pipeline_id, version_id=version_id, service_account=service_account)
    return SubmitResult(client, pipeline_id, version_id, version_name, experiment_id, run.run_id)


def schedule(
    client: Any,
    arguments: dict[str, Any],
    *,
    cron: str,
    name: str = "softprompt-nightly",
    experiment: str = "softprompt",
    version: str | None = None,
    image: str | None = None,
    service_account: str | None = "softprompt-pipeline",
    namespace: str | None = None,
    replace: bool = False,
) -> ScheduleResult:
    """Upload the pipeline as a new version and create the recurring run `name` on `cron` (one run
    at a time, no catch-up of missed runs). With `replace`, older recurring runs of that name are
    deleted once the new one exists; without it, an existing name is an error."""
    cron = validate_cron(cron)
    existing = _schedules_named(client, name, namespace)
    if existing and not replace:
        raise KfpError(f"a recurring run named {name!r} already exists ({', '.join(existing)}); "
                       "pass --replace to swap it for the new one, or choose another --name")
    pipeline_id, version_id, version_name = upload_version(client, version=version, image=image, namespace=namespace)
    experiment_id = _call(f"create experiment {experiment!r}", client.create_experiment, name=experiment, namespace=namespace).experiment_id
    created = _call("create recurring run", client.create_recurring_run, experiment_id=experiment_id, job_name=name,
                    cron_expression=cron, max_concurrency=1, no_catchup=True, params=arguments, pipeline_id=pipeline_id,
                    version_id=version_id, enabled=True, service_account=service_account)
    for old in existing:
        _call(f"delete recurring run {old}", client.delete_recurring_run, recurring_run_id=old)
    return ScheduleResult(pipeline_id, version_id, version_name, experiment_id, created.recurring_run_id)


def upload_version(client: Any, *, version: str | None = None, image: str | None = None, namespace: str | None = None) -> tuple[str, str, str]:
    """Compile the pipeline and upload it as a version of "softprompt" (creating the pipeline on
    first use). Returns (pipeline id, version id, version name)."""
    import kfp_server_api

    from softprompt.kubeflow.pipeline import compile_pipeline, spec_digest

    with tempfile.TemporaryDirectory(prefix="softprompt-kfp-") as tmp:
        package = compile_pipeline(Path(tmp) / "softprompt_pipeline.yaml", image=image)
        name = version or f"{__version__}-{spec_digest(package)}"
        pipeline_id = _call("look up the pipeline", client.get_pipeline_id, PIPELINE_NAME)
        if pipeline_id is None:
            body = kfp_server_api.V2beta1Pipeline(display_name=PIPELINE_NAME, namespace=namespace,
                                                  description="softprompt: validate → ingest → tune → evaluate → publish")
            pipeline_id = _call("create the pipeline", client.pipelines.pipeline_service_create_pipeline, pipeline=body).pipeline_id
        try:
            uploaded = client.upload_pipeline_version(str(package), pipeline_version_name=name, pipeline_id=pipeline_id)
            return pipeline_id, uploaded.pipeline_version_id, name
        except kfp_server_api.ApiException as exc:
            if exc.status != 409:
                raise KfpError(f"upload pipeline version {name!r}: HTTP {exc.status} {exc.reason}: {_body(exc)}") from exc
    # 409: this exact spec (same name) was uploaded before; reuse that version.
    listed = _call("list pipeline versions", client.list_pipeline_versions, pipeline_id, filter=_name_filter(name))
    for v in listed.pipeline_versions or []:
        if v.display_name == name:
            return pipeline_id, v.pipeline_version_id, name
    raise KfpError(f"pipeline version {name!r} exists but could not be found; pass another --version")


def set_schedule_enabled(client: Any, name_or_id: str, *, enabled: bool, namespace: str | None = None) -> str:
    """Enable or disable the recurring run with that name (or id); returns its id."""
    ids = _schedules_named(client, name_or_id, namespace) or [name_or_id]
    if len(ids) > 1:
        raise KfpError(f"several recurring runs are named {name_or_id!r} ({', '.join(ids)}); pass an id")
    call = client.enable_recurring_run if enabled else client.disable_recurring_run
    _call(f"{'resume' if enabled else 'pause'} recurring run {name_or_id!r}", call, recurring_run_id=ids[0])
    return ids[0]


def list_schedules(client: Any, *, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every recurring run: id, name, status (ENABLE/DISABLE), cron and pipeline version."""
    rows: list[dict[str, Any]] = []
    token = ""
    while True:
        page = _call("list recurring runs", client.list_recurring_runs, page_token=token, page_size=100, namespace=namespace)
        for r in page.recurring_runs or []:
            cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""
            ref = r.pipeline_version_reference
            rows.append({"id": r.recurring_run_id, "name": r.display_name, "status": str(r.mode or r.status or ""),
                         "cron": cron, "version_id": ref.pipeline_version_id if ref else ""})
        token = page.next_page_token or ""
        if not token:
            return rows


def wait(client: Any, run_id: str, *, timeout_seconds: int = 86400) -> str:
    """Wait for a run to end; returns its state (SUCCEEDED, FAILED, ...)."""
    run = _call(f"wait for run {run_id}", client.wait_for_run_completion, run_id, timeout_seconds)
    return str(run.state)


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression: six fields, seconds first (`0 0 3 * * *` = daily 03:00:00),
    or a descriptor such as `@daily` or `@every 6h`. Returns it normalized (single spaces).

    Raises:
        KfpError: naming the field and value at fault; a five-field crontab line gets the
            six-field spelling suggested.
    """
    expr = " ".join(expression.split())
    if expr.startswith("@"):
        if expr in _DESCRIPTORS or re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", expr):
            return expr
        raise KfpError(f"cron {expression!r}: unknown descriptor; use one of {', '.join(_DESCRIPTORS)} or '@every 6h'")
    fields = expr.split(" ") if expr else []
    if len(fields) == 5:
        raise KfpError(f"cron {expression!r} has 5 fields, but KFP's cron has six, seconds first "
                       f"(second minute hour day-of-month month day-of-week): did you mean '0 {expr}'?")
    if len(fields) != 6:
        raise KfpError(f"cron {expression!r} has {len(fields)} fields; KFP's cron has six, seconds first, "
                       "e.g. '0 0 3 * * *' for every day at 03:00:00")
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        problem = _cron_field_problem(text, low, high, names, allow_question=name in ("day-of-month", "day-of-week"))
        if problem:
            raise KfpError(f"cron {expression!r}: {name} field {text!r} {problem}")
    return expr


# --------------------------------------------------------------------------------------------------


def _cron_field_problem(text: str, low: int, high: int, names: tuple[str, ...], *, allow_question: bool) -> str | None:
    def value(token: str) -> int | None:
        if token.upper() in names:
            return names.index(token.upper()) + low
        return int(token) if token.isdigit() else None

    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            return f"has step {step!r}; use a positive whole number after '/'"
        if base in ("*", "?"):
            if base == "?" and not allow_question:
                return "uses '?', which only day-of-month and day-of-week accept"
            continue
        bounds = base.split("-")
        if len(bounds) > 2 or not all(bounds):
            return f"has {part!r}; use N, N-M, */N, N/S or a comma-separated list of those"
        numbers = [value(b) for b in bounds]
        if any(n is None for n in numbers):
            return f"has {part!r}, which is not a number" + (f" or one of {', '.join(names)}" if names else "")
        if any(not low <= n <= high for n in numbers if n is not None):
            return f"has {part!r}, outside {low}-{high}"
    return None


def _schedules_named(client: Any, name: str, namespace: str | None) -> list[str]:
    page = _call("list recurring runs", client.list_recurring_runs, page_size=100, namespace=namespace, filter=_name_filter(name))
    return [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    import kfp_server_api

    try:
        return fn(*args, **kwargs)
    except kfp_server_api.ApiException as exc:
        raise KfpError(f"{what}: HTTP {exc.status} {exc.reason}: {_body(exc)}") from exc


def _body(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")
