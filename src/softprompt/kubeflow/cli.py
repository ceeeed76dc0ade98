"""`softprompt pipeline compile|run|submit|schedule|pause|resume|list`.

    softprompt pipeline compile --output softprompt_pipeline.yaml
    softprompt pipeline run --local -c configs/demo.yaml train.steps=20
    softprompt pipeline submit --host http://localhost:8080 --config s3://softprompt-registry/configs/nightly.yaml
    softprompt pipeline schedule --host http://localhost:8080 --config s3://... --cron "0 0 3 * * *"

`cli.py` calls `add_commands(subparsers)`. kfp is imported inside the handlers only, so the rest
of the CLI works where the `kfp` extra is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from softprompt import flags
from softprompt.config import load_yaml
from softprompt.errors import SoftpromptError

DEFAULT_OUTPUT = "softprompt_pipeline.yaml"
# Pipeline parameters that have their own flag; the rest go through --param KEY=VALUE.
_NAMED = {"config": "config_uri", "base_model": "base_model", "train_data": "train_data_uri",
          "test_data": "test_data_uri", "registry": "registry", "s3_endpoint": "s3_endpoint", "launcher": "launcher"}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `pipeline` and its sub-commands."""
    top = subparsers.add_parser("pipeline", help="compile, run, submit and schedule the Kubeflow pipeline",
                                description="The Kubeflow Pipelines (v2) pipeline: validate → ingest → tune → evaluate → publish.")
    sub = top.add_subparsers(dest="pipeline_command", metavar="{compile,run,submit,schedule,pause,resume,list}", required=True)

    p = sub.add_parser("compile", help="write the pipeline's KFP IR YAML")
    p.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"YAML file to write (default {DEFAULT_OUTPUT})")
    p.add_argument("--image", help="image for every step (default: the pinned ghcr.io/softprompt/softprompt:<version>)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run the whole pipeline on this machine (kfp local runner)")
    p.add_argument("--local", action="store_true", required=True, help="required: run with kfp's SubprocessRunner, no cluster")
    p.add_argument("-c", "--config", required=True, help="YAML config (path or s3:// URI)")
    flags.add_overrides(p)
    p.add_argument("--pipeline-root", default="runs/kfp-local", help="where step outputs go (default runs/kfp-local)")
    _param_args(p, launcher_default="local")
    p.set_defaults(func=cmd_run)

    for name, help_text in (("submit", "upload a new pipeline version and start a run"),
                            ("schedule", "upload a new pipeline version and create a recurring run")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _client_args(p)
        p.add_argument("-c", "--config", required=True, help="config URI the steps read (s3://... or a path inside the image)")
        _param_args(p)
        flags.add_overrides(p)
        p.add_argument("--experiment", default="softprompt", help="experiment (created if missing; default softprompt)")
        p.add_argument("--version", help="pipeline version name (default <package version>-<spec hash>)")
        p.add_argument("--image", help="image for every step (default: the pinned one)")
        p.add_argument("--service-account", default="softprompt-pipeline", help="ServiceAccount of the run's pods")
        if name == "submit":
            p.add_argument("--run-name", help="run name (default softprompt <time>)")
            p.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded")
            p.set_defaults(func=cmd_submit)
        else:
            p.add_argument("--cron", required=True, help='six fields, seconds first: "0 0 3 * * *" = daily 03:00:00')
            p.add_argument("--name", default="softprompt-nightly", help="recurring run name (default softprompt-nightly)")
            p.add_argument("--replace", action="store_true", help="delete existing recurring runs of that name once the new one exists")
            p.set_defaults(func=cmd_schedule)

    for name, help_text in (("pause", "disable a recurring run"), ("resume", "enable a recurring run")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _client_args(p)
        p.add_argument("recurring_run", metavar="NAME_OR_ID", help="recurring run name or id")
        p.set_defaults(func=cmd_pause_resume, enable=(name == "resume"))

    p = sub.add_parser("list", help="list recurring runs")
    _client_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                   help="KFP API URL, e.g. http://localhost:8080 (default $KF_PIPELINES_ENDPOINT; in a pod: the in-cluster service)")
    p.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default $KFP_TOKEN)")
    p.add_argument("--token-file", help="file holding a bearer token, re-read on each call (default: the in-cluster "
                   "ServiceAccount token at $KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token, if present)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")


def _param_args(p: argparse.ArgumentParser, *, launcher_default: str | None = None) -> None:
    p.add_argument("--base-model", help="base model (overrides model.name)")
    p.add_argument("--train-data", help="training data URI (overrides data.train)")
    p.add_argument("--test-data", help="test data URI (overrides data.test)")
    p.add_argument("--registry", help="registry prefix, s3://BUCKET/PREFIX or a folder (overrides publish.registry)")
    p.add_argument("--s3-endpoint", help="S3 endpoint of every s3:// URI: data, model, registry (overrides s3.endpoint)")
    flags.add_renamed(p, "--endpoint-url")
    p.add_argument("--launcher", default=launcher_default, choices=("local", "ray-jobs", "rayjob"),
                   help="where tune runs" + (f" (default {launcher_default})" if launcher_default else " (default rayjob)"))
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="any other pipeline parameter, e.g. num_workers=2 or gpus_per_worker=1 (repeatable)")


