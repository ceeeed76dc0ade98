"""Where a Ray command runs: a local Ray this command starts (dashboard on), or a cluster it joins.

    softprompt tune -c cfg.yaml                              # starts a local Ray
    softprompt tune -c cfg.yaml --ray-address auto           # joins this machine's cluster

A local Ray is sized for one machine (every core plus a logical CPU for the processes that only
wait), and a run that cannot fit it is refused at once instead of waiting for resources forever.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from softprompt import console
from softprompt.config import RayConfig
from softprompt.errors import SoftpromptError

TRIAL_CPU = 0.01
"""Logical CPU a Tune trial's own process reserves: it only drives its Train run, whose workers
reserve the real resources (Tune refuses an all-zero request, hence a sliver)."""


def local_num_cpus(rc: RayConfig) -> int:
    """Logical CPUs of a local Ray: `ray.num_cpus`, else every core plus one.

    The extra logical CPU is for the processes that only wait (Tune trials, Train controllers): on a
    2-core laptop, 2 workers x 1 CPU plus a trial's sliver would otherwise never fit, and the run
    would wait for resources until it times out.
    """
    if rc.num_cpus is not None:
        return rc.num_cpus
    return max(os.cpu_count() or 1, math.ceil(rc.num_workers * rc.cpus_per_worker)) + 1


def run_reservation(rc: RayConfig, *, tuning: bool) -> tuple[float, float]:
    """(logical CPUs, GPUs) one training run reserves: its workers, plus a Tune trial's own sliver
    of a CPU when it runs as a trial."""
    cpus = rc.num_workers * rc.cpus_per_worker + (TRIAL_CPU if tuning else 0.0)
    gpus = rc.num_workers * (rc.gpus_per_worker or 1.0) if rc.use_gpu else 0.0
    return cpus, gpus


def check_fits(rc: RayConfig, *, tuning: bool) -> None:
    """Refuse, at once, a run whose one training run cannot fit the local Ray this command started.

    A joined cluster is not checked: an autoscaler may still add the nodes.

    Raises:
        SoftpromptError: naming what one run needs, what the cluster has, and the settings to change.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = run_reservation(rc, tuning=tuning)
    if total.get("CPU", 0.0) + 1e-9 < cpus:
        raise SoftpromptError(
            f"one training run needs {cpus:g} logical CPUs (ray.num_workers={rc.num_workers} x ray.cpus_per_worker="
            f"{rc.cpus_per_worker:g}{' + a trial' if tuning else ''}) but this local Ray has {total.get('CPU', 0.0):g} "
            "(ray.num_cpus); lower ray.num_workers or ray.cpus_per_worker, or raise ray.num_cpus"
        )
    if total.get("GPU", 0.0) + 1e-9 < gpus:
        raise SoftpromptError(
            f"ray.use_gpu=true with {rc.num_workers} workers x {rc.gpus_per_worker or 1.0:g} GPUs, but this local Ray has "
            f"{total.get('GPU', 0.0):g} GPUs; lower ray.num_workers / ray.gpus_per_worker, or set ray.use_gpu=false"
        )


