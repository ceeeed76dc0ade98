"""`softprompt predict` and `softprompt serve`: published prompts on their frozen base model.

    softprompt predict --artifact runs/registry/sst2/... --input reviews.jsonl
    softprompt serve --artifact s3://bucket/registry/support-intent/smollm2-135m/champion --s3-endpoint http://minio:9000

Both take `--artifact [NAME=]DIR_OR_URI` (repeatable; the default name is the prompt's task) and
load prompts the same way (`softprompt.predict.resolve_prompts` and `load_prompts`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from softprompt import flags

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
    flags.add_s3(p)
    p.set_defaults(func=cmd_predict)

    from softprompt.serve import ServeConfig

    d = ServeConfig()
    about = "serve published prompts over HTTP: /healthz, /v1/prompts, /v1/predict (rows micro-batched across prompts)"
    p = sub.add_parser("serve", help="serve published prompts over HTTP, micro-batched on one model", description=about)
    p.add_argument("--artifact", action="append", required=True, metavar="[NAME=]DIR_OR_URI", help=ARTIFACT_HELP)
    p.add_argument("--host", default=d.host, help=f"interface to bind (default {d.host}; no auth, keep it behind a proxy)")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"most rows per forward pass (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help=f"how long a row waits for company (default {d.max_wait_ms:g})")
    p.add_argument("--max-request-rows", type=int, default=d.max_request_rows, help=f"most inputs per request (default {d.max_request_rows})")
    p.add_argument("--model", help="base model override (default: the one the prompts were trained on)")
    flags.add_s3(p)
    p.set_defaults(func=cmd_serve)


def cmd_predict(args: argparse.Namespace) -> int:
    """`softprompt predict`."""
    from softprompt import predict

    refs = predict.resolve_prompts(args.artifact, s3_endpoint=args.s3_endpoint)
    # Read the inputs first: a bad file should fail in a second, not after loading the model.
    rows = predict.read_inputs(args.input, args.text_column, args.prompt_column, default_prompt=refs[0].name)
    table = predict.load_prompts(refs, model=args.model, s3_endpoint=args.s3_endpoint)
    preds = predict.predict_rows(table, rows, args.batch_size)
    lines = "\n".join(json.dumps(p.to_dict(), ensure_ascii=False) for p in preds) + "\n"
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(preds)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`softprompt serve`."""
    from softprompt import predict, serve

    cfg = serve.ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                            max_request_rows=args.max_request_rows)
    refs = predict.resolve_prompts(args.artifact, s3_endpoint=args.s3_endpoint)
    table = predict.load_prompts(refs, model=args.model, s3_endpoint=args.s3_endpoint)
    serve.run(table, cfg, {r.name: r.ref for r in refs})
    return 0
