"""Ray Jobs: run a `softprompt` command on a Ray cluster as a Ray Job and follow it.

    softprompt tune -c cfg.yaml --submit http://HEAD:8265    # runs the same command as a Ray Job

A submitted job gets a deterministic submission id (a hash of the resolved config, the data and
the command), so submitting again re-attaches to the job instead of starting it twice; a failed or
stopped job is retried under the next attempt id (`...-r2`) and resumes from its checkpoints.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from softprompt.config import JobConfig, to_dict
from softprompt.errors import SoftpromptError

log = logging.getLogger(__name__)

JOB_CONFIG = "job_config.yaml"
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(command: str, cfg: JobConfig, args: list[str] | None = None) -> str:
    """The deterministic id of a job: the command and its flags, the resolved config and the data's content."""
    h = hashlib.sha256()
    h.update(json.dumps({"command": command, "args": args or [], "config": to_dict(cfg)}, sort_keys=True, default=str).encode())
    for uri in (cfg.data.train, cfg.data.eval, cfg.data.test):
        if uri and not uri.startswith("s3://") and Path(uri).is_file():
            with open(uri, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    name = re.sub(r"[^a-z0-9-]", "-", (cfg.run_name or cfg.task.name).lower())[:40].strip("-")
    return f"softprompt-{command}-{name}-{h.hexdigest()[:12]}"


def submit(cfg: JobConfig, command: str, address: str, *, run_dir: str | None = None, extra_args: list[str] | None = None) -> int:
    """Run `softprompt <command>` as a Ray Job and follow it to the end.

    The job gets the resolved config (overrides applied, local paths made absolute) as
    `job_config.yaml` in its working directory, and `--ray-address auto`. Local paths must exist on
    the cluster's head as well (same machine, or a shared filesystem); on a remote cluster use
    `s3://` data, `publish.store` and `ray.storage_path`. Submitting the same command again
    re-attaches; a job that failed or was stopped is retried as the next attempt.

    Args:
        cfg: The resolved configuration.
        command: `tune` or `run`.
        address: The dashboard address, e.g. `http://HEAD:8265`.
        run_dir: `--run-dir`, passed on (made absolute) when given.
        extra_args: Further flags for the command (e.g. `--no-publish`).

    Returns:
        The exit code: 0 when the job succeeded, 1 when it failed or was stopped, 130 when you
        stopped following it (the job keeps running; the same command re-attaches).
    """
    from ray.job_submission import JobSubmissionClient

    job_cfg = _portable(cfg)
    flags = [*(["--run-dir", str(Path(run_dir).resolve())] if run_dir else []), *(extra_args or [])]
    base = submission_id(command, job_cfg, flags)
    try:
        client = JobSubmissionClient(address)
        existing = {j.submission_id: str(j.status) for j in client.list_jobs() if j.submission_id}
    except (OSError, RuntimeError, ValueError) as exc:  # OSError: requests' ConnectionError too
        raise SoftpromptError(f"cannot reach the Ray Jobs API at {address}: {exc}; pass the dashboard address, e.g. http://HEAD:8265") from exc
    sid, attempt = base, 1
    while existing.get(sid) in ("FAILED", "STOPPED"):
        attempt += 1
        sid = f"{base}-r{attempt}"
    if sid in existing:
        print(f"job {sid} exists ({existing[sid]}); re-attaching")
    else:
        args = [command, "-c", JOB_CONFIG, "--ray-address", "auto", "--no-progress"]
        if run_dir:
            args += ["--run-dir", str(Path(run_dir).resolve())]
        entrypoint = "softprompt " + " ".join(_quote(a) for a in [*args, *(extra_args or [])])
        with tempfile.TemporaryDirectory(prefix="softprompt-job-") as tmp:
            (Path(tmp) / JOB_CONFIG).write_text(yaml.safe_dump(to_dict(job_cfg), sort_keys=False))
            submit_job(client, address, sid, entrypoint, runtime_env={"working_dir": tmp},
                       metadata={"softprompt_command": command, "softprompt_run": str(job_cfg.run_name),
                                 "job_name": str(job_cfg.run_name or sid)})  # the dashboard's Jobs "Name" column
    return follow(client, sid)


class SubmitError(SoftpromptError):
    """A Ray Job could not be submitted."""


SUBMIT_WAIT_SECONDS = 120.0
"""How long `submit_job` keeps retrying a head that is not ready or a dropped connection."""


def submit_job(
    client: Any, address: str, sid: str, entrypoint: str, *, runtime_env: dict[str, Any] | None, metadata: dict[str, str],
    echo: Callable[[str], None] = print, wait_seconds: float = SUBMIT_WAIT_SECONDS,
) -> bool:
    """Submit a Ray Job under a fixed submission id; returns True when that id already exists
    (another attempt, or this one before a dropped connection, submitted it): follow it instead.

    Transient failures are retried with backoff for up to `wait_seconds`: a head that just started
    (or restarted) answers 500 "No available agent to submit job, please try again later" until
    its job agent has registered, and a busy head may drop the connection (requests'
    ConnectionError, an OSError), perhaps after it created the job, in which case the retry meets
    "already exists" and re-attaches. Anything else raises `SubmitError` at once.
    """
    deadline = time.monotonic() + wait_seconds
    attempt = 0
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env, metadata=metadata)
            echo(f"submitted Ray job {sid} to {address}: {entrypoint}")
            return False
        except (RuntimeError, OSError) as exc:
            if isinstance(exc, RuntimeError) and "already exists" in str(exc):
                echo(f"Ray job {sid} was just submitted by another attempt: re-attaching")
                return True
            if isinstance(exc, OSError):
                what = f"the connection to Ray at {address} dropped ({exc})"
            elif "try again later" in str(exc):
                what = f"Ray at {address} is not ready to take jobs yet ({exc})"
            else:
                raise SubmitError(f"could not submit Ray job {sid} to {address}: {exc}") from exc
            delay = min(2.0**attempt, 15.0)
            if time.monotonic() + delay > deadline:
                raise SubmitError(f"could not submit Ray job {sid} to {address}: {exc}") from exc
            echo(f"{what}; retrying in {delay:.0f}s")
            time.sleep(delay)
            attempt += 1


