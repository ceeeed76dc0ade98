"""`softprompt predict` and `softprompt serve`: published prompts on their frozen base model.

    softprompt predict --artifact runs/registry/sst2/... --input reviews.jsonl
    softprompt serve --artifact s3://bucket/registry/support-intent/smollm2-135m/champion --s3-endpoint http://minio:9000 [--ray-address auto]

Both take `--artifact [NAME=]DIR_OR_URI` (repeatable; the default name is the prompt's task) and
load prompts the same way (`softprompt.predict.resolve_prompts` and `load_prompts`); `serve` runs
them on Ray Serve (`softprompt.ray.serving`), its settings the `serve.*` fields of `ServeConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt import flags

if TYPE_CHECKING:
    from softprompt.predict import Prediction, PromptRef
    from softprompt.serve.config import ServeConfig

ARTIFACT_HELP = "a published prompt: an artifact folder, a registry version, <registry>/<task>/<model>/champion or s3://...; repeat for several (NAME= names it; default: its task)"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `predict` and `serve`."""
    p = sub.add_parser("predict", help="batch inference with one or more published prompts")
    p.add_argument("--artifact", action="append", required=True, metavar="[NAME=]DIR_OR_URI", help=ARTIFACT_HELP)
    p.add_argument("--input", required=True, help="JSONL, CSV, TSV, Parquet or plain text (one input per line)")
    p.add_argument("--output", help="output JSONL (default: stdout)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--prompt-column", help="column naming each row's prompt (with several artifacts)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="base model override (default: the one the prompts were trained on)")
    p.add_argument("--prediction-log", default="auto", metavar="auto|off|URI",
                   help="where each prediction is logged with its id: auto (the registry a registry artifact came from; "
                        "none for a run folder), off, or a registry URI (default auto)")
    p.add_argument("--log-inputs", type=_boolean, default=True, metavar="true|false", help="keep each input text in the log (default true)")
    flags.add_s3(p)
    p.set_defaults(func=cmd_predict)

    from softprompt.serve.config import ServeConfig, flag

    about = ("serve published prompts on Ray Serve: /healthz, /v1/prompts, /v1/predict (rows of every prompt batched together "
             "on one model); a local Ray it starts, or --ray-address. Settings are serve.* (--max-batch for serve.max_batch, ...); "
             "a bearer token is read from $SOFTPROMPT_SERVE_TOKEN")
    p = sub.add_parser("serve", help="serve published prompts on Ray Serve, batched across prompts on one model", description=about)
    p.add_argument("--artifact", action="append", required=True, metavar="[NAME=]DIR_OR_URI", help=ARTIFACT_HELP)
    p.add_argument("--ray-address", help="join this Ray cluster (auto or HOST:PORT); default: start a local Ray")
    p.add_argument("--model", help="base model override (default: the one the prompts were trained on)")
    for f in dataclasses.fields(ServeConfig):
        doc = _field_docs().get(f.name, "")
        default = f.default
        if f.type in ("bool", bool):
            p.add_argument(flag(f.name), type=_boolean, default=default, metavar="true|false", help=f"{doc} (default {str(default).lower()})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag(f.name), type=kind, default=default, help=f"{doc} (default {default})")
    flags.add_s3(p)
    p.set_defaults(func=cmd_serve)


def cmd_predict(args: argparse.Namespace) -> int:
    """`softprompt predict`."""
    from softprompt import predict
    from softprompt.inputs import read_inputs

    refs = predict.resolve_prompts(args.artifact, s3_endpoint=args.s3_endpoint)
    # Read the inputs first: a bad file should fail in a second, not after loading the model.
    rows = read_inputs(args.input, args.text_column, args.prompt_column, default_prompt=refs[0].name)
    table = predict.load_prompts(refs, model=args.model, s3_endpoint=args.s3_endpoint)
    preds = predict.predict_rows(table, rows, args.batch_size)
    answers = _logged(preds, refs, str(table.loaded.identity.get("name")), args)
    lines = "\n".join(json.dumps(a, ensure_ascii=False) for a in answers) + "\n"
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(preds)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The `serve.*` settings from `softprompt serve`'s flags (ConfigError lists every bad one)."""
    from softprompt.serve.config import ServeConfig

    return ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})


def _logged(preds: list[Prediction], refs: list[PromptRef], model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each prediction as `serve` answers it (id, version, ...), logged to the prediction log when one applies."""
    from softprompt.predlog import new_id, record_batch
    from softprompt.registry.store import open_store
    from softprompt.serve.live import log_location, prompt_version

    by_name = {r.name: (r.cfg.task.name, prompt_version(r.folder)) for r in refs}
    where = log_location(args.artifact, args.prediction_log)
    if where is None:
        ids = [new_id() for _ in preds]
    else:
        rows = [{"task": by_name[p.prompt][0], "prompt_version": by_name[p.prompt][1] or "local", "text": p.text,
                 "label": p.output, "scores": p.scores, "model": model} for p in preds]
        ids, stats = record_batch(open_store(where, endpoint_url=args.s3_endpoint), rows, log_inputs=args.log_inputs)
        missed = stats["queued"] + stats["dropped"]
        print(f"prediction log: {stats['written']} records written to {where}"
              + (f"; WARNING: {missed} could not be written (the store failed; see the log above)" if missed else ""), file=sys.stderr)
    return [{"id": pid, "version": by_name[p.prompt][1], **p.to_dict()} for pid, p in zip(ids, preds, strict=True)]


def cmd_serve(args: argparse.Namespace) -> int:
    """`softprompt serve`: the Ray layer's Serve application until SIGTERM."""
    from softprompt.ray.serving import run

    run(args.artifact, serve_config(args), model=args.model, s3_endpoint=args.s3_endpoint, ray_address=args.ray_address)
    return 0


def _field_docs() -> dict[str, str]:
    """Each ServeConfig field's docstring's first sentence, for the flags' help."""
    import ast
    import inspect

    from softprompt.serve import config

    tree = ast.parse(inspect.getsource(config.ServeConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split()).split(". ")[0].rstrip(".")
    return docs


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: use true or false")
