"""Command-line flags that several commands share, spelled one way everywhere.

- `--registry URI`: the prompt registry (config `publish.registry`, pipeline parameter `registry`);
- `--s3-endpoint URL`: the S3 endpoint of every `s3://` URI (config `s3.endpoint`, pipeline
  parameter `s3_endpoint`);
- trailing `section.key=value` arguments: config overrides (pipeline parameter `overrides`).

Flags of earlier releases stay registered, hidden, and fail with the new spelling
(docs/migration.md), so a script written for the old one learns the fix instead of "unrecognized".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

RENAMED_FLAGS = {
    "--store": "--registry",
    "--endpoint-url": "--s3-endpoint",
    "--override": "trailing KEY=VALUE arguments",
    "--adapter": "--train (the train stage's output folder, holding train_result.json)",
}
"""Flags of earlier releases -> what to write now."""


def add_registry(p: argparse.ArgumentParser, *, required: bool = True, default_help: str = "") -> None:
    """`--registry`, `--s3-endpoint`, `--region` and `--profile` (where a registry lives)."""
    p.add_argument("--registry", required=required, metavar="URI",
                   help="prompt registry: s3://BUCKET/PREFIX or a local folder" + default_help)
    add_s3(p)
    p.add_argument("--region", help="S3 region (default: from the AWS configuration)")
    p.add_argument("--profile", help="AWS profile (default: the standard credential chain)")


def add_s3(p: argparse.ArgumentParser) -> None:
    """`--s3-endpoint` (and the renamed `--endpoint-url`)."""
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="custom S3 endpoint for s3:// URIs (MinIO, Ceph; path-style addressing); credentials come from the AWS chain")
    add_renamed(p, "--endpoint-url")


def add_overrides(p: argparse.ArgumentParser) -> None:
    """Trailing `section.key=value` config overrides (and the renamed `--override`)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides such as train.lr=0.1")
    add_renamed(p, "--override")


def add_renamed(p: argparse.ArgumentParser, *flags: str) -> None:
    """Register old flags that fail with their new spelling."""
    for flag in flags:
        p.add_argument(flag, action=_Renamed, nargs="?", help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | Sequence[Any] | None = None) -> None:
        flag = str(option_string)
        parser.error(f"{flag} was renamed: use {RENAMED_FLAGS.get(flag, 'the new flag')} (docs/migration.md)")
