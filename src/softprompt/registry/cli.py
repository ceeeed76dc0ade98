"""`softprompt publish | promote | rollback | registry list|show|pull|repair`: thin shells over `softprompt.registry`.

`cli.py` calls `add_commands(subparsers)`; each sub-command sets `func` to a handler that takes the
parsed namespace and returns the exit code. Handlers print one short human line (or a table), or
JSON with `--json`. SoftpromptErrors propagate to cli.py, which prints them without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from softprompt import flags, registry
from softprompt.errors import SoftpromptError
from softprompt.registry.store import ArtifactStore, open_store

EXIT_OK = 0
EXIT_DAMAGED = 1
"""`registry list` exit code when it skipped damaged entries (each named in a warning on stderr)."""
EXIT_NOT_PROMOTED = 3
"""`promote` exit code when the gate refused: scripts can tell 'kept the champion' from an error (1)."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register publish, promote, rollback and registry {list,show,pull,repair} on a sub-parser set."""
    p = subparsers.add_parser(
        "publish",
        help="publish an evaluated artifact folder as an immutable registry version",
        description="Check ARTIFACT_DIR's provenance, upload every file, then MANIFEST.json; re-publishing the same artifact is a no-op.",
    )
    p.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR", help="the artifact folder `softprompt evaluate` wrote")
    _store_args(p)
    p.set_defaults(func=_publish)

    p = subparsers.add_parser(
        "promote",
        help="make a version the champion if it beats the current one",
        description="Compare VERSION with the champion on the same eval set and move the pointer (CAS).",
    )
    _model_args(p)
    p.add_argument("version", metavar="VERSION", help="version id from `softprompt publish`")
    p.add_argument("--metric", default="accuracy", help="tuned metric to compare (default: accuracy)")
    p.add_argument(
        "--min-delta", type=float, default=0.0, help="required improvement, strictly more (default: 0)"
    )
    p.add_argument(
        "--require-significance", action=argparse.BooleanOptionalAction, default=False,
        help="refuse a version not significantly better than every baseline it was scored against "
        "(McNemar's exact test, p < 0.05, from its metrics.json); the pipeline's default is publish.require_significance",
    )
    p.add_argument(
        "--force", action="store_true", help="promote even if the gate refuses, or over an unreadable pointer (recorded)"
    )
    p.add_argument("--reason", default="", help="why; recorded in the pointer and the history")
    _store_args(p)
    p.set_defaults(func=_promote)

    p = subparsers.add_parser(
        "rollback",
        help="point the champion back at an earlier version",
        description="Without --to, go back to the champion before the current one.",
    )
    _model_args(p)
    p.add_argument(
        "--to", dest="to_version", metavar="VERSION", help="version to serve again (also replaces an unreadable pointer)"
    )
    p.add_argument("--reason", default="", help="why; recorded in the history")
    _store_args(p)
    p.set_defaults(func=_rollback)

    reg = subparsers.add_parser("registry", help="list, show and pull published versions")
    sub = reg.add_subparsers(dest="registry_command", metavar="{list,show,pull,repair}", required=True)
    p = sub.add_parser("list", help="versions of a task/model, or every task/model in the store")
    p.add_argument("task", nargs="?", metavar="TASK")
    p.add_argument("base_model", nargs="?", metavar="BASE_MODEL")
    _store_args(p)
    p.set_defaults(func=_list)
    p = sub.add_parser("show", help="one version's manifest (default: the champion)")
    _model_args(p)
    p.add_argument("version", nargs="?", default=registry.CHAMPION_ALIAS, metavar="VERSION|champion")
    _store_args(p)
    p.set_defaults(func=_show)
    p = sub.add_parser("pull", help="download a version and verify every file")
    _model_args(p)
    p.add_argument("version", metavar="VERSION|champion")
    p.add_argument("--dest", type=Path, required=True, help="local folder to write the files into")
    _store_args(p)
    p.set_defaults(func=_pull)
    p = sub.add_parser(
        "repair",
        help="restore a damaged version from the run folder that published it",
        description="Rewrite every stored file of VERSION that is missing or damaged (and its MANIFEST.json) "
        "from RUN_FOLDER, whose files must hash to VERSION; then verify the version again.",
    )
    _model_args(p)
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--from", dest="run_dir", type=Path, required=True, metavar="RUN_FOLDER",
                   help="the artifact folder that was published as VERSION")
    _store_args(p)
    p.set_defaults(func=_repair)


