"""The job: ingest → train → evaluate → publish, from one config, with a pluggable trainer.

    result = job.run(cfg, run_dir, InProcessTrainer())        # a laptop, no Ray
    result = job.run(cfg, run_dir, RayTuneTrainer(address))   # softprompt.ray.trainers: a sweep on Ray

A `Trainer` is the one seam between the flow and where training happens. This module's
`InProcessTrainer` runs the loop in this process; the Ray layer implements the same protocol with
Ray Train workers and Ray Tune sweeps, and the core never imports Ray. Every stage writes its typed
result into its folder of the run (data/ingest_result.json, train/train_result.json,
artifact/metrics.json, publish_result.json), which is what a later stage, a rerun or a pipeline
step reads.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from softprompt import dataset as ds
from softprompt import evaluate, ingest, train
from softprompt.config import JobConfig
from softprompt.evaluate import EvaluateResult
from softprompt.ingest import IngestResult
from softprompt.modeling import LoadedModel, load_model
from softprompt.outcome import TrainOutcome
from softprompt.registry import PublishResult, open_registry, publish

Echo = Callable[[str], None]
PUBLISH_RESULT = "publish_result.json"


class Models:
    """The frozen base model of a job, loaded on first use and shared by the stages that need it
    (a Ray sweep needs it only after its trials, to write their adapters)."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self._loaded: LoadedModel | None = None

    def get(self) -> LoadedModel:
        """The loaded model (loads it the first time)."""
        if self._loaded is None:
            self._loaded = load_model(self.cfg.model, s3=self.cfg.s3)
        return self._loaded


class Trainer(Protocol):
    """Where and how the prompt is trained. Implementations: `InProcessTrainer` (here),
    `softprompt.ray.trainers.RayTrainTrainer` and `RayTuneTrainer`."""

    def describe(self, cfg: JobConfig) -> str:
        """What training will do, in one line (printed before it starts)."""
        ...

    def train(self, cfg: JobConfig, data: str | Path, run_dir: Path, models: Models) -> TrainOutcome:
        """Train on the prepared dataset `data` (ingest's output folder; the Ray trainers also take
        an `s3://` prefix); write the winners and `train_result.json` into `<run_dir>/train` and
        return that outcome."""
        ...

    def evaluate(
        self, cfg: JobConfig, models: Models, data: str | Path, outcome: TrainOutcome, artifact_dir: Path, *, progress: bool = False
    ) -> EvaluateResult:
        """`softprompt.evaluate.run` on `outcome`, wherever this trainer runs the work after training
        (the Ray trainers: on a worker when the driver should not hold the model)."""
        ...


@dataclass(frozen=True)
class JobResult:
    """What a whole job produced, stage by stage."""

    run_dir: Path
    ingest: IngestResult
    train: TrainOutcome
    evaluate: EvaluateResult
    publish: PublishResult | None
    """None when the job ran without publishing."""


def run(
    cfg: JobConfig,
    run_dir: str | Path,
    trainer: Trainer,
    *,
    publish_artifact: bool = True,
    progress: bool = False,
    echo: Echo = lambda line: None,
) -> JobResult:
    """Run the whole job into `run_dir`.

    Args:
        cfg: The job configuration.
        run_dir: The run folder: `data/`, `train/`, `artifact/` and `publish_result.json` go here.
        trainer: Where training happens.
        publish_artifact: Publish the artifact to `publish.registry` (the last stage).
        progress: Show progress bars.
        echo: Receives the lines a person watching the run reads (the CLI prints them).

    Returns:
        Every stage's result.
    """
    folder = Path(run_dir)
    echo(f"run folder: {folder}")
    echo("[1/4] ingest")
    data = ingest.run(cfg, folder / "data", progress=progress)
    echo(data.summary())
    echo(f"[2/4] {trainer.describe(cfg)}")
    models = Models(cfg)
    outcome = trainer.train(cfg, data.output_dir, folder, models)
    echo(outcome.line())
    what = f"the winner (and the top-{len(outcome.winners)} ensemble)" if len(outcome.winners) > 1 else "the tuned prompt"
    echo(f"[3/4] evaluate {what} vs zero-shot and few-shot baselines")
    result = trainer.evaluate(cfg, models, data.output_dir, outcome, folder / "artifact", progress=progress)
    echo(result.table())
    echo(result.verdict)
    echo(f"report: {result.artifact_dir / 'report.html'}")
    published = None
    if publish_artifact:
        echo(f"[4/4] publish to {cfg.publish.registry}")
        published = publish(open_registry(cfg), result.artifact_dir)
        (folder / PUBLISH_RESULT).write_text(json.dumps(asdict(published), indent=1), encoding="utf-8")
        echo(published.message)
        echo(f"published: {published.uri}")
    return JobResult(folder, data, outcome, result, published)


def run_folder(cfg: JobConfig) -> Path:
    """The default run folder: `<workdir>/<run_name>`, or `<workdir>/<task>-<timestamp>` without a run name."""
    name = cfg.run_name or f"{cfg.task.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.workdir) / name


class InProcessTrainer:
    """The training loop in this process (CPU or one GPU); resumes from its checkpoint when rerun."""

    def __init__(self, *, resume: bool = True, progress: bool = False) -> None:
        self.resume, self.progress = resume, progress

    def describe(self, cfg: JobConfig) -> str:
        """What training will do."""
        return (f"train ({cfg.prompt.method}, {cfg.prompt.num_virtual_tokens} virtual tokens, {cfg.train.steps} steps) "
                f"on {cfg.model.name}")

    def train(self, cfg: JobConfig, data: str | Path, run_dir: Path, models: Models) -> TrainOutcome:
        """Train with `softprompt.train.run` into `<run_dir>/train`."""
        out = Path(run_dir) / "train"
        result = train.run(cfg, models.get(), ds.read_split(data, "train"), ds.read_split(data, "eval"), out,
                           resume=self.resume, progress=self.progress)
        outcome = TrainOutcome("in-process", out, (result.adapter_dir,), cfg, result.history, result.summary())
        outcome.write()
        return outcome

    def evaluate(
        self, cfg: JobConfig, models: Models, data: str | Path, outcome: TrainOutcome, artifact_dir: Path, *, progress: bool = False
    ) -> EvaluateResult:
        """`softprompt.evaluate.run` in this process."""
        return evaluate.run(cfg, models.get(), data, outcome, artifact_dir, progress=progress)
