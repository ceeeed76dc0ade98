"""The console of a run: our progress and results on the terminal, everyone else's output in files.

While `run_logs(run_dir)` is open, the terminal shows softprompt's own lines (stages, the trial
view, tables, verdicts, our progress bars) and real errors (ERROR records from anyone, and the
errors the commands print with their fix). Everything else goes to `<run_dir>/logs/`, whose path
is printed once:

- `driver.log`: every other log record of this process, at INFO and above: Ray and Ray Tune/Train/
  Data on the driver, transformers, and Python warnings (FutureWarning and friends).
- `ray.log`: what Ray forwards from its processes: each trial's, Train controller's, Train worker's
  and Ray Data actor's stdout/stderr (`core_worker.cc` lines, `PlacementGroupCleaner`, Ray Data's
  execution lines, the workers' warnings) and the raylet's notices.

Ray's own session logs stay where Ray keeps them (`/tmp/ray/session_*/logs`). Ray is never
imported here: the Ray layer (`softprompt.ray.cluster`) routes Ray's output into `active()`'s
files before `ray.init`, so the core stays importable without Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

LOG_FOLDER = "logs"
"""The run folder's sub-folder that holds the logs."""

_QUIET_ENV = {
    # Ray Tune prints an experiment banner, "View detailed results here" and a TensorBoard hint even
    # with verbose=0 (its new output engine); the legacy engine at verbose=0 prints nothing.
    "RAY_AIR_NEW_OUTPUT": "0",
}


@dataclass
class RunLogs:
    """The open log files of a run."""

    folder: Path
    """`<run_dir>/logs`."""
    driver: Path
    """This process's log records that are not ours (Ray on the driver, libraries, warnings)."""
    ray: Path
    """Output Ray forwards from its workers and actors, and the raylet's notices."""
    driver_handler: logging.Handler | None = None
    """The handler that writes driver.log; Ray's console handler hands its records to it."""
    _ray_file: TextIO | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write_forwarded(self, source: str, lines: list[str]) -> None:
        """Append lines Ray forwarded from `source` (e.g. `RayTrainWorker pid=123`) to ray.log."""
        with self._lock:
            if self._ray_file is None:
                self._ray_file = self.ray.open("a", encoding="utf-8")
            self._ray_file.writelines(f"({source}) {line}\n" for line in lines)
            self._ray_file.flush()

    def close(self) -> None:
        with self._lock:
            if self._ray_file is not None:
                self._ray_file.close()
                self._ray_file = None


_active: RunLogs | None = None


def active() -> RunLogs | None:
    """The run whose logs are open in this process, or None."""
    return _active


@contextmanager
def run_logs(run_dir: str | Path, *, echo: Callable[[str], None] = print) -> Iterator[RunLogs]:
    """Keep the terminal to our own lines while the block runs; the rest goes to `<run_dir>/logs/`.

    Args:
        run_dir: The run folder.
        echo: Receives the one line that says where the logs are.

    Yields:
        The log files. On an exception, the folder is named on stderr again before it propagates.
    """
    global _active
    folder = Path(run_dir) / LOG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    logs = RunLogs(folder, folder / "driver.log", folder / "ray.log")
    logs.ray.touch()
    handler = logging.FileHandler(logs.driver, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    consoles = [h for h in root.handlers if _is_console(h)]
    quiet = _ConsoleFilter()
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    for h in consoles:
        h.addFilter(quiet)
    root.addHandler(handler)
    logging.captureWarnings(True)
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    undo_transformers = _quiet_transformers()
    logs.driver_handler = handler
    _active = logs
    echo(f"logs: {folder} (Ray's and the libraries' output: driver.log, ray.log)")
    try:
        yield logs
    except BaseException:
        print(f"Ray's and the libraries' output for this run: {folder}", file=sys.stderr)
        raise
    finally:
        _active = None
        undo_transformers()
        for key, saved in saved_env.items():
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
        for h in consoles:
            h.removeFilter(quiet)
        logs.close()


def ray_log_level() -> int:
    """The `logging_level` for `ray.init`: INFO while a run's logs are open (it goes to driver.log),
    else WARNING (the console)."""
    return logging.INFO if _active is not None else logging.WARNING


# --------------------------------------------------------------------------------------------------


class _ConsoleFilter(logging.Filter):
    """On the terminal: softprompt's own records, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "softprompt" or record.name.startswith("softprompt.") or record.levelno >= logging.ERROR


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _quiet_transformers() -> Callable[[], None]:
    """transformers logs through its own stderr handler and draws its own progress bars (loading
    weights); send its records to the root logger (so to driver.log) and hide its bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # not installed: nothing to quiet
        return lambda: None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()

    def undo() -> None:
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        if bars:
            hf_logging.enable_progress_bar()

    return undo
