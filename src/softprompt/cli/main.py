"""The `softprompt` command line: one subcommand per stage, plus `run` that chains them.

    softprompt run -c configs/demo.yaml                 # ingest -> train -> evaluate -> publish
    softprompt run -c configs/demo.yaml tune.num_samples=8   # ingest -> tune (Ray) -> evaluate -> publish
    softprompt tune -c configs/sst2.yaml --data runs/sst2/data --ray-address auto
    softprompt run -c configs/sst2.yaml tune.num_samples=16 --submit http://HEAD:8265
    softprompt ingest -c configs/sst2.yaml data.max_train_rows=2000
    softprompt train -c configs/sst2.yaml --data runs/sst2/data
    softprompt predict --artifact runs/registry/sst2/... --input reviews.jsonl

Overrides are trailing `section.key=value` arguments. Errors meant for people (`SoftpromptError`)
print without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

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
        p.add_argument("-c", "--config", help="YAML config (defaults apply where it is silent)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as train.lr=0.1")
        p.add_argument("--run-dir", help="run folder (default <workdir>/<run_name>)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (the one-line-per-event view of tune trials stays: it reads well in logs)")
        return p

    p = stage("validate", "check a config (and that its data files exist) without running anything")
    p.set_defaults(func=cmd_validate)
    p = stage("ingest", "read, validate, split and tokenize the data")
    p.set_defaults(func=cmd_ingest)
    p = stage("train", "train a soft prompt on ingested data")
    p.add_argument("--data", help="prepared data folder (default <run-dir>/data)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.set_defaults(func=cmd_train)
    p = stage("evaluate", "score the tuned prompt against zero-shot and few-shot baselines")
    p.add_argument("--data", help="prepared data folder (default <run-dir>/data)")
    p.add_argument("--adapter", action="append", help="tuned prompt folder(s) (default <run-dir>/train/adapter)")
    p.set_defaults(func=cmd_evaluate)
    p = stage("tune", "search hyperparameters with Ray Tune, each trial a Ray Train run (tune.num_samples trials)")
    p.add_argument("--data", help="prepared data folder or s3:// prefix (default <run-dir>/data)")
    _ray_flags(p)
    p.set_defaults(func=cmd_tune)
    p = stage("run", "ingest -> train (or tune, through Ray) -> evaluate -> publish, from one config")
    p.add_argument("--no-publish", action="store_true", help="stop after evaluate")
    _ray_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="batch inference with one or more published prompts")
    p.add_argument("--artifact", action="append", required=True, metavar="[NAME=]DIR_OR_URI", help="a published prompt; repeat for several (NAME= to name them)")
    p.add_argument("--input", required=True, help="JSONL, CSV, TSV, Parquet or plain text (one input per line)")
    p.add_argument("--output", help="output JSONL (default: stdout)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--prompt-column", help="column naming each row's prompt (with several artifacts)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="base model override (default: the one the prompt was trained on)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// artifacts")
    p.set_defaults(func=cmd_predict)

    from softprompt import serve
    from softprompt.kubeflow import cli as kubeflow_cli
    from softprompt.registry import cli as registry_cli

    registry_cli.add_commands(sub)
    kubeflow_cli.add_commands(sub)
    serve.add_command(sub)
    return parser


# --------------------------------------------------------------------------------------------------


def _ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", metavar="auto|HOST:PORT", help="join this Ray cluster (default: ray.address, else start a local Ray)")
    p.add_argument("--submit", metavar="http://HEAD:8265", help="run this command as a Ray Job on that cluster and follow its logs")


def _config(args: argparse.Namespace) -> JobConfig:
    return load_config(args.config, args.overrides)


def _run_dir(cfg: JobConfig, args: argparse.Namespace) -> Path:
    if getattr(args, "run_dir", None):
        return Path(args.run_dir)
    name = cfg.run_name or f"{cfg.task.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.workdir) / name


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


def cmd_ingest(args: argparse.Namespace) -> int:
    """`softprompt ingest`."""
    from softprompt import ingest

    cfg = _config(args)
    out = _run_dir(cfg, args) / "data"
    result = ingest.run(cfg, out, progress=not args.no_progress)
    print(result.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`softprompt train`."""
    from softprompt import dataset as ds
    from softprompt import train
    from softprompt.modeling import load_model

    cfg = _config(args)
    run_dir = _run_dir(cfg, args)
    data = Path(args.data) if args.data else run_dir / "data"
    loaded = load_model(cfg.model)
    result = train.run(
        cfg, loaded, ds.read_split(data, "train"), ds.read_split(data, "eval"), run_dir / "train",
        resume=not args.no_resume, progress=not args.no_progress,
    )
    print(_train_line(result))
    print(f"adapter: {result.adapter_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`softprompt evaluate`."""
    from softprompt import evaluate
    from softprompt.modeling import load_model

    cfg = _config(args)
    run_dir = _run_dir(cfg, args)
    data = Path(args.data) if args.data else run_dir / "data"
    adapters = [Path(a) for a in args.adapter] if args.adapter else [run_dir / "train" / "adapter"]
    history = _read_history(adapters[0].parent / "train_history.json")
    result = evaluate.run(cfg, load_model(cfg.model), data, adapters, run_dir / "artifact", history=history, progress=not args.no_progress)
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
    from softprompt.ray import jobs, tune

    run_dir = _run_dir(cfg, args)
    data = args.data or str(run_dir / "data")
    if "://" not in data and not (Path(data) / "train.parquet").is_file():
        from softprompt.errors import DataError

        raise DataError(f"{data} holds no prepared dataset; run `softprompt ingest` first (same --run-dir) or pass --data")
    print(f"run folder: {run_dir}")
    print(jobs.init_ray(cfg.ray, args.ray_address))
    result = tune.run(cfg, data, run_dir)  # the trial view prints even with --no-progress
    print(result.table())
    print(f"best trial {result.best.trial_id}: {result.metric} {result.best.best_metric:.4f} with {result.best.params}")
    print("adapters (best first): " + ", ".join(str(d) for d in result.adapter_dirs))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`softprompt run`: the whole job from one config."""
    from softprompt import dataset as ds
    from softprompt import ingest, train
    from softprompt.modeling import load_model

    cfg = _config(args)
    if args.submit:
        from softprompt.ray import jobs

        return jobs.submit(cfg, "run", args.submit, run_dir=args.run_dir, extra_args=["--no-publish"] if args.no_publish else None)
    if cfg.tune.num_samples >= 1 or args.ray_address or cfg.ray.address:
        return _run_on_ray(cfg, args)
    run_dir = _run_dir(cfg, args)
    progress = not args.no_progress
    print(f"run folder: {run_dir}")
    print("[1/4] ingest")
    data = ingest.run(cfg, run_dir / "data", progress=progress)
    print(data.summary())
    print(f"[2/4] train ({cfg.prompt.method}, {cfg.prompt.num_virtual_tokens} virtual tokens, {cfg.train.steps} steps) on {cfg.model.name}")
    loaded = load_model(cfg.model)
    tr = train.run(cfg, loaded, ds.read_split(run_dir / "data", "train"), ds.read_split(run_dir / "data", "eval"), run_dir / "train", progress=progress)
    print(_train_line(tr))
    print("[3/4] evaluate (tuned prompt vs zero-shot and few-shot baselines)")
    return _evaluate_and_publish(cfg, loaded, run_dir, [tr.adapter_dir], tr.history, _train_summary(tr), args)


def _run_on_ray(cfg: JobConfig, args: argparse.Namespace) -> int:
    """`softprompt run` through Ray: ingest -> tune (or one Ray Train run) -> evaluate -> publish."""
    from softprompt import ingest
    from softprompt.modeling import load_model
    from softprompt.ray import jobs
    from softprompt.ray import train as distributed

    run_dir = _run_dir(cfg, args)
    progress = not args.no_progress
    print(f"run folder: {run_dir}")
    print("[1/4] ingest")
    data = ingest.run(cfg, run_dir / "data", progress=progress)
    print(data.summary())
    print(jobs.init_ray(cfg.ray, args.ray_address, tuning=cfg.tune.num_samples >= 1))
    loaded = load_model(cfg.model)
    if cfg.tune.num_samples >= 1:
        from softprompt.ray import tune

        print(f"[2/4] tune ({cfg.tune.num_samples} trials, {cfg.ray.num_workers} Ray Train workers each) on {cfg.model.name}")
        tr = tune.run(cfg, run_dir / "data", run_dir, loaded=loaded)
        print(tr.table())
        eval_cfg, adapters, history, summary = tr.best_config, tr.adapter_dirs, tr.history, {"tune": tr.summary()}
    else:
        print(f"[2/4] train through Ray Train ({cfg.ray.num_workers} workers, {cfg.train.steps} steps) on {cfg.model.name}")
        fit = distributed.fit(cfg, run_dir / "data", run_dir)
        if fit.checkpoint_uri is None:
            raise SoftpromptError(f"the Ray Train run {fit.name} reported no checkpoint; is there an eval split in {run_dir / 'data'}?")
        adapter = distributed.export_adapter(cfg, loaded, fit.checkpoint_uri, run_dir / "train")
        eval_cfg, adapters, summary = cfg, [adapter], fit.summary()
        history = _read_history(adapter.parent / "train_history.json")
        print(f"trained {summary['steps']} steps on {summary['workers']} workers ({summary['tokens_per_second']:.0f} tokens/s), best eval {fit.best_metric}")
    what = f"the winner (and the top-{len(adapters)} ensemble)" if len(adapters) > 1 else "the tuned prompt"
    print(f"[3/4] evaluate {what} vs zero-shot and few-shot baselines")
    return _evaluate_and_publish(eval_cfg, loaded, run_dir, adapters, history, summary, args)


def _evaluate_and_publish(
    cfg: JobConfig, loaded: Any, run_dir: Path, adapters: list[Path], history: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace
) -> int:
    """The last two stages of `softprompt run`, shared by the plain and the Ray paths."""
    from softprompt import evaluate, publish

    ev = evaluate.run(cfg, loaded, run_dir / "data", adapters, run_dir / "artifact", history=history, train_summary=summary, progress=not args.no_progress)
    print(ev.table())
    print(ev.verdict)
    print(f"report: {ev.artifact_dir / 'report.html'}")
    if args.no_publish:
        return 0
    print(f"[4/4] publish to {cfg.publish.store}")
    pub = publish.run(cfg, ev.artifact_dir)
    print(pub.message)
    print(f"published: {pub.uri}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`softprompt predict`."""
    from softprompt import predict
    from softprompt.config import ModelConfig
    from softprompt.modeling import load_model
    from softprompt.registry import resolve_artifact

    cache = Path("~/.cache/softprompt/artifacts").expanduser()
    refs: list[tuple[str, Path]] = []
    for item in args.artifact:
        name, _, ref = item.rpartition("=") if "=" in item and not item.startswith("s3://") else ("", "", item)
        # Folders load as they are; s3:// URIs and registry aliases (<registry>/<task>/<model>/champion) resolve.
        local = Path(ref) if Path(ref).is_dir() else resolve_artifact(ref, cache, endpoint_url=args.endpoint_url)
        refs.append((name or f"p{len(refs)}", local))
    # Read the inputs first: a bad file should fail in a second, not after loading the model.
    rows = predict.read_inputs(args.input, args.text_column, args.prompt_column, default_prompt=refs[0][0])
    first_cfg = predict._artifact_config(refs[0][1])
    model_cfg = ModelConfig(**{**first_cfg.model.__dict__, **({"name": args.model} if args.model else {})})
    table = predict.PromptTable(load_model(model_cfg))
    for name, local in refs:
        table.add(name, local)
    preds = predict.predict_rows(table, rows, args.batch_size)
    lines = "\n".join(json.dumps(p.to_dict(), ensure_ascii=False) for p in preds) + "\n"
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(preds)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def _train_line(result: Any) -> str:
    best = f", best eval {result.best_metric:.4f} at step {result.best_step}" if result.best_metric is not None else ""
    return (
        f"trained {result.steps} steps in {result.seconds:.0f}s ({result.tokens_per_second:.0f} tokens/s, "
        f"peak RSS {result.peak_rss_mb:.0f} MiB{'' if result.peak_gpu_mb is None else f', peak GPU {result.peak_gpu_mb:.0f} MiB'}){best}"
        + (" [stopped early]" if result.stopped_early else "")
    )


def _train_summary(result: Any) -> dict[str, Any]:
    return {
        "steps": result.steps, "best_step": result.best_step, "best_eval_metric": result.best_metric,
        "stopped_early": result.stopped_early, "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1), "peak_rss_mb": round(result.peak_rss_mb, 1),
        "peak_gpu_mb": result.peak_gpu_mb,
    }


def _read_history(path: Path) -> list[dict[str, Any]]:
    if path.is_file():
        data: list[dict[str, Any]] = json.loads(path.read_text())
        return data
    return []


if __name__ == "__main__":
    raise SystemExit(main())
