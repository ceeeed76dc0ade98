"""A clean console: `softprompt run` through a real local Ray prints our lines only.

The real command in a fresh interpreter (so the terminal is the process's real stdout and stderr,
where Ray's C++ and worker output would land): a local Ray, a one-trial Ray Tune sweep of a Ray
Train run, evaluate and publish, on the tiny task. None of Ray's or the libraries' internals reach
the console; the run's `logs/` folder is named once and holds them. The filter itself (ours and
anyone's errors on the console, the rest in driver.log) is checked in-process without Ray.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from softprompt import console

if TYPE_CHECKING:
    from conftest import TinyTask

INTERNALS = (
    "core_worker.cc", "PreemptionWatcher", "PlacementGroupCleaner", "TensorBoard", "View detailed results",
    "Configuration for experiment", "Starting execution of Dataset", "Execution plan of Dataset", "ray-data",
    "FutureWarning", "Token authentication is", "(raylet)", "worker processes have been started", "Loading weights",
    "autoscaler",
)
"""What a run used to print: Ray's and the libraries' internals, each now in the run's logs/."""


@pytest.mark.slow
def test_a_ray_run_prints_our_lines_only_and_names_its_log_folder_once(tiny_task: TinyTask, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT")}
    overrides = [*tiny_task.overrides, "ray.num_workers=1", "train.steps=2", "train.eval_every=2", "tune.num_samples=1",
                 "tune.search_space={train.lr: {type: choice, values: [0.03]}}", "evaluate.baselines=[zero_shot, few_shot]",
                 f"publish.registry={tmp_path / 'registry'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", "run", "--no-progress", "--run-dir", str(run_dir), *overrides],
        capture_output=True, text=True, env=env, timeout=600,
    )
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    shown = out + err
    assert [word for word in INTERNALS if word in shown] == [], shown[-4000:]
    # Our own lines are all there: the stages, the sweep, the results and the honest verdict.
    for line in ("[1/4] ingest", "[2/4] tune", "started a local Ray", "[tune ", "[3/4] evaluate", "McNemar's exact test", "published: "):
        assert line in out, line
    # Token authentication stays on; only its notice is gone.
    assert "sign in with the token" in out
    logs = run_dir / console.LOG_FOLDER
    assert out.count(f"logs: {logs} ") == 1 and str(logs) not in err
    assert (logs / "driver.log").is_file() and (logs / "ray.log").is_file()
    forwarded = (logs / "ray.log").read_text(encoding="utf-8")
    assert "RayTrainWorker pid=" in forwarded or "TrainController pid=" in forwarded, forwarded[:2000]


def test_the_console_keeps_our_records_and_errors_and_files_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(stream)
    try:
        with console.run_logs(tmp_path, echo=print) as logs:
            assert console.active() is logs
            logging.getLogger("softprompt.job").warning("our own warning")
            # A library's logger (Ray's own, once `import ray` has run anywhere in this process, have a
            # handler of their own: the real run above covers them).
            logging.getLogger("some.library").warning("a library internal")
            logging.getLogger("some.library").error("a trial failed")
            warnings.warn("`x` is deprecated", FutureWarning, stacklevel=1)
            logs.write_forwarded("RayTrainWorker pid=7", ["a worker line"])
        with pytest.raises(RuntimeError), console.run_logs(tmp_path, echo=lambda _: None):
            raise RuntimeError("boom")
    finally:
        root.removeHandler(stream)
    out, err = capsys.readouterr()
    assert out.count(f"logs: {tmp_path / 'logs'} ") == 1 and console.active() is None
    assert "our own warning" in err and "a trial failed" in err
    assert "a library internal" not in err and "FutureWarning" not in err
    assert f"output for this run: {tmp_path / 'logs'}" in err  # an error names the folder again
    driver = (tmp_path / "logs" / "driver.log").read_text()
    assert "a library internal" in driver and "FutureWarning" in driver and "a trial failed" in driver
    assert (tmp_path / "logs" / "ray.log").read_text() == "(RayTrainWorker pid=7) a worker line\n"
