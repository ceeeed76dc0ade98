"""`softprompt feedback import | queue | delete`: corrections of predictions from a file or Label Studio,
the review queue, and erasure.

    export SOFTPROMPT_FEEDBACK_SECRET=...      # the secret the server signed its prediction tokens with
    softprompt feedback import corrections.csv --artifact runs/registry/support-intent/smollm2-135m/champion
    softprompt feedback queue --artifact ... --budget 50 --output queue.json --label-studio    # import into Label Studio
    softprompt feedback import export.json --label-studio --artifact ...                       # its JSON export back
    softprompt feedback delete --artifact s3://bucket/registry/support-intent/smollm2-135m/champion --subject customer-42

A file (JSONL, CSV, TSV or Parquet) holds one feedback item a row, as `POST /v1/feedback` takes them:
`token` and `text` (from the prediction), `kind` (`correction`, `up`, `down`), `label`, optional
`subject` and `note`. Feedback goes to the registry the artifact reference lives in, beside its
prediction log (`--prediction-log` names another). Each refused row is written to a rejects file
(`<FILE>.rejects.jsonl`: where, field, value, reason) and nothing accepted is lost; the exit code is
1 when any row was refused, so a script notices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt import flags
from softprompt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from softprompt.feedback import FeedbackStore


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `feedback import`, `feedback queue` and `feedback delete`."""
    group = sub.add_parser("feedback", help="import feedback on predictions from a file, or delete feedback by id or subject")
    cmds = group.add_subparsers(title="feedback commands", metavar="ACTION")
    p = cmds.add_parser("import", help="validate and append a file of feedback items (rejects to FILE.rejects.jsonl)")
    p.add_argument("file", type=Path, metavar="FILE", help="JSONL, CSV, TSV or Parquet: token, text, kind, label[, subject, note]")
    _target_args(p)
    p.add_argument("--rejects", type=Path, help="where refused rows go (default FILE.rejects.jsonl)")
    p.add_argument("--label-studio", action="store_true", help="FILE is Label Studio's JSON export of tasks that `feedback queue --label-studio` made")
    p.set_defaults(func=cmd_import)
    p = cmds.add_parser("queue", help="the logged predictions most worth a person's review (JSONL, or Label Studio tasks)")
    _target_args(p)
    p.add_argument("--budget", type=int, required=True, help="how many predictions to queue")
    p.add_argument("--audit-share", type=float, default=0.2, help="share of the budget drawn uniformly at random (only these may join eval; default 0.2)")
    p.add_argument("--since-days", type=float, default=7.0, help="predictions logged in the last this many days (default 7)")
    p.add_argument("--slice", help="spread the queue over this metadata field (default: the predicted label)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True, help="queue file: JSONL, or with --label-studio a tasks JSON (and its label config beside it)")
    p.add_argument("--label-studio", action="store_true", help="write Label Studio tasks (and FILE.label_config.xml) instead of JSONL")
    p.set_defaults(func=cmd_queue)
    p = cmds.add_parser("delete", help="delete feedback records by id or by subject (an erasure request)")
    _target_args(p)
    p.add_argument("--id", action="append", default=[], dest="ids", help="a feedback record id (repeatable)")
    p.add_argument("--subject", help="delete every record sent with this subject key")
    p.set_defaults(func=cmd_delete)


def cmd_import(args: argparse.Namespace) -> int:
    """`softprompt feedback import`."""
    from softprompt.inputs import read_table

    desk = _open(args)
    if args.label_studio:
        from softprompt.review import from_label_studio

        items, skipped = from_label_studio(_json_list(args.file))
        records = [(f"task {i}", item) for i, item in enumerate(items, 1)]
        if skipped:
            print(f"feedback: {len(skipped)} Label Studio tasks gave no feedback (first: task {skipped[0]['task']}: {skipped[0]['reason']})", file=sys.stderr)
    else:
        records = read_table(args.file)  # a missing or unreadable file fails here, naming it
        items = [{k: None if v == "" else v for k, v in rec.items()} if isinstance(rec, dict) else rec for _, rec in records]  # CSV's empty cells
    result = desk.submit(items, client=f"import:{args.file.name}")
    rejects = [{"where": f"{args.file} {records[r['row'] - 1][0]}", **{k: v for k, v in r.items() if k != "row"}} for r in result.rejects]
    line = f"feedback: {len(result.accepted)} accepted into {desk.task} ({sum(bool(r.get('conflict')) for r in result.accepted)} superseding a conflicting label)"
    if rejects:
        path = args.rejects or args.file.with_name(args.file.name + ".rejects.jsonl")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
        first = rejects[0]
        line += f"; {len(rejects)} refused, written to {path} (first: {first['where']}: {first['field']}: {first['reason']})"
    print(line, file=sys.stderr)
    return 1 if rejects else 0


def cmd_queue(args: argparse.Namespace) -> int:
    """`softprompt feedback queue`."""
    import datetime as dt

    from softprompt.predlog import read_records
    from softprompt.review import build_queue, label_config, to_label_studio

    desk = _open(args)
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=args.since_days)
    queue = build_queue(read_records(desk.store, desk.task, since=since), desk.read(), budget=args.budget, audit_share=args.audit_share,
                        seed=args.seed, slice_key=args.slice, secret=desk.secret)
    if args.label_studio:
        args.output.write_text(json.dumps(to_label_studio(queue), ensure_ascii=False, indent=1), encoding="utf-8")
        config = args.output.with_name(args.output.name + ".label_config.xml")
        config.write_text(label_config(desk.labels), encoding="utf-8")
        where = f"{args.output} (Label Studio tasks; the project's labeling config: {config})"
    else:
        args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in queue), encoding="utf-8")
        where = str(args.output)
    reasons = {k: sum(r["reason"] == k for r in queue) for k in ("down", "disagreement", "uncertain", "audit")}
    print(f"review queue: {len(queue)} of budget {args.budget} for {desk.task} ({', '.join(f'{n} {k}' for k, n in reasons.items())}) -> {where}", file=sys.stderr)
    return 0


