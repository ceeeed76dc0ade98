#!/usr/bin/env python3
"""Serving: `softprompt serve` on Ray Serve against the stdlib server it replaced (commit 98c578d).

    git worktree add ../base98 98c578d                       # the baseline's source, once
    python benchmarks/serving.py --baseline ../base98 --json benchmarks/results/serving.json
    python benchmarks/serving.py --baseline ../base98 --quick   # fewer rows: a smoke run

Four prompts of 10, 20, 20 and 30 virtual tokens (untrained: vocabulary embeddings plus noise, the
`init: vocab` start; a forward pass costs the same whatever the values) serve four tasks with the
shipped configs' templates and label words, over one SmolLM2-135M, each on its own task's texts.
Both servers get the same artifact folders, max batch 32, max wait 10 ms, and the same clients
(urllib threads, one connection per request, in this process).

Measured, each server the same way:
- mixed-prompt rows/s: `--clients` concurrent single-row clients, rows interleaved over the four prompts;
- single-row latency: requests one after another, p50/p95.
Ray Serve only:
- mixing cost: the same rows sent one prompt after another (batches hold one prompt) vs interleaved;
- prediction-logging cost: the mixed run again with the prediction log on (a local registry folder);
- a champion move under load: `--clients` clients for a few seconds, the pointer moved midway;
- 20 clients x 50 requests with poison requests mixed in (a lone surrogate, a 24,000-character text,
  JSON nested 100,000 deep): failed valid requests, and the replica processes' RSS summed before and after.
- the review's attacks on both servers: what each answers.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from softprompt.config import ModelConfig, load_config, to_dict  # noqa: E402
from softprompt.modeling import load_model  # noqa: E402
from softprompt.registry import compute_version  # noqa: E402
from softprompt.serve import ServeConfig  # noqa: E402

PROMPTS = (("sst2", 10), ("agnews", 20), ("trec", 20), ("demo", 30))  # shipped config, virtual tokens
BASELINE = """
import sys, json
from pathlib import Path
from safetensors.torch import load_file
from softprompt import serve
from softprompt.config import ModelConfig, load_config
from softprompt.modeling import load_model
from softprompt.predict import PromptTable, TunedPrompt
from softprompt.tasks import build_verbalizer
specs, port, model, root = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
table = PromptTable(load_model(ModelConfig(name=model)))
for name, folder in specs.items():  # its own configs: 98c578d reads no run manifest written by today's code
    cfg = load_config(root / "configs" / f"{name}.yaml", [f"model.name={model}"])
    embeds = load_file(str(Path(folder) / "adapter_model.safetensors"))["prompt_embeddings"]
    table.prompts[name] = TunedPrompt(name, embeds, cfg, build_verbalizer(cfg.task, table.loaded.tokenizer), folder)
serve.run(table, serve.ServeConfig(port=port, max_batch=32, max_wait_ms=10))
"""

def build_artifacts(root: Path, model: str) -> tuple[dict[str, Path], dict[str, list[str]], Path, list[str]]:
    """Artifact folders for the four prompts, each task's texts, and a local registry holding two
    versions of the demo prompt (the champion pointer on the first)."""
    from safetensors.torch import save_file

    loaded = load_model(ModelConfig(name=model))
    vocab = loaded.model.get_input_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(0)
    folders, texts = {}, {}
    for name, n in PROMPTS:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"model.name={model}"])
        folder = root / name
        folder.mkdir(parents=True)
        embeds = vocab[torch.randint(0, 5000, (n,), generator=g)] + 0.01 * torch.randn(n, vocab.shape[1], generator=g)
        save_file({"prompt_embeddings": embeds.contiguous()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n}))
        (folder / "run_manifest.json").write_text(json.dumps({"config": to_dict(cfg), "base_model": {"name": model, "weights_sha256": "ab" * 32}}))
        folders[name], texts[name] = folder, read_texts(cfg)
    registry = root / "registry"
    versions = [_version(folders["demo"], registry / cfg.task.name / "smollm2-135m", seed) for seed in (1, 2)]
    _point(registry / cfg.task.name / "smollm2-135m", versions[0])
    return folders, texts, registry / cfg.task.name / "smollm2-135m", versions


def read_texts(cfg: Any) -> list[str]:
    """The text column of a config's test file (else train), as the config describes it."""
    d = cfg.data
    path = Path(d.test or d.train)
    path = path if path.is_absolute() else ROOT / path
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if isinstance(d.text_column, str):  # a named column: the first row is the header
        col, rows = rows[0].index(d.text_column), rows[1:]
    else:
        col, rows = d.text_column, rows[1:] if d.header else rows
    return [r[col] for r in rows if len(r) > col and r[col].strip()]


