"""What each KFP component runs: move artifacts into a run folder, call the `softprompt` CLI, move
the results out. No kfp import here, so every step is a plain function that tests call directly.

Each step runs the CLI as `python -m softprompt.cli ...` in a subprocess (the same interpreter,
so the component image and a local venv behave alike) and returns plain data that the component
copies into its KFP artifacts' metadata. The validate step writes the *resolved* config (file +
pipeline parameters + overrides, validated); every later step reads that one file, so all stages
of a run see exactly the same configuration.

On a cluster the tune step hands its work to a Ray driver (`remote.py`) through a scratch store,
launched as a KubeRay RayJob or a Ray Jobs API submission (`rayjob.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from softprompt.config import JobConfig, load_config, to_dict
from softprompt.errors import SoftpromptError

S3_SECRET = os.environ.get("SOFTPROMPT_S3_SECRET", "softprompt-s3")
"""Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (infra/rbac allows `get` on it)."""
EXIT_NOT_PROMOTED = 3
"""`softprompt promote` exit code when the registry's gate refused (not an error)."""
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class StepError(SoftpromptError):
    """A pipeline step's command failed; the message names the command and its exit code."""


def validate(
    config_uri: str,
    config_out: str | Path,
    *,
    base_model: str = "",
    train_data_uri: str = "",
    test_data_uri: str = "",
    registry: str = "",
    s3_endpoint: str = "",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Fetch the config, apply the pipeline parameters, validate it with `softprompt validate`
    (data sources included) and write the resolved YAML to `config_out`.

    Empty parameters keep the config's value. Returns metadata for the config artifact.
    """
    ensure_s3_credentials()
    with tempfile.TemporaryDirectory(prefix="softprompt-validate-") as tmp:
        local = fetch_file(config_uri, Path(tmp) / "config.yaml", endpoint_url=s3_endpoint or None)
        args = [*parameter_overrides(base_model, train_data_uri, test_data_uri, registry, s3_endpoint), *overrides]
        run_cli(["validate", "-c", str(local), *args])
        cfg = load_config(local, args)
    write_config(cfg, Path(config_out))
    return {
        "source": config_uri, "task": cfg.task.name, "base_model": cfg.model.name,
        "registry": cfg.publish.store, "primary_metric": cfg.evaluate.primary_metric,
    }


def parameter_overrides(
    base_model: str = "", train_data_uri: str = "", test_data_uri: str = "", registry: str = "", s3_endpoint: str = ""
) -> list[str]:
    """The pipeline's named parameters as `a.b=value` overrides (empty ones are left out)."""
    pairs = [("model.name", base_model), ("data.train", train_data_uri), ("data.test", test_data_uri), ("publish.store", registry)]
    if s3_endpoint:
        pairs += [(f"{section}.s3_endpoint_url", s3_endpoint) for section in ("data", "model", "publish")]
    # json.dumps quotes the value, so YAML reads it back as the same string ("1e3" stays text).
    return [f"{key}={json.dumps(value)}" for key, value in pairs if value]


def ingest(config: str | Path, dataset_out: str | Path) -> dict[str, Any]:
    """`softprompt ingest` into a scratch run folder; copy the prepared data to `dataset_out`."""
    ensure_s3_credentials()
    with tempfile.TemporaryDirectory(prefix="softprompt-ingest-") as tmp:
        run_cli(["ingest", "-c", str(config), "--run-dir", tmp, "--no-progress"])
        copy_tree(Path(tmp) / "data", Path(dataset_out))
    manifest = json.loads((Path(dataset_out) / "dataset_manifest.json").read_text(encoding="utf-8"))
    return {"fingerprint": manifest.get("fingerprint", ""), "counts": manifest.get("counts", {})}


def tune(
    config: str | Path,
    dataset: str | Path,
    adapter_out: str | Path,
    *,
    launcher: str = "local",
    ray_address: str = "",
    run_id: str = "",
    ray_namespace: str = "",
    num_workers: int = 0,
    gpus_per_worker: float = -1.0,
    cpus_per_worker: float = 0.0,
    memory_per_worker: str = "48Gi",
    max_hours: float = 12.0,
    scratch_uri: str = "",
) -> dict[str, Any]:
    """Tune the soft prompt; `adapter_out` gets the winners ranked best first (`collect_winners`).

    Args:
        launcher: `local` runs `softprompt tune` on this machine (a local Ray); `ray-jobs`
            submits to the Ray cluster whose dashboard is `ray_address`; `rayjob` creates a
            KubeRay RayJob (a fresh cluster for this run) in `ray_namespace` (default: this pod's
            namespace).
        run_id: The pipeline run id; the Ray job's name derives from it, so a retried step
            re-attaches to its job instead of starting a second one.
        num_workers, gpus_per_worker, cpus_per_worker: Ray Train workers per trial and what each
            reserves, overriding the config's `ray` section; 0 (gpus: -1) keeps the config's.
            gpus_per_worker=0 trains on CPU workers.
        memory_per_worker: Memory of each RayJob worker pod.
        max_hours: Wall-clock limit of a RayJob (its `activeDeadlineSeconds`).
        scratch_uri: Where config, data and the winner travel between this step and the Ray
            cluster; default `s3://<registry bucket>/tmp/softprompt/<job name>`.
    """
    ensure_s3_credentials()
    overrides = resource_overrides(num_workers, gpus_per_worker, cpus_per_worker)
    if launcher == "local":
        with tempfile.TemporaryDirectory(prefix="softprompt-tune-") as tmp:
            run_dir = Path(tmp) / "run"
            copy_tree(Path(dataset), run_dir / "data")
            tune_config = write_config(load_config(config, overrides), Path(tmp) / "tune.yaml")
            command = tune_command(tune_config, run_dir)
            run_cli(command)
            collect_winners(run_dir, Path(adapter_out), command[0], tune_config)
        return {"launcher": launcher, **winner_summary(Path(adapter_out))}
    if launcher not in ("ray-jobs", "rayjob"):
        raise StepError(f"tune launcher={launcher!r} is not one of local, ray-jobs, rayjob")
    from softprompt.kubeflow import rayjob, remote

    name = rayjob.job_name(run_id or "manual")
    cfg = load_config(config, overrides)
    scratch = scratch_uri or remote.default_scratch(cfg.publish.store, name)
    endpoint = cfg.publish.s3_endpoint_url
    if cfg.ray.storage_path is None and scratch.startswith("s3://"):
        # Trials on several nodes share checkpoints only through S3.
        cfg = load_config(config, [*overrides, f"ray.storage_path={scratch}/ray"]
                          + ([f"ray.storage_endpoint_url={endpoint}"] if endpoint and not cfg.ray.storage_endpoint_url else []))
    with tempfile.TemporaryDirectory(prefix="softprompt-tune-") as tmp:
        remote.push_file(write_config(cfg, Path(tmp) / "tune.yaml"), scratch + "/config", endpoint)
    remote.push_tree(Path(dataset), scratch + "/data", endpoint)
    entrypoint = remote.entrypoint(scratch, endpoint_url=endpoint)
    if launcher == "ray-jobs":
        if not ray_address:
            raise StepError("tune launcher=ray-jobs needs ray_address, e.g. http://softprompt-head-svc.softprompt-dev.svc:8265")
        result = rayjob.run_ray_job(ray_address, entrypoint, name)
    else:
        gpus = (cfg.ray.gpus_per_worker or 1.0) if cfg.ray.use_gpu else 0.0
        pods = rayjob.WorkerResources(num_workers=cfg.ray.num_workers, gpus=gpus,
                                      cpus=cfg.ray.cpus_per_worker + 1, memory=memory_per_worker or "48Gi")
        spec = rayjob.build_rayjob(name, entrypoint, run_id=run_id, resources=pods, active_deadline_seconds=int(max_hours * 3600))
        result = rayjob.run_rayjob(spec, ray_namespace or pod_namespace())
    remote.pull_tree(scratch + "/winners", Path(adapter_out), endpoint)
    return {"launcher": launcher, "ray_job": result.name, "ray_job_status": result.job_status, "scratch": scratch,
            **winner_summary(Path(adapter_out))}


def resource_overrides(num_workers: int = 0, gpus_per_worker: float = -1.0, cpus_per_worker: float = 0.0) -> list[str]:
    """The tune step's resource parameters as overrides of the config's `ray` section (unset
    ones, 0 or gpus -1, are left out)."""
    out = [f"ray.num_workers={int(num_workers)}"] if num_workers > 0 else []
    if gpus_per_worker >= 0:
        out.append(f"ray.use_gpu={'true' if gpus_per_worker > 0 else 'false'}")
        out += [f"ray.gpus_per_worker={gpus_per_worker}"] if gpus_per_worker > 0 else []
    return out + ([f"ray.cpus_per_worker={cpus_per_worker}"] if cpus_per_worker > 0 else [])


def write_config(cfg: JobConfig, path: Path) -> Path:
    """Write a resolved config as YAML that `load_config` reads back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def evaluate(
    config: str | Path, dataset: str | Path, adapter: str | Path, candidate_out: str | Path, report_out: str | Path
) -> dict[str, Any]:
    """`softprompt evaluate` the tuned prompts (the winner, and the top-k as an ensemble) against
    the baselines, with the winning trial's configuration that the tune step wrote.

    Copies the publishable folder to `candidate_out` and `report.html` to `report_out`; returns
    metrics.json's contents (the component logs its scalars and confusion matrix).
    """
    ensure_s3_credentials()
    winner_config = Path(adapter) / "config.yaml"
    with tempfile.TemporaryDirectory(prefix="softprompt-evaluate-") as tmp:
        adapters = [arg for d in ranked_adapters(Path(adapter)) for arg in ("--adapter", str(d))]
        run_cli(["evaluate", "-c", str(winner_config if winner_config.is_file() else config), "--run-dir", tmp,
                 "--data", str(dataset), *adapters, "--no-progress"])
        copy_tree(Path(tmp) / "artifact", Path(candidate_out))
    Path(report_out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(candidate_out) / "report.html", report_out)
    metrics: dict[str, Any] = json.loads((Path(candidate_out) / "metrics.json").read_text(encoding="utf-8"))
    return metrics


def metric_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars for the KFP Metrics artifact: accuracy and macro-F1 of the tuned prompt and each baseline."""
    out: dict[str, float] = {}
    for method in ("tuned", "zero_shot", "few_shot"):
        block = metrics.get(method) or {}
        for name in ("accuracy", "macro_f1"):
            if isinstance(block.get(name), (int, float)):
                out[f"{method}_{name}"] = float(block[name])
    return out


def publish(config: str | Path, candidate: str | Path) -> dict[str, Any]:
    """`softprompt publish` the evaluated folder to the config's registry; returns the version's
    identity and its manifest fields (`softprompt registry show`)."""
    ensure_s3_credentials()
    cfg = load_config(config)
    store = _store_args(cfg)
    result = json.loads(run_cli(["publish", str(candidate), *store, "--json"], capture=True))
    shown = json.loads(run_cli(["registry", "show", result["task"], result["base_model"], result["version"], *store, "--json"], capture=True))
    manifest = shown.get("manifest", {})
    return {
        "task": result["task"], "base_model": result["base_model"], "version": result["version"], "uri": result["uri"],
        "created": bool(result["created"]), "metric": shown.get("metric", ""), "value": float(shown.get("value", 0.0)),
        "eval_fingerprint": shown.get("eval_fingerprint", ""), "created_at": shown.get("created_at", ""),
        "weights_sha256": (manifest.get("base_model") or {}).get("weights_sha256", ""),
    }


def promote(config: str | Path, task: str, base_model: str, version: str, *, reason: str = "") -> str:
    """`softprompt promote`: the registry's gate compares with the champion on the same eval set.

    Returns the outcome (`promoted`, `refused`, ...); a refusal is not an error.
    """
    ensure_s3_credentials()
    cfg = load_config(config)
    args = ["promote", task, base_model, version, *_store_args(cfg), "--metric", cfg.evaluate.primary_metric, "--json"]
    if reason:
        args += ["--reason", reason]
    proc = _run(args, capture=True, ok=(0, EXIT_NOT_PROMOTED))
    if proc.returncode == EXIT_NOT_PROMOTED:
        return "refused"
    status: str = json.loads(proc.stdout).get("status", "promoted")
    return status


# --------------------------------------------------------------------------------------------------
# Tuned prompts: the tune command, and the ranked winners it leaves (here or on the Ray head)


def tune_command(config: Path, run_dir: Path, *, ray_address: str = "") -> list[str]:
    """The `softprompt tune` arguments for a run folder (`--ray-address` joins a running cluster)."""
    return ["tune", "-c", str(config), "--run-dir", str(run_dir), *(["--ray-address", ray_address] if ray_address else [])]


def collect_winners(run_dir: Path, out: Path, command: str, config: Path) -> None:
    """Copy the tuned prompts of a `softprompt tune` run folder to `out` as ranked folders `00/`,
    `01/`, ... (each `adapter/` plus `train_history.json`, checkpoints left out), `ranking.json`,
    and `config.yaml`: `config` with the winning trial's values, which evaluate uses (as
    `softprompt run` does).

    Tune ranks its top `tune.top_k_ensemble` trials in `tune/tune_result.json`, best first;
    evaluate also scores them as an ensemble. `command` (the CLI command that ran) is recorded
    in `ranking.json`.
    """
    from softprompt.ray.train import with_params

    result = json.loads((run_dir / "tune" / "tune_result.json").read_text(encoding="utf-8"))
    trial_dirs = [Path(adapter).parent for adapter in result["ensemble"]]
    cfg = with_params(load_config(config), (result.get("best") or {}).get("params") or {})
    write_config(cfg, out / "config.yaml")
    names = [f"{rank:02d}" for rank in range(len(trial_dirs))]
    for name, trial_dir in zip(names, trial_dirs, strict=True):
        copy_tree(trial_dir, out / name, ignore=("checkpoint",))
    ranking = {"command": command, "adapters": names, "tune": {k: v for k, v in result.items() if k not in ("trials", "ensemble")}}
    (out / "ranking.json").write_text(json.dumps(ranking, indent=1, default=str), encoding="utf-8")


def ranked_adapters(winners: Path) -> list[Path]:
    """The adapter folders of `collect_winners`' output, best first."""
    ranking = json.loads((winners / "ranking.json").read_text(encoding="utf-8"))
    return [winners / name / "adapter" for name in ranking["adapters"]]


def winner_summary(winners: Path) -> dict[str, Any]:
    """Metadata of the tune step's Model: how it was produced and the winner's scores."""
    ranking = json.loads((winners / "ranking.json").read_text(encoding="utf-8"))
    best = (ranking.get("tune") or {}).get("best") or {}
    extra = {"best_trial": best.get("trial_id"), "best_params": best.get("params")} if best else {}
    return {"command": ranking["command"], "adapters": len(ranking["adapters"]), **extra, **_history_summary(winners / ranking["adapters"][0])}


# --------------------------------------------------------------------------------------------------
# Shared helpers


def run_cli(args: Sequence[str], *, capture: bool = False) -> str:
    """Run `softprompt ARGS...` with this interpreter; raise StepError if it fails.

    Output streams to this process's (the KFP log); with `capture`, stdout is also returned.
    """
    return _run(args, capture=capture).stdout or ""


def _run(args: Sequence[str], *, capture: bool = False, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "softprompt.cli", *args]
    print("+ softprompt " + " ".join(args), flush=True)
    proc = subprocess.run(command, text=True, capture_output=capture, check=False)
    if capture:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        sys.stdout.flush()
    if proc.returncode not in ok:
        detail = f": {proc.stderr.strip().splitlines()[-1]}" if capture and proc.stderr.strip() else " (its error is in the log above)"
        raise StepError(f"`softprompt {' '.join(args[:1])}` exited with {proc.returncode}{detail}")
    return proc


def fetch_file(uri: str, dest: Path, *, endpoint_url: str | None = None) -> Path:
    """A local copy of `uri` (a path or `s3://bucket/key`) at `dest`."""
    if not uri:
        raise StepError("config_uri is empty; pass a YAML path or s3://bucket/key")
    if uri.startswith("s3://"):
        from softprompt.registry.store import open_store

        parent, _, key = uri.rpartition("/")
        return open_store(parent, endpoint_url=endpoint_url).get_file(key, dest)
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if not path.is_file():
        raise StepError(f"config {uri} does not exist; pass an existing YAML path or an s3:// URI")
    shutil.copyfile(path, dest)
    return dest


def copy_tree(src: Path, dest: Path, *, ignore: Sequence[str] = ()) -> None:
    """Copy a folder's contents into `dest` (created; existing files are replaced)."""
    if not src.is_dir():
        raise StepError(f"expected output folder {src} was not written")
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ignore) if ignore else None)


