"""The private Ray APIs softprompt relies on, in one place, checked against the pinned Ray.

Ray's public API has no way to do these, and each is needed by `tune.scheduler: asha_promote` (the
ASHA paper's promotion rule, `softprompt.ray.asha`) or by a quiet console:

- the cluster's internal key-value store (`ray.experimental.internal_kv`): a Train worker held at a
  rung waits there for the scheduler's go, so a paused trial never trains past its rung;
- `TuneController._mark_trial_to_checkpoint`: a paused trial the scheduler stops has no live actor,
  and Ray 2.60 would otherwise save the sweep with it still paused (a restore would rerun it);
- `Trial.set_status` on a trial that `Tuner.restore` re-queued: it goes back to waiting at its rung;
- the logger of Ray Train V2's per-report line, named by its file path (`ray.train_log_level`);
- the driver's sink for forwarded worker output and the console handler of Ray's loggers, which a
  run's console sends to its log files (`softprompt.console`, `softprompt.ray.cluster`);
- the HTTP options of a Serve instance already running on the cluster (`serve.start` silently ignores
  a different port there), so `softprompt serve` prints the address it really listens on.

`tests/unit/test_ray_internals.py` fails when the installed Ray is not `PINNED_RAY` or lacks any
of them, so a Ray upgrade is a conscious change: re-read these against the new sources (Ray's own
`HyperBandScheduler` was measured as the alternative: README, "Ray Tune").
"""

from __future__ import annotations

import inspect
from typing import Any

PINNED_RAY = "2.60.0"
"""The Ray version these calls were read against (pyproject pins ray 2.60.x)."""


def kv_put(key: str, value: bytes, namespace: str) -> None:
    """Store `value` under `key` in the cluster's key-value store (GCS)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, namespace=namespace)


def kv_get(key: str, namespace: str) -> bytes | None:
    """The value stored under `key`, or None."""
    from ray.experimental import internal_kv

    value: bytes | None = internal_kv._internal_kv_get(key, namespace=namespace)
    return value


def save_trial_status(tune_controller: Any, trial: Any) -> None:
    """Have Tune write `trial`'s new status into the next experiment checkpoint (after stopping a
    trial that has no live actor); a no-op where the controller has no such hook."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    mark = getattr(controller, "_mark_trial_to_checkpoint", None)
    if mark is not None:
        mark(trial)


def set_trial_status(trial: Any, status: str) -> None:
    """Set a trial's status before Tune files it (a restored trial that was waiting at a rung)."""
    trial.set_status(status)


def train_report_logger() -> str:
    """The name of the logger that prints Ray Train V2's per-report line (its module's file path)."""
    from ray.train.v2._internal.execution import context

    return str(context.__file__)


def driver_output_sink() -> Any:
    """The module whose `print_to_stdstream` is the driver's sink for what Ray forwards from its
    workers, actors and raylet (`ray._private.worker`); `softprompt.ray.cluster` routes it to a run's logs."""
    import ray._private.worker as ray_worker

    return ray_worker


def console_handler_class() -> Any:
    """`ray._private.log.PlainRayHandler`, the console handler of every Ray logger."""
    import ray._private.log as ray_log

    return ray_log.PlainRayHandler


def serve_http_options() -> dict[str, Any] | None:
    """The host and port of the Ray Serve instance already running on the connected cluster, or None."""
    from ray.serve import context

    client = context._get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return {"host": client.http_config.host, "port": int(client.http_config.port)}


def problems() -> list[str]:
    """What does not match in the installed Ray: its version, or a missing private API."""
    import ray

    found: list[str] = []
    if ray.__version__ != PINNED_RAY:
        found.append(f"ray {ray.__version__} is installed; softprompt.ray.internals was read against {PINNED_RAY}")
    from ray.experimental import internal_kv
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    for owner, name, params in ((internal_kv, "_internal_kv_put", ("key", "value", "namespace")),
                                (internal_kv, "_internal_kv_get", ("key", "namespace")),
                                (TuneController, "_mark_trial_to_checkpoint", ("trial",)),
                                (Trial, "set_status", ("status",))):
        fn = getattr(owner, name, None)
        if fn is None:
            found.append(f"{getattr(owner, '__name__', owner)}.{name} is gone")
            continue
        missing = [p for p in params if p not in inspect.signature(fn).parameters]
        if missing:
            found.append(f"{getattr(owner, '__name__', owner)}.{name} no longer takes {missing}")
    try:
        train_report_logger()
    except ImportError as exc:
        found.append(f"ray.train.v2._internal.execution.context is gone ({exc})")
    sink = driver_output_sink()
    for name in ("print_to_stdstream", "filter_autoscaler_events"):
        if not callable(getattr(sink, name, None)):
            found.append(f"ray._private.worker.{name} is gone")
    from ray.serve import context
    from ray.serve._private.client import ServeControllerClient

    if "raise_if_no_controller_running" not in inspect.signature(context._get_global_client).parameters:
        found.append("ray.serve.context._get_global_client no longer takes raise_if_no_controller_running")
    if not isinstance(getattr(ServeControllerClient, "http_config", None), property):
        found.append("ray.serve._private.client.ServeControllerClient.http_config is gone")
    if not callable(getattr(console_handler_class(), "emit", None)):
        found.append("ray._private.log.PlainRayHandler.emit is gone")
    return found
