"""Finding a run in the Ray dashboard: the driver's Ray job and the sweep's trials carry the run's name.

    ray.init(..., job_config=dashboard.job_config(cfg, run_dir, "ray-tune"))

A `softprompt run` or `softprompt tune` driver is a plain Ray driver: without this the dashboard
lists it by a hex job id only, and its actors (Tune trials, Train controllers and workers) by their
class names. Ray 2.60's dashboard has no Train or Tune page, so a Ray Train run name or a Tune
experiment name is shown nowhere; what it does show is a job's `job_name` metadata (the Jobs page's
"Job Name" column, which its name filter searches), the job's metadata on its page, and an actor's
`repr` (the actor tables' "Repr" column). So:

- the driver's job gets `job_name` = the run's name (its run folder's name: `run_name`, or
  `<task>-<timestamp>` without one) and the task, trainer, model, run folder and resolved config
  as metadata (`job_metadata`);
- every Tune trial's actor reprs as the run's name (`sweep_label`), so the job's actor table tells
  the sweep's trials apart from Ray's own actors; the trials' Ray Train workers (`RayTrainWorker`)
  are listed beside them, each with a Log link.

A job submitted with `--submit` is listed by its submission id, which already holds the run's
name (`softprompt.ray.jobs.submission_id`); Ray keeps the submission's metadata for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from softprompt.config import JobConfig, to_dict

JOB_NAME = "job_name"
"""The metadata key Ray's dashboard shows as a job's name (Jobs page, "Job Name" column)."""


def run_name(run_dir: str | Path) -> str:
    """The run's name as a person knows it: its run folder's name (`<workdir>/<run_name>`)."""
    return Path(run_dir).resolve().name


def job_metadata(cfg: JobConfig, run_dir: str | Path, trainer: str) -> dict[str, str]:
    """The driver job's metadata: its name and what a person looking for the run wants to see.

    Args:
        cfg: The resolved job configuration.
        run_dir: The run folder.
        trainer: Which trainer drives Ray (`ray-tune` or `ray-train`).

    Returns:
        String keys and values (Ray's job metadata takes strings only).
    """
    return {
        JOB_NAME: run_name(run_dir),
        "softprompt_task": cfg.task.name,
        "softprompt_trainer": trainer,
        "softprompt_model": cfg.model.name,
        "softprompt_run_dir": str(Path(run_dir).resolve()),
        "softprompt_config": json.dumps(to_dict(cfg), sort_keys=True, default=str),
    }


def job_config(cfg: JobConfig, run_dir: str | Path, trainer: str) -> Any:
    """What `ray.init(job_config=...)` takes to name the driver's job after the run (`job_metadata`).

    Inside a submitted Ray Job, Ray merges this with the submission's metadata, the submission's
    keys winning.
    """
    from ray.job_config import JobConfig as RayJobConfig

    return RayJobConfig(metadata=job_metadata(cfg, run_dir, trainer))


LABEL_FILE = "sweep_label.txt"
"""In `<run_dir>/train`: the name the sweep's trainable was registered under (Tune's restore wants it again)."""
LEGACY_LABEL = "_trial"
"""The trainable's name in sweeps saved before they were named after the run."""


def sweep_label(run_dir: str | Path, *, restoring: bool) -> str:
    """The name of the sweep's trainable, which Tune gives every trial's actor as its `repr`: the
    run's name, recorded in the run folder for a resumed sweep (`Tuner.restore` refuses a
    trainable under another name, e.g. after the run folder was renamed)."""
    path = Path(run_dir) / "train" / LABEL_FILE
    if restoring:
        return path.read_text(encoding="utf-8").strip() if path.is_file() else LEGACY_LABEL
    label = run_name(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(label, encoding="utf-8")
    return label