def _version(src: Path, model_dir: Path, seed: int) -> str:
    from safetensors.torch import load_file, save_file

    staging = model_dir / f"staging-{seed}"
    staging.mkdir(parents=True)
    for f in src.iterdir():
        (staging / f.name).write_bytes(f.read_bytes())
    e = load_file(str(staging / "adapter_model.safetensors"))["prompt_embeddings"]
    save_file({"prompt_embeddings": (e + 0.01 * torch.randn(e.shape, generator=torch.Generator().manual_seed(seed))).contiguous()}, str(staging / "adapter_model.safetensors"))
    files = [{"name": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size} for f in sorted(staging.iterdir())]
    version = compute_version([(f["name"], f["sha256"]) for f in files])
    (staging / "MANIFEST.json").write_text(json.dumps({"format": "softprompt.registry.version/1", "task": model_dir.parent.name,
                                                       "base_model": {"key": model_dir.name, "name": model_dir.name}, "version": version,
                                                       "files": files, "metric": {"name": "accuracy", "value": 0.5}, "eval_fingerprint": "e"}))
    staging.rename(model_dir / version)
    return version


def _point(model_dir: Path, version: str) -> None:
    (model_dir / ".tmp").write_text(json.dumps({"version": version, "previous": None}))
    os.replace(model_dir / ".tmp", model_dir / "champion.json")


def post(url: str, rows: list[tuple[str, str]] | bytes, timeout: float = 300) -> tuple[int, dict[str, Any] | str, float]:
    body = rows if isinstance(rows, bytes) else json.dumps({"inputs": [{"prompt": p, "text": t} for p, t in rows]}).encode()
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/predict", data=body), timeout=timeout) as r:
            out: dict[str, Any] | str = json.loads(r.read())
            status = r.status
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
        try:
            out = json.loads(raw)
        except ValueError:
            out = raw[:80].decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        status, out = 0, f"{type(exc).__name__}: {exc}"[:120]
    return status, out, time.perf_counter() - t


def drive(url: str, requests: list[list[tuple[str, str]] | bytes], clients: int) -> tuple[list[tuple[int, Any, float]], float]:
    """Send `requests` from `clients` threads, each taking the next one when done; answers (in order) and wall time."""
    answers: list[Any] = [None] * len(requests)
    todo = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            answers[i] = post(url, requests[i])

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return answers, time.perf_counter() - t


def rows_per_s(url: str, rows: list[tuple[str, str]], clients: int) -> dict[str, Any]:
    answers, wall = drive(url, [[r] for r in rows], clients)
    failed = sum(a[0] != 200 for a in answers)
    return {"rows": len(rows), "rows_per_s": round(len(rows) / wall, 2), "failed": failed}


def latency(url: str, rows: list[tuple[str, str]], n: int) -> dict[str, Any]:
    lat = [post(url, [rows[i % len(rows)]])[2] for i in range(n)]
    q = statistics.quantiles(lat, n=20, method="inclusive")
    return {"requests": n, "p50_ms": round(1000 * statistics.median(lat), 1), "p95_ms": round(1000 * q[18], 1)}


ATTACKS: dict[str, Any] = {
    "lone surrogate among 5 valid": None,  # built in `attacks`
    "Content-Length: ²": b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n{}",
    "JSON nested 200,000 deep": b"[" * 200_000 + b"]" * 200_000,
    "5,000-digit integer": b'{"text": "a", "n": ' + b"7" * 5000 + b"}",
    "PUT /v1/predict": b"PUT /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
}


