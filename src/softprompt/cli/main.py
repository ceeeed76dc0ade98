"""The `softprompt` command line: one subcommand per stage, plus `run` that chains them.

    softprompt run -c configs/demo.yaml                      # ingest -> tune (Ray) -> evaluate -> publish
    softprompt run -c configs/demo.yaml tune.num_samples=0   # ingest -> train (in-process) -> evaluate -> publish
    softprompt tune -c configs/sst2.yaml --data runs/sst2/data --ray-address auto
    softprompt run -c configs/sst2.yaml tune.num_samples=16 --submit http://HEAD:8265
    softprompt ingest -c configs/sst2.yaml data.max_train_rows=2000
    softprompt train -c configs/sst2.yaml --data runs/sst2/data
    softprompt evaluate -c configs/sst2.yaml --train runs/sst2/train
    softprompt predict --artifact runs/registry/sst2/... --input reviews.jsonl

Handlers parse arguments, call one function of the core (or of the Ray layer) and print; the
flow itself is `softprompt.job`. Overrides are trailing `section.key=value` arguments. Errors meant
for people (`SoftpromptError`) print without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from softprompt import console, flags
from softprompt.config import JobConfig, load_config
from softprompt.errors import SoftpromptError

log = logging.getLogger("softprompt")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `softprompt` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
        return result
    except SoftpromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="softprompt", description="Soft-prompt tuning for frozen LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", help="YAML config, a path or s3:// URI (defaults apply where it is silent)")
        flags.add_overrides(p)
        p.add_argument("--run-dir", help="run folder (default <workdir>/<run_name>)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (the one-line-per-event view of tune trials stays: it reads well in logs)")
        return p

    p = stage("validate", "check a config (and that its data files exist) without running anything")
    p.set_defaults(func=cmd_validate)
    p = stage("ingest", "read, validate, split and tokenize the data")
    p.set_defaults(func=cmd_ingest)
    p = stage("train", "train a soft prompt on ingested data, in this process")
    p.add_argument("--data", help="prepared data folder (default <run-dir>/data)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.set_defaults(func=cmd_train)
    p = stage("evaluate", "score the trained prompt(s) against zero-shot and few-shot baselines; write the artifact folder")
    p.add_argument("--data", help="prepared data folder (default <run-dir>/data)")
    p.add_argument("--train", help="the train stage's output folder, holding train_result.json (default <run-dir>/train)")
    flags.add_renamed(p, "--adapter")
    p.set_defaults(func=cmd_evaluate)
    p = stage("tune", "search hyperparameters with Ray Tune, each trial a Ray Train run (tune.num_samples trials)")
    p.add_argument("--data", help="prepared data folder or s3:// prefix (default <run-dir>/data)")
    _ray_flags(p)
    p.set_defaults(func=cmd_tune)
    p = stage("plan", "memory per device for each sharding strategy, from the model's config alone; recommends a plan")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="devices per node (default: ray.num_workers)")
    p.add_argument("--gpu-memory", default=None, help="memory of one device, e.g. 80GiB (default: ray.gpu_memory, else 80GiB)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the p95 of the prepared training rows; ingests them if needed)")
    p.set_defaults(func=cmd_plan)
    p = stage("run", "ingest -> train (or tune, through Ray) -> evaluate -> publish, from one config")
    p.add_argument("--no-publish", action="store_true", help="stop after evaluate")
    _ray_flags(p)
    p.set_defaults(func=cmd_run)

    from softprompt.cli import feedback as feedback_cli
    from softprompt.cli import inference
    from softprompt.kubeflow import cli as kubeflow_cli
    from softprompt.registry import cli as registry_cli

    inference.add_commands(sub)
    feedback_cli.add_commands(sub)
    registry_cli.add_commands(sub)
    kubeflow_cli.add_commands(sub)
    return parser


# --------------------------------------------------------------------------------------------------


def _ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", metavar="auto|HOST:PORT", help="join this Ray cluster (default: ray.address, else start a local Ray)")
    p.add_argument("--submit", metavar="http://HEAD:8265", help="run this command as a Ray Job on that cluster and follow its logs")


def _config(args: argparse.Namespace) -> JobConfig:
    return load_config(args.config, args.overrides)


def _run_dir(cfg: JobConfig, args: argparse.Namespace) -> Path:
    from softprompt.job import run_folder

    return Path(args.run_dir) if getattr(args, "run_dir", None) else run_folder(cfg)


def _console(args: argparse.Namespace, run_dir: Path) -> contextlib.AbstractContextManager[object]:
    """Ray's and the libraries' output into `<run_dir>/logs/` (softprompt.console); `-v` keeps it all on the console."""
    return contextlib.nullcontext() if args.verbose else console.run_logs(run_dir)


def cmd_validate(args: argparse.Namespace) -> int:
    """`softprompt validate`."""
    cfg = _config(args)
    from softprompt.ingest import check_sources

    problems = check_sources(cfg)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    print(f"ok: {args.config or 'defaults'} is valid (task {cfg.task.name}, model {cfg.model.name})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """`softprompt plan`: the memory planner's table and recommendation."""
    from softprompt import plan
    from softprompt.modeling import model_config

    cfg = _config(args)
    shape = plan.ModelShape.from_config(model_config(cfg.model, cfg.s3))
    per_node = args.gpus_per_node or max(1, cfg.ray.num_workers)
    device = plan.parse_bytes(args.gpu_memory or cfg.ray.gpu_memory or "80GiB")
    seq_len = args.seq_len or plan.p95(_train_lengths(cfg, _run_dir(cfg, args)))
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    work = plan.job_workload(cfg, seq_len, dtype_bytes=dtype_bytes)
    work = plan.replace(work, batch=max(1, -(-cfg.train.batch_size // (args.nodes * per_node))))
    layout = plan.Layout("ddp", nodes=args.nodes, gpus_per_node=per_node)
    print(f"{cfg.model.name}: {shape.num_parameters / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}; "
          f"{args.nodes} x {per_node} devices of {plan.gib(device)}; {seq_len} tokens per row (p95) + {work.prompt_tokens} virtual, "
          f"{work.batch} rows per device, weights in {'fp32' if dtype_bytes == 4 else 'bf16'}")
    strategies = plan.STRATEGIES if args.nodes > 1 else plan.STRATEGIES[:2]
    rows = [plan.estimate(shape, plan.replace(layout, strategy=st), plan.replace(work, checkpointing=ck)) for st in strategies for ck in (False, True)]
    print(plan.table(rows))
    best = plan.recommend(shape, layout, work, device)
    if best is None:
        print(f"nothing fits {plan.gib(device)} per device, even fsdp with offload and batch 1; use more or larger devices")
        return 1
    print(f"recommended: {plan.describe(best)} ({plan.gib(best.total_bytes)} of {plan.gib(device)} per device)")
    return 0


def _train_lengths(cfg: JobConfig, run_dir: Path) -> list[int]:
    """Token lengths of the training rows: the run folder's prepared data, else a fresh ingest into a temporary folder."""
    import tempfile

    from softprompt import dataset as ds
    from softprompt import ingest

    if ds.has_split(run_dir / "data", "train"):
        return list(ds.read_split(run_dir / "data", "train").lengths)
    print(f"ingesting {cfg.data.train} to measure row lengths (pass --seq-len to skip)")
    with tempfile.TemporaryDirectory(prefix="softprompt-plan-") as tmp:
        ingest.run(cfg, Path(tmp))
        return list(ds.read_split(tmp, "train").lengths)


def cmd_ingest(args: argparse.Namespace) -> int:
    """`softprompt ingest`."""
    from softprompt import ingest

    cfg = _config(args)
    result = ingest.run(cfg, _run_dir(cfg, args) / "data", progress=not args.no_progress)
    print(result.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`softprompt train`: the in-process trainer."""
    from softprompt.job import InProcessTrainer, Models

    cfg = _config(args)
    run_dir = _run_dir(cfg, args)
    trainer = InProcessTrainer(resume=not args.no_resume, progress=not args.no_progress)
    print(trainer.describe(cfg))
    with _console(args, run_dir):
        outcome = trainer.train(cfg, Path(args.data) if args.data else run_dir / "data", run_dir, Models(cfg))
    print(outcome.line())
    print(f"adapter: {outcome.winners[0]}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`softprompt evaluate`: the train stage's winners against the baselines."""
    from softprompt import evaluate
    from softprompt.job import Models
    from softprompt.outcome import TrainOutcome

    cfg = _config(args)
    run_dir = _run_dir(cfg, args)
    outcome = TrainOutcome.read(args.train or run_dir / "train")
    data = Path(args.data) if args.data else run_dir / "data"
    with _console(args, run_dir):
        result = evaluate.run(cfg, Models(outcome.config).get(), data, outcome, run_dir / "artifact", progress=not args.no_progress)
    print(result.table())
    print(result.verdict)
    print(f"artifact: {result.artifact_dir}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """`softprompt tune`: a Ray Tune sweep over ingested data."""
    cfg = _config(args)
    if args.submit:
        from softprompt.ray import jobs

        return jobs.submit(cfg, "tune", args.submit, run_dir=args.run_dir, extra_args=["--data", args.data] if args.data else None)
    from softprompt.errors import DataError
    from softprompt.job import Models
    from softprompt.ray.trainers import RayTuneTrainer
    from softprompt.uris import is_s3

    run_dir = _run_dir(cfg, args)
    data = args.data or str(run_dir / "data")
    if not is_s3(data) and not (Path(data) / "train.parquet").is_file():
        raise DataError(f"{data} holds no prepared dataset; run `softprompt ingest` first (same --run-dir) or pass --data")
    print(f"run folder: {run_dir}")
    trainer = RayTuneTrainer(args.ray_address, progress=True)  # the trial view prints even with --no-progress
    print(trainer.describe(cfg))
    with _console(args, run_dir):
        outcome = trainer.train(cfg, data, run_dir, Models(cfg))
    print(outcome.line())
    print("winners (best first): " + ", ".join(str(d) for d in outcome.winners))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`softprompt run`: the whole job from one config."""
    from softprompt import job

    cfg = _config(args)
    if args.submit:
        from softprompt.ray import jobs

        return jobs.submit(cfg, "run", args.submit, run_dir=args.run_dir, extra_args=["--no-publish"] if args.no_publish else None)
    trainer: job.Trainer
    if cfg.tune.num_samples >= 1:
        from softprompt.ray.trainers import RayTuneTrainer

        trainer = RayTuneTrainer(args.ray_address)
    elif args.ray_address or cfg.ray.address:
        from softprompt.ray.trainers import RayTrainTrainer

        trainer = RayTrainTrainer(args.ray_address)
    else:
        trainer = job.InProcessTrainer(progress=not args.no_progress)
    run_dir = _run_dir(cfg, args)
    with _console(args, run_dir):
        job.run(cfg, run_dir, trainer, publish_artifact=not args.no_publish, progress=not args.no_progress, echo=print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