def pipeline_arguments(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """The run's pipeline arguments from the flags; unknown --param names are an error listing the valid ones."""
    valid = _module("pipeline").parameter_names()
    params: dict[str, Any] = {target: getattr(args, flag) for flag, target in _NAMED.items() if getattr(args, flag, None)}
    if overrides:
        params["overrides"] = list(overrides)
    for item in args.param:
        key, sep, text = item.partition("=")
        if not sep or key not in valid:
            raise SoftpromptError(f"--param {item!r}: use NAME=VALUE with NAME one of {', '.join(valid)}")
        params[key] = load_yaml(text, f"--param {key}") if text else ""
    return params


def cmd_compile(args: argparse.Namespace) -> int:
    """`softprompt pipeline compile`."""
    out = _module("pipeline").compile_pipeline(args.output, image=args.image)
    print(f"wrote {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`softprompt pipeline run --local`."""
    config = args.config if args.config.startswith("s3://") else str(Path(args.config).resolve())
    # On this machine the config's `ray` section decides about GPUs (the pipeline's default asks for one).
    arguments = {"gpus_per_worker": -1.0} | pipeline_arguments(args, args.overrides) | {"config_uri": config}
    started = time.monotonic()
    outputs = _module("pipeline").run_local(arguments, pipeline_root=args.pipeline_root)
    seconds = time.monotonic() - started
    # The verdict with its p-values is the evaluate step's last line above; this says what it meant for promotion.
    verdict = ("beats its baselines (promotion step ran)" if outputs.get("beats_baselines")
               else "does not beat every baseline significantly (not promoted; see the evaluate step's verdict)")
    print(f"pipeline finished in {seconds:.0f}s: published version {outputs.get('version')} at {outputs.get('uri')}; the tuned prompt {verdict}")
    print(f"step outputs: {Path(args.pipeline_root).resolve()}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """`softprompt pipeline submit`."""
    client = _module("client")
    arguments = _submit_arguments(args)  # checked before anything is sent
    result = client.submit(
        client.connect(args.host, token=args.token, token_file=args.token_file, namespace=args.namespace),
        arguments, experiment=args.experiment, version=args.version, run_name=args.run_name,
        image=args.image, service_account=args.service_account, namespace=args.namespace,
    )
    print(f"run {result.run_id} started (pipeline {result.pipeline_id}, version {result.version_name} {result.version_id}, "
          f"experiment {result.experiment_id})")
    if args.wait:
        state = client.wait(result.kfp, result.run_id)
        print(f"run {result.run_id} ended {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """`softprompt pipeline schedule`."""
    client = _module("client")
    cron = client.validate_cron(args.cron)
    arguments = _submit_arguments(args)
    result = client.schedule(
        client.connect(args.host, token=args.token, token_file=args.token_file, namespace=args.namespace),
        arguments, cron=cron, name=args.name, experiment=args.experiment, version=args.version,
        image=args.image, service_account=args.service_account, namespace=args.namespace, replace=args.replace,
    )
    print(f"recurring run {result.recurring_run_id} ({args.name}) scheduled at {cron!r} "
          f"(pipeline version {result.version_name}); pause it with `softprompt pipeline pause {args.name}`")
    return 0


def cmd_pause_resume(args: argparse.Namespace) -> int:
    """`softprompt pipeline pause|resume`."""
    client = _module("client")
    kfp_client = client.connect(args.host, token=args.token, token_file=args.token_file, namespace=args.namespace)
    rid = client.set_schedule_enabled(kfp_client, args.recurring_run, enabled=args.enable, namespace=args.namespace)
    print(f"recurring run {rid} {'resumed' if args.enable else 'paused'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`softprompt pipeline list`."""
    client = _module("client")
    kfp_client = client.connect(args.host, token=args.token, token_file=args.token_file, namespace=args.namespace)
    rows = client.list_schedules(kfp_client, namespace=args.namespace)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no recurring runs")
    for row in [] if args.json else rows:
        print(f"{row['id']}  {row['name']:<24} {row['status']:<8} cron={row['cron']!r}  pipeline version {row['version_id']}")
    return 0


def _module(name: str) -> Any:
    """`softprompt.kubeflow.<name>`, or a clear error where the kfp extra is not installed."""
    try:
        return importlib.import_module(f"softprompt.kubeflow.{name}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("kfp", "kfp_server_api", "kubernetes"):
            raise SoftpromptError(f"`softprompt pipeline` needs the {exc.name} package: pip install 'softprompt[kfp]'") from exc
        raise


def _submit_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return pipeline_arguments(args, args.overrides) | {"config_uri": args.config}