def attacks(url: str, rows: list[tuple[str, str]]) -> dict[str, str]:
    """What a server answers to each attack of the review (status line or what went wrong)."""
    out = {}
    bad = json.dumps({"prompt": rows[0][0], "text": "x"}).replace('"x"', '"\\ud800"').encode()
    answers, _ = drive(url, [bad] + [[r] for r in rows[:5]], 6)
    out["lone surrogate among 5 valid"] = f"bad {answers[0][0]}, valid {sorted(a[0] for a in answers[1:])}"
    host, port = url.removeprefix("http://").split(":")
    for name, raw in ATTACKS.items():
        if raw is None:
            continue
        if raw.startswith((b"POST /", b"PUT /")):
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(raw)
                try:
                    reply = s.recv(400)
                except ConnectionError as exc:
                    reply = f"{type(exc).__name__}".encode()
            head = reply.split(b"\r\n")[0].decode(errors="replace") or "connection closed, no answer"
            kind = "html" if b"text/html" in reply else "json" if b"application/json" in reply else ""
            out[name] = f"{head} {kind}".strip()
        else:
            status, body, _ = post(url, raw)
            out[name] = f"{status} {str(body)[:60] if status in (0, 500) else ''}".strip() or "connection closed"
    with urllib.request.urlopen(f"{url}/v1/prompts", timeout=30) as r:
        out["/v1/prompts shows local paths"] = str(tempfile.gettempdir() in r.read().decode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"{url} never came up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="a worktree of commit 98c578d (today's server before this change)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=192, help="rows per throughput run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the throughput runs (best counts)")
    ap.add_argument("--requests", type=int, default=40, help="single-row requests for the latency figures")
    ap.add_argument("--poison-clients", type=int, default=20)
    ap.add_argument("--poison-requests", type=int, default=50, help="requests per client in the poison run")
    ap.add_argument("--quick", action="store_true", help="48 rows, 12 latency requests, 20 x 10 poison run")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.requests, args.poison_requests, args.repeats = 32, 8, 10, 1
    import psutil

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    folders, texts, model_dir, versions = build_artifacts(work, args.model)
    rng = random.Random(0)
    names = [n for n, _ in PROMPTS]
    mixed = [(names[i % 4], rng.choice(texts[names[i % 4]])) for i in range(args.rows)]
    grouped = sorted(mixed, key=lambda r: names.index(r[0]))
    result: dict[str, Any] = {"benchmark": "serving", "model": args.model, "rows": args.rows, "clients": args.clients}

    # Both servers run side by side and take turns, round by round: other work on a shared machine
    # lands on both alike, and the best round of each counts (other work only ever adds time).
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve() / "src")}
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, json.dumps({n: str(f) for n, f in folders.items()}), str(port), args.model,
                             str(Path(args.baseline).resolve())], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from ray import serve

    from softprompt.config import RayConfig
    from softprompt.ray.cluster import init_ray
    from softprompt.ray.serving import WORKER_NICENESS_ENV, build_app

    cores = os.cpu_count() or 1
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")  # as `softprompt serve` starts its local Ray: replicas not niced
    init_ray(RayConfig(num_cpus=2 * cores), tuning=False)  # two replicas of `cores` CPUs each: torch gets every core, like the baseline
    port = free_port()
    url, logged_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/logged"
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    specs = [f"{n}={f}" for n, f in folders.items() if n != "demo"] + [f"demo={model_dir}/champion"]
    for name, prefix, log in (("plain", "/", None), ("logged", "/logged", str(work / "log-registry"))):
        cfg = ServeConfig(max_batch=32, max_wait_ms=10, replica_cpus=float(cores), refresh_s=1.0, shutdown_s=5, request_timeout_s=120,
                          prediction_log=log or "off")
        serve.run(build_app(specs, cfg, model_name=args.model), name=name, route_prefix=prefix)
    try:
        for u in (base_url, url, logged_url):
            wait_up(u, proc)
            post(u, mixed[:4])
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "mixed": [], "grouped": [], "mixed_logged": []}
        for r in range(args.repeats):
            order = [("baseline", base_url, mixed), ("mixed", url, mixed), ("grouped", url, grouped), ("mixed_logged", logged_url, mixed)]
            for key, u, rows in order if r % 2 == 0 else order[::-1]:
                runs[key].append(rows_per_s(u, rows, args.clients))
                print(key, runs[key][-1], flush=True)
        best = {k: max(v, key=lambda x: x["rows_per_s"]) | {"rounds": [x["rows_per_s"] for x in v], "failed": sum(x["failed"] for x in v)}
                for k, v in runs.items()}
        result["baseline"] = {"mixed": best["baseline"], "single_row": latency(base_url, mixed, args.requests),
                              "rss_mb": round(psutil.Process(proc.pid).memory_info().rss / 2**20), "attacks": attacks(base_url, mixed)}
        ours: dict[str, Any] = {"mixed": best["mixed"], "grouped": best["grouped"], "mixed_logged": best["mixed_logged"],
                                "single_row": latency(url, mixed, args.requests), "attacks": attacks(url, mixed)}
        proc.terminate()
        ours["champion_move"] = champion_move(logged_url, mixed, model_dir, versions, args.clients)
        ours["poison"] = poison(logged_url, mixed, args.poison_clients, args.poison_requests)
        with urllib.request.urlopen(f"{logged_url}/healthz", timeout=30) as r:
            ours["prediction_log"] = json.loads(r.read())["prediction_log"]
        result["ray_serve"] = ours
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()  # a slow client or a long batch can keep it alive: the review's finding
        serve.shutdown()
    b, o = result["baseline"], result["ray_serve"]
    result["ratios"] = {
        "mixed_vs_baseline": round(o["mixed"]["rows_per_s"] / b["mixed"]["rows_per_s"], 3),
        "mixing_cost": round(o["grouped"]["rows_per_s"] / o["mixed"]["rows_per_s"] - 1, 3),
        "logging_cost": round(o["mixed"]["rows_per_s"] / o["mixed_logged"]["rows_per_s"] - 1, 3),
    }
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 1),
                         "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def champion_move(url: str, rows: list[tuple[str, str]], model_dir: Path, versions: list[str], clients: int) -> dict[str, Any]:
    """`clients` clients send demo rows for ~8 s; the pointer moves to the second version after 3 s."""
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []
    demo = [r for r in rows if r[0] == "demo"]

    def client(i: int) -> None:
        k = i
        while not stop.is_set():
            status, body, _ = post(url, [demo[k % len(demo)]])
            seen.append((status, body["predictions"][0]["version"] if status == 200 and isinstance(body, dict) else None))
            k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    _point(model_dir, versions[1])
    moved = time.monotonic()
    while time.monotonic() - moved < 30 and not any(v == versions[1] for _, v in seen[-clients:]):
        time.sleep(0.1)
    picked = time.monotonic() - moved
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    return {"requests": len(seen), "failed": sum(s != 200 for s, _ in seen), "picked_up_s": round(picked, 1),
            "answered_by": {v: sum(x == v for _, x in seen) for v in versions}}


