"""The terminal's view of a Ray Tune sweep and the `softprompt_trials` gauge.

A Ray Tune callback on the driver that prints a line per event (trial started, evaluated, paused,
stopped, finished, errored) with the trial's state, metric and the best so far. Plain lines rather
than a redrawn table, so the logs of a Ray Job read the same as a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

TUNE_METRIC = "best_metric"
"""What trials are ranked, stopped (ASHA) and searched (Optuna) on: the best eval result so far."""


class LiveView(Callback):
    """The terminal's view of the sweep, and the `softprompt_trials` gauge (tag `state`).

    A Ray Tune callback on the driver: a line per event (trial started, evaluated, stopped, finished,
    errored) with the trial's state, metric and the best so far, and a status line of counts.
    Plain lines rather than a redrawn table, so logs of a Ray Job read the same.
    """

    def __init__(self, metric: str, total: int, steps: int, *, enabled: bool = True) -> None:
        self.metric, self.total, self.steps, self.enabled = metric, total, steps, enabled
        self.states: dict[str, str] = {}
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore brings back the callbacks pickled with the sweep; a monotonic clock read in
        # another process means nothing here, so the restored view times this driver's run.
        self.__dict__.update(state)
        self.started = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "running"
        step = (trial.last_result or {}).get("step")
        if step is not None:  # promoted past its rung (asha_promote), or restored: its Train run goes on
            self._line(f"trial {trial.trial_id} resumes from step {step}")
            return
        params = ", ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in sorted((trial.config or {}).items()))
        self._line(f"trial {trial.trial_id} started ({params})")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        value, best = result.get(f"eval_{self.metric}"), result.get(TUNE_METRIC)
        if best is not None and (self.best is None or best > self.best[0]):
            self.best = (float(best), trial.trial_id)
        if value is not None:
            self._line(f"trial {trial.trial_id} step {result.get('step')}: {self.metric} {value:.4f} (trial best {best:.4f})")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        # Tune has no pause event for callbacks: asha_promote's paused trials are seen by status.
        for trial in trials:
            if trial.status == "PAUSED" and self.states.get(trial.trial_id) == "running":
                self.states[trial.trial_id] = "paused"
                self._line(f"trial {trial.trial_id} waits at step {(trial.last_result or {}).get('step')} until the rung can judge it")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step") or 0
        self.states[trial.trial_id] = "finished" if step >= self.steps else "stopped"
        self._line(f"trial {trial.trial_id} {self.states[trial.trial_id]} at step {step}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "errored"
        self._line(f"trial {trial.trial_id} errored: {getattr(trial, 'error_file', None) or 'see its logs'}")

    def _line(self, event: str) -> None:
        counts = {s: sum(v == s for v in self.states.values()) for s in ("running", "paused", "stopped", "finished", "errored")}
        try:
            from ray.util.metrics import Gauge

            gauge = _trials_gauge(Gauge)
            for state, n in counts.items():
                gauge.set(n, tags={"state": state})
        except (ImportError, ValueError, RuntimeError):  # metrics are best effort; the sweep goes on
            pass
        if not self.enabled:
            return
        pending = self.total - len(self.states)
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
        elapsed = time.monotonic() - self.started
        status = ", ".join(f"{n} {s}" for s, n in counts.items() if n) + (f", {pending} pending" if pending > 0 else "")
        print(f"[tune {elapsed:5.0f}s] {event} | {status} | {best}", file=sys.stdout, flush=True)


_GAUGE: list[Any] = []


def _trials_gauge(gauge_cls: Any) -> Any:
    if not _GAUGE:
        _GAUGE.append(gauge_cls("softprompt_trials", "Ray Tune trials of the sweep by state.", tag_keys=("state",)))
    return _GAUGE[0]


def short(value: Any) -> str:
    """A parameter value for one-line displays (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