def init_ray(rc: RayConfig, address: str | None = None, *, tuning: bool = True, job_config: Any = None) -> str:
    """Connect this process to Ray.

    Args:
        rc: The `ray` section (its `address`, local `num_cpus`, `dashboard`, and the workers one
            run needs, checked against a local Ray).
        address: `--ray-address`, which wins over `rc.address`: None starts a local Ray with its
            dashboard (inside a Ray Job it joins the job's cluster); `auto` or `HOST:PORT` joins.
        tuning: Runs will be Tune trials (each adds a trial's sliver of a CPU), for the check that
            one run fits a local Ray.
        job_config: This driver's `ray.job_config.JobConfig` (`softprompt.ray.dashboard.job_config`
            names its Ray job after the run in the dashboard); None for Ray's default.

    Returns:
        One line for people: what was started or joined, and the dashboard URL.

    Raises:
        SoftpromptError: when the cluster cannot be reached (names the address), or one run does
            not fit the local Ray.
    """
    import ray

    if ray.is_initialized():
        return "using the Ray this process is already connected to"
    target = address or rc.address or os.environ.get("RAY_ADDRESS")
    # Inside `softprompt run`/`tune`, Ray's own console output (its loggers, the workers' forwarded
    # stdout/stderr, the raylet's notices) goes to the run's log files (softprompt.console).
    log_level = _route_ray_output()
    try:
        if target:
            ctx = ray.init(address=target, logging_level=log_level, job_config=job_config)
            what = f"joined Ray at {target}"
        else:
            # The dashboard stays on: a trial that ASHA stops is killed with its Train controller,
            # and Ray Train's PlacementGroupCleaner then frees the workers' placement group; it
            # asks the dashboard (State API) whether the controller is gone. Without it the group
            # leaks and starves the next trial. The cleaner finds the dashboard by auto-detection,
            # which fails when several Ray instances run on one machine; naming our dashboard in
            # RAY_API_SERVER_ADDRESS while Ray starts (its processes keep the variable) prevents
            # that. This process drops it again: here it would redirect every Jobs API client.
            port = _free_port() if rc.dashboard else None
            own = port is not None and not os.environ.get("RAY_API_SERVER_ADDRESS")
            if own:
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # Token authentication stays on (Ray 2.60 turns it on for a new local Ray unless
            # RAY_AUTH_MODE says otherwise); only Ray's notice that it did is kept off the console,
            # and our own line below says how to sign in.
            notice = logging.getLogger(AUTH_NOTICE_LOGGER)
            level = notice.level
            notice.setLevel(logging.ERROR)
            try:
                ctx = ray.init(
                    num_cpus=local_num_cpus(rc), include_dashboard=rc.dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                    logging_level=log_level, job_config=job_config,
                )
            finally:
                notice.setLevel(level)
                if own:
                    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            what = "started a local Ray"
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SoftpromptError(f"cannot connect to Ray at {target or 'a new local instance'}: {exc}; check --ray-address / ray.address") from exc
    if not target:
        check_fits(rc, tuning=tuning)
    url = getattr(ctx, "dashboard_url", None)
    if not url:
        return what
    return f"{what} (dashboard http://{url}{SIGN_IN if auth_token_required() else ''})"


AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's 'token authentication is enabled' notice."""

SIGN_IN = "; sign in with the token `ray get-auth-token` prints"
"""How to open the dashboard of a Ray with token authentication; the token itself is never printed
(run logs get shared)."""


def auth_token_required() -> bool:
    """Whether the Ray this process uses asks for a token (RAY_AUTH_MODE=token)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _route_ray_output() -> int:
    """While a run's logs are open (`softprompt.console.run_logs`), send Ray's console output to
    them; returns the `logging_level` for `ray.init`.

    Two private seams of Ray 2.60, patched once per process and inert when no run's logs are open:
    `ray._private.worker.print_to_stdstream`, the driver's sink for the output Ray forwards from
    its workers and actors and for the raylet's notices (ray.init binds it when it connects and the
    notices look it up on each call, so patching before init covers both), and the `emit` of
    `ray._private.log.PlainRayHandler`, the console handler of every Ray logger (ray, ray.data, ...).
    Token authentication is untouched; its notice is a record of one of those loggers.
    """
    if console.active() is None:
        return console.ray_log_level()
    from softprompt.ray import internals

    ray_worker = internals.driver_output_sink()
    if not getattr(ray_worker.print_to_stdstream, "_softprompt", False):
        original_print = ray_worker.print_to_stdstream

        def to_ray_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
            logs = console.active()
            if logs is None:
                original_print(data, ignore_prefix)
                return
            pid, lines = data.get("pid"), [str(line) for line in data.get("lines", [])]
            if pid == "autoscaler":  # its status dump every few seconds; Ray too keeps only the events
                lines = list(ray_worker.filter_autoscaler_events(lines))
            source = pid if pid in ("raylet", "autoscaler") else f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={pid}"
            if lines:
                logs.write_forwarded(str(source), lines)

        to_ray_log._softprompt = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = to_ray_log
    handler_class = internals.console_handler_class()
    if not getattr(handler_class.emit, "_softprompt", False):
        original_emit = handler_class.emit

        def emit(self: Any, record: logging.LogRecord) -> None:
            logs = console.active()
            sink = logs.driver_handler if logs is not None else None
            if sink is None or record.levelno >= logging.ERROR:  # errors stay on the console too
                original_emit(self, record)
            if sink is not None:
                sink.handle(record)

        emit._softprompt = True  # type: ignore[attr-defined]
        handler_class.emit = emit
    return console.ray_log_level()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