def _json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable JSON file ({exc}); pass Label Studio's JSON export (Export > JSON)") from exc
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not Label Studio's list of tasks; pass its JSON export")
    return data


def cmd_delete(args: argparse.Namespace) -> int:
    """`softprompt feedback delete`."""
    if not args.ids and not args.subject:
        raise ConfigError("feedback delete: name what to delete with --id ID (repeatable) or --subject KEY")
    desk = _open(args, need_secret=False)
    gone = desk.delete(ids=args.ids, subject=args.subject)
    print(f"feedback: deleted {gone} records of {desk.task}", file=sys.stderr)
    return 0


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", required=True, metavar="DIR_OR_URI",
                   help="the prompt the feedback is about (a registry version, alias or s3:// URI): its task and labels")
    p.add_argument("--prediction-log", default="auto", metavar="auto|URI",
                   help="the registry holding the prediction log and feedback (default: the one the artifact lives in)")
    flags.add_s3(p)


def _open(args: argparse.Namespace, *, need_secret: bool = True) -> FeedbackStore:
    from softprompt.feedback import FeedbackStore
    from softprompt.predict import resolve_prompts
    from softprompt.registry.store import open_store
    from softprompt.serve.feedback import FEEDBACK_SECRET_ENV
    from softprompt.serve.live import log_location

    secret = os.environ.get(FEEDBACK_SECRET_ENV, "")
    if need_secret and not secret:
        raise ConfigError(f"set {FEEDBACK_SECRET_ENV} to the secret the server signed its prediction tokens with "
                          "(feedback tokens are checked against it)")
    where = log_location([args.artifact], args.prediction_log)
    if where is None:
        raise ConfigError(f"--artifact {args.artifact} names no registry (a run folder, or --prediction-log off): "
                          "name the registry with --prediction-log URI")
    ref = resolve_prompts([args.artifact], s3_endpoint=args.s3_endpoint)[0]
    return FeedbackStore(open_store(where, endpoint_url=args.s3_endpoint), task=ref.cfg.task.name, labels=list(ref.cfg.task.labels),
                         secret=secret.encode())