def poison(url: str, rows: list[tuple[str, str]], clients: int, per_client: int) -> dict[str, Any]:
    """`clients` x `per_client` single-row requests, three poison requests among them; RSS of the replicas."""
    import psutil

    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as r:
        pid = json.loads(r.read())["pid"]
    before = psutil.Process(pid).memory_info().rss
    bad = [json.dumps({"prompt": "sst2", "text": "x"}).replace('"x"', '"\\ud800"').encode(),
           json.dumps({"prompt": "sst2", "text": "refund please " * 1715}).encode(), b"[" * 100_000 + b"]" * 100_000]
    requests: list[list[tuple[str, str]] | bytes] = [[rows[i % len(rows)]] for i in range(clients * per_client)]
    for k, body in enumerate(bad):
        requests[(k + 1) * len(requests) // 4] = body
    answers, wall = drive(url, requests, clients)
    after = psutil.Process(pid).memory_info().rss
    poison_at = {(k + 1) * len(requests) // 4 for k in range(len(bad))}
    failed = [a[0] for i, a in enumerate(answers) if i not in poison_at and a[0] != 200]
    return {"requests": len(requests), "failed_valid": len(failed), "failed_statuses": sorted(set(failed)),
            "poison_statuses": [answers[i][0] for i in sorted(poison_at)], "rows_per_s": round((len(requests) - len(bad)) / wall, 2),
            "rss_mb_before": round(before / 2**20), "rss_mb_after": round(after / 2**20), "rss_change": round(after / before - 1, 3)}


if __name__ == "__main__":
    raise SystemExit(main())
