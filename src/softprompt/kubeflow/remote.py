"""The Ray driver of a cluster launch: the tune step's work, run on the Ray head.

    python -m softprompt.kubeflow.remote --scratch s3://softprompt-registry/tmp/softprompt/<job>

The tune step (`steps.tune`) puts the resolved config (`config/config.yaml`) and the prepared data
(`data/`) under a scratch prefix and launches this module (`rayjob.py`); it tunes on the cluster it
runs in (the Ray layer's `RayTuneTrainer`, joining `auto`) and leaves the train stage's output
folder (the winners and `train_result.json`) in `winners/`, which the step downloads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from softprompt.config import load_config
from softprompt.errors import SoftpromptError
from softprompt.kubeflow.pods import ensure_s3_credentials
from softprompt.kubeflow.scratch import pull_tree, push_tree

CONFIG_FILE = "config.yaml"


def entrypoint(scratch: str, *, s3_endpoint: str | None = None) -> str:
    """The Ray driver's command line: this module, reading from and writing to `scratch`."""
    args = ["python", "-m", "softprompt.kubeflow.remote", "--scratch", scratch]
    if s3_endpoint:
        args += ["--s3-endpoint", s3_endpoint]
    return shlex.join(args)


def run(scratch: str, *, s3_endpoint: str | None = None) -> None:
    """On the Ray head: pull `<scratch>/config/config.yaml` and `<scratch>/data`, tune on this
    cluster, push the winners to `<scratch>/winners`."""
    from softprompt.job import Models
    from softprompt.ray.trainers import RayTuneTrainer

    ensure_s3_credentials()
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    with tempfile.TemporaryDirectory(prefix="softprompt-remote-") as tmp:
        run_dir = Path(tmp) / "run"
        pull_tree(scratch + "/config", Path(tmp) / "config", endpoint)
        pull_tree(scratch + "/data", run_dir / "data", endpoint)
        cfg = load_config(Path(tmp) / "config" / CONFIG_FILE)
        outcome = RayTuneTrainer("auto", echo=print).train(cfg, run_dir / "data", run_dir, Models(cfg))
        push_tree(outcome.output_dir, scratch + "/winners", endpoint)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m softprompt.kubeflow.remote --scratch URI` (the Ray driver of a cluster launch)."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.kubeflow.remote",
                                     description="Tune on this Ray cluster with inputs and outputs in a scratch store.")
    parser.add_argument("--scratch", required=True, help="store URI holding config/ and data/; the winners go to winners/")
    parser.add_argument("--s3-endpoint", help="S3 endpoint of the scratch store (default: $AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    try:
        run(args.scratch, s3_endpoint=args.s3_endpoint)
    except SoftpromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