def ensure_s3_credentials(api_client: Any = None) -> None:
    """Inside a Kubernetes pod without AWS credentials in its environment, read them from the
    Secret `softprompt-s3` of the pod's namespace (the pipeline's Role may `get` exactly that).

    KFP gives component pods no secret env without the kfp-kubernetes extension; reading the
    Secret through the API keeps credentials out of the pipeline spec. A failure only warns:
    credentials may also come from the node's or the pod's cloud identity.

    Args:
        api_client: A kubernetes ApiClient (tests); default: the pod's in-cluster credentials.
    """
    if os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return
    try:
        import base64

        from kubernetes import client, config

        if api_client is None:
            config.load_incluster_config()
        secret = client.CoreV1Api(api_client).read_namespaced_secret(S3_SECRET, pod_namespace())
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if (secret.data or {}).get(key):
                os.environ[key] = base64.b64decode(secret.data[key]).decode()
    except Exception as exc:  # any failure leaves the default AWS credential chain in charge
        print(f"warning: could not read Secret {S3_SECRET} ({exc}); using the default AWS credential chain", file=sys.stderr)


def pod_namespace() -> str:
    """The namespace this pod runs in (`default` outside a cluster)."""
    path = _SA_DIR / "namespace"
    return path.read_text().strip() if path.is_file() else "default"


def _store_args(cfg: JobConfig) -> list[str]:
    args = ["--store", cfg.publish.store]
    if cfg.publish.s3_endpoint_url:
        args += ["--endpoint-url", cfg.publish.s3_endpoint_url]
    if cfg.publish.region:
        args += ["--region", cfg.publish.region]
    return args


def _history_summary(trial_dir: Path) -> dict[str, Any]:
    path = trial_dir / "train_history.json"
    if not path.is_file():
        return {}
    history = json.loads(path.read_text(encoding="utf-8"))
    scored = [h for h in history if isinstance(h.get("eval_metric"), (int, float))]
    best = max(scored, key=lambda h: h["eval_metric"], default=None)
    return {"best_eval_metric": best["eval_metric"], "best_step": best.get("step", 0)} if best else {}
