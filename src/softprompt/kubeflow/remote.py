"""The Ray driver of a cluster launch: the tune step's work, run on the Ray head.

    python -m softprompt.kubeflow.remote --scratch s3://softprompt-registry/tmp/softprompt/<job>

The tune step (`steps.tune`) puts the resolved config (`config/tune.yaml`) and the prepared data
(`data/`) under a scratch prefix and launches this module (`rayjob.py`); it tunes on the cluster it
runs in (`softprompt tune --ray-address auto`) and leaves the ranked winners in `winners/`, which
the step downloads. The scratch
prefix defaults to the registry bucket's `tmp/`, which a lifecycle rule expires.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from softprompt.errors import SoftpromptError
from softprompt.kubeflow import steps


def entrypoint(scratch: str, *, endpoint_url: str | None = None) -> str:
    """The Ray driver's command line: this module, reading from and writing to `scratch`."""
    args = ["python", "-m", "softprompt.kubeflow.remote", "--scratch", scratch]
    if endpoint_url:
        args += ["--endpoint-url", endpoint_url]
    return shlex.join(args)


def run(scratch: str, *, endpoint_url: str | None = None) -> None:
    """On the Ray head: pull `<scratch>/config/tune.yaml` and `<scratch>/data`, tune on this
    cluster (`--ray-address auto`), push the ranked winners to `<scratch>/winners`."""
    steps.ensure_s3_credentials()
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    with tempfile.TemporaryDirectory(prefix="softprompt-remote-") as tmp:
        run_dir = Path(tmp) / "run"
        pull_tree(scratch + "/config", Path(tmp) / "config", endpoint)
        pull_tree(scratch + "/data", run_dir / "data", endpoint)
        config = Path(tmp) / "config" / "tune.yaml"
        command = steps.tune_command(config, run_dir, ray_address="auto")
        steps.run_cli(command)
        steps.collect_winners(run_dir, Path(tmp) / "winners", command[0], config)
        push_tree(Path(tmp) / "winners", scratch + "/winners", endpoint)


def default_scratch(registry: str, name: str) -> str:
    """`s3://<bucket>/tmp/softprompt/<name>` for an S3 registry (the bucket's `tmp/` expires by
    lifecycle rule); a local temp folder otherwise (one machine only)."""
    if registry.startswith("s3://"):
        bucket = registry[len("s3://"):].split("/", 1)[0]
        return f"s3://{bucket}/tmp/softprompt/{name}"
    return str(Path(tempfile.gettempdir()) / "softprompt-scratch" / name)


def push_tree(src: Path, uri: str, endpoint: str | None) -> None:
    """Upload every file under `src` to the store at `uri`, keyed by its relative path."""
    from softprompt.registry.store import open_store

    store = open_store(uri, endpoint_url=endpoint)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        store.put_file(path.relative_to(src).as_posix(), path)


def push_file(path: Path, uri: str, endpoint: str | None) -> None:
    """Upload one file to the store at `uri`, under its own name."""
    from softprompt.registry.store import open_store

    open_store(uri, endpoint_url=endpoint).put_file(path.name, path)


def pull_tree(uri: str, dest: Path, endpoint: str | None) -> None:
    """Download every key under the store at `uri` into `dest`."""
    from softprompt.registry.store import open_store

    store = open_store(uri, endpoint_url=endpoint)
    keys = store.list("")
    if not keys:
        raise steps.StepError(f"{uri} is empty: the Ray job wrote no results there; see its log above")
    for key in keys:
        store.get_file(key, dest / key)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m softprompt.kubeflow.remote --scratch URI` (the Ray driver of a cluster launch)."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.kubeflow.remote",
                                     description="Tune on this Ray cluster with inputs and outputs in a scratch store.")
    parser.add_argument("--scratch", required=True, help="store URI holding config/ and data/; the winners go to winners/")
    parser.add_argument("--endpoint-url", help="S3 endpoint of the scratch store (default: $AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    try:
        run(args.scratch, endpoint_url=args.endpoint_url)
    except SoftpromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