def _store_args(p: argparse.ArgumentParser) -> None:
    flags.add_registry(p)
    flags.add_renamed(p, "--store")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", metavar="TASK")
    p.add_argument("base_model", metavar="BASE_MODEL", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")


def _store(args: argparse.Namespace) -> ArtifactStore:
    return open_store(args.registry, endpoint_url=args.s3_endpoint, region=args.region, profile=args.profile)


def _emit(args: argparse.Namespace, payload: Any, line: str) -> None:
    if args.json:
        print(json.dumps(_plain(payload), indent=2, sort_keys=True))
    else:
        print(line)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _publish(args: argparse.Namespace) -> int:
    result = registry.publish(_store(args), args.artifact_dir)
    _emit(args, result, result.message)
    return EXIT_OK


def _promote(args: argparse.Namespace) -> int:
    gate = registry.Gate(metric=args.metric, min_delta=args.min_delta, require_significance=args.require_significance)
    result = registry.promote(
        _store(args),
        args.task,
        args.base_model,
        args.version,
        gate=gate,
        force=args.force,
        reason=args.reason,
    )
    _emit(args, result, result.message)
    return EXIT_NOT_PROMOTED if result.status == "refused" else EXIT_OK


def _rollback(args: argparse.Namespace) -> int:
    result = registry.rollback(_store(args), args.task, args.base_model, args.to_version, reason=args.reason)
    _emit(args, result, result.message)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    if (args.task is None) != (args.base_model is None):
        raise SoftpromptError("registry list: give both TASK and BASE_MODEL, or neither")
    pairs = [(args.task, args.base_model)] if args.task else registry.list_models(store)
    damaged: list[str] = []
    versions = [
        v
        for task, model in pairs
        for v in registry.list_versions(store, task, model, on_damage=lambda e: damaged.append(str(e)))
    ]
    lines = [
        f"{'*' if v.is_champion else ' '} {v.task}/{v.base_model} {v.version}  {v.created_at}  "
        f"{v.metric}={v.value:.4f}  eval={v.eval_fingerprint[:12]}"
        for v in versions
    ]
    _emit(args, [_summary(v) for v in versions], "\n".join(lines) or f"no versions in {store.uri()}")
    for problem in damaged:  # after the listing, so one bad manifest hides nothing else
        print(f"warning: skipped: {problem}", file=sys.stderr)
    return EXIT_DAMAGED if damaged else EXIT_OK


def _show(args: argparse.Namespace) -> int:
    info = registry.show(_store(args), args.task, args.base_model, args.version)
    champion = " (champion)" if info.is_champion else ""
    files = ", ".join(f"{f['name']} ({f['size']} B)" for f in info.manifest["files"])
    line = (
        f"{info.task}/{info.base_model} {info.version}{champion}: {info.metric}={info.value:.4f} "
        f"eval={info.eval_fingerprint} created {info.created_at} at {info.uri}\n  files: {files}"
    )
    _emit(args, {**_summary(info), "manifest": info.manifest}, line)
    return EXIT_OK


def _pull(args: argparse.Namespace) -> int:
    dest = registry.pull(_store(args), args.task, args.base_model, args.version, args.dest)
    _emit(
        args,
        {"path": str(dest)},
        f"pulled {args.task}/{args.base_model} {args.version} into {dest} (verified)",
    )
    return EXIT_OK


def _repair(args: argparse.Namespace) -> int:
    result = registry.repair(_store(args), args.task, args.base_model, args.version, args.run_dir)
    _emit(args, result, result.message)
    return EXIT_OK


def _summary(info: registry.VersionInfo) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(info).items() if k != "manifest"}