def follow(client: Any, sid: str) -> int:
    """Stream a job's logs to stdout until it ends; the exit code follows its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
        status = str(client.get_job_status(sid))
        while status not in _TERMINAL:  # the log stream can close a moment before the status flips
            time.sleep(1.0)
            status = str(client.get_job_status(sid))
    except KeyboardInterrupt:
        print(f"\nstopped following job {sid}; it keeps running. Rerun the same command to re-attach.", file=sys.stderr)
        return 130
    info = client.get_job_info(sid)
    print(f"job {sid} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


# --------------------------------------------------------------------------------------------------


def _portable(cfg: JobConfig) -> JobConfig:
    """The config as the job will see it: local paths absolute (the job's working directory is a
    copy of this one's config only) and a run name fixed now, so a retry lands in the same run."""
    from softprompt.config import config_from_dict

    raw = to_dict(cfg)

    def absolute(section: str, key: str, must_exist: bool) -> None:
        value = raw[section][key]
        if isinstance(value, str) and value and "://" not in value and (not must_exist or Path(value).exists()):
            raw[section][key] = str(Path(value).expanduser().resolve())

    for key in ("train", "eval", "test"):
        absolute("data", key, True)
    absolute("model", "name", True)
    absolute("prompt", "init_from", True)
    absolute("publish", "registry", False)
    absolute("ray", "storage_path", False)
    raw["workdir"] = str(Path(raw["workdir"]).resolve())
    raw["ray"]["address"] = None
    if not raw["run_name"]:
        raw["run_name"] = submission_id("run-name", cfg).rsplit("-", 1)[-1][:8]
        raw["run_name"] = f"{cfg.task.name}-{raw['run_name']}"
    return config_from_dict(raw)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
