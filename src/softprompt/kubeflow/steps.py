"""What each KFP component runs: read the resolved config once, run the stage, leave its typed
result in the output artifact. No kfp import here, so every step is a plain function that tests call
directly.

The validate step writes the *resolved* config (file + pipeline parameters + overrides, validated);
every later step reads that one file, so all stages of a run see the same configuration. The stages
are the core's (`softprompt.ingest`, the Ray layer's `RayTuneTrainer`, `softprompt.evaluate`, the
registry), called in-process, and each output artifact is the stage's own output folder with its
result file: `ingest_result.json` (dataset), `train_result.json` (winners), `metrics.json`
(artifact). On a cluster the tune step hands its work to a Ray driver (`remote.py`) through a
scratch store, launched as a KubeRay RayJob or a Ray Jobs API submission (`rayjob.py`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from softprompt.config import JobConfig, load_config, to_dict
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.kubeflow.pods import ensure_s3_credentials, pod_namespace
from softprompt.kubeflow.scratch import copy_tree, default_scratch, pull_tree, push_tree
from softprompt.outcome import TrainOutcome


class StepError(SoftpromptError):
    """A pipeline step cannot go on; the message names the input and the fix."""


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
    """Fetch the config, apply the pipeline parameters, check it and its data sources, and write the
    resolved YAML to `config_out`. Empty parameters keep the config's value.

    Returns:
        Metadata for the config artifact.

    Raises:
        StepError: the config cannot be read, or its data sources are unusable (every problem listed).
    """
    from softprompt.ingest import check_sources
    from softprompt.uris import fetch

    ensure_s3_credentials()
    if not config_uri:
        raise StepError("config_uri is empty; pass a YAML path or s3://bucket/key")
    with tempfile.TemporaryDirectory(prefix="softprompt-validate-") as tmp:
        try:
            local = fetch(config_uri, Path(tmp) / "config.yaml", endpoint=s3_endpoint or None)
        except SoftpromptError as exc:
            raise StepError(f"cannot read config {config_uri}: {exc}; pass an existing YAML path or an s3:// URI") from exc
        try:
            cfg = load_config(local, [*parameter_overrides(base_model, train_data_uri, test_data_uri, registry, s3_endpoint), *overrides])
        except ConfigError as exc:  # name the config the user gave, not this step's temporary copy
            raise ConfigError([p.replace(str(local), config_uri) for p in exc.problems], config_uri) from None
    problems = check_sources(cfg)
    if problems:
        raise StepError("the config's data sources cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))
    write_config(cfg, Path(config_out))
    print(f"ok: {config_uri} is valid (task {cfg.task.name}, model {cfg.model.name})")
    return {
        "source": config_uri, "task": cfg.task.name, "base_model": cfg.model.name,
        "registry": cfg.publish.registry, "primary_metric": cfg.evaluate.primary_metric,
    }


def parameter_overrides(
    base_model: str = "", train_data_uri: str = "", test_data_uri: str = "", registry: str = "", s3_endpoint: str = ""
) -> list[str]:
    """The pipeline's named parameters as `a.b=value` overrides (empty ones are left out)."""
    pairs = [("model.name", base_model), ("data.train", train_data_uri), ("data.test", test_data_uri),
             ("publish.registry", registry), ("s3.endpoint", s3_endpoint)]
    # json.dumps quotes the value, so YAML reads it back as the same string ("1e3" stays text).
    return [f"{key}={json_text(value)}" for key, value in pairs if value]


def ingest(config: str | Path, dataset_out: str | Path) -> dict[str, Any]:
    """Ingest into `dataset_out`, which then holds the prepared splits and `ingest_result.json`."""
    from softprompt import ingest as ingest_stage

    ensure_s3_credentials()
    result = ingest_stage.run(load_config(config), Path(dataset_out))
    print(result.summary())
    return {"fingerprint": result.fingerprint, "counts": result.counts}


def tune(
    config: str | Path,
    dataset: str | Path,
    winners_out: str | Path,
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
    """Tune the soft prompt; `winners_out` gets the train stage's output folder (the winners,
    best first, and `train_result.json`).

    Args:
        launcher: `local` tunes on this machine (a local Ray); `ray-jobs` submits to the Ray cluster
            whose dashboard is `ray_address`; `rayjob` creates a KubeRay RayJob (a fresh cluster for
            this run) in `ray_namespace` (default: this pod's namespace).
        run_id: The pipeline run id; the Ray job's name derives from it, so a retried step
            re-attaches to its job instead of starting a second one.
        num_workers, gpus_per_worker, cpus_per_worker: Ray Train workers per trial and what each
            reserves, overriding the config's `ray` section; 0 (gpus: -1) keeps the config's.
            gpus_per_worker=0 trains on CPU workers.
        memory_per_worker: Memory of each RayJob worker pod.
        max_hours: Wall-clock limit of a RayJob (its `activeDeadlineSeconds`).
        scratch_uri: Where config, data and the winners travel between this step and the Ray
            cluster; default `s3://<registry bucket>/tmp/softprompt/<job name>`.
    """
    ensure_s3_credentials()
    cfg = load_config(config, resource_overrides(num_workers, gpus_per_worker, cpus_per_worker))
    if launcher == "local":
        from softprompt.job import Models
        from softprompt.ray.trainers import RayTuneTrainer

        with tempfile.TemporaryDirectory(prefix="softprompt-tune-") as tmp:
            outcome = RayTuneTrainer(echo=print).train(cfg, Path(dataset), Path(tmp), Models(cfg))
            copy_tree(outcome.output_dir, Path(winners_out))
        return {"launcher": launcher, **winner_summary(Path(winners_out))}
    if launcher not in ("ray-jobs", "rayjob"):
        raise StepError(f"tune launcher={launcher!r} is not one of local, ray-jobs, rayjob")
    from softprompt.kubeflow import rayjob, remote

    name = rayjob.job_name(run_id or "manual")
    scratch = scratch_uri or default_scratch(cfg.publish.registry, name)
    endpoint = cfg.s3.endpoint
    if cfg.ray.storage_path is None and scratch.startswith("s3://"):
        # Trials on several nodes share checkpoints only through S3.
        cfg = load_config(config, [*resource_overrides(num_workers, gpus_per_worker, cpus_per_worker), f"ray.storage_path={scratch}/ray"])
    with tempfile.TemporaryDirectory(prefix="softprompt-tune-") as tmp:
        write_config(cfg, Path(tmp) / "config" / remote.CONFIG_FILE)
        push_tree(Path(tmp) / "config", scratch + "/config", endpoint)
    push_tree(Path(dataset), scratch + "/data", endpoint)
    entrypoint = remote.entrypoint(scratch, s3_endpoint=endpoint)
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
    pull_tree(scratch + "/winners", Path(winners_out), endpoint)
    return {"launcher": launcher, "ray_job": result.name, "ray_job_status": result.job_status, "scratch": scratch,
            **winner_summary(Path(winners_out))}


def resource_overrides(num_workers: int = 0, gpus_per_worker: float = -1.0, cpus_per_worker: float = 0.0) -> list[str]:
    """The tune step's resource parameters as overrides of the config's `ray` section (unset
    ones, 0 or gpus -1, are left out)."""
    out = [f"ray.num_workers={int(num_workers)}"] if num_workers > 0 else []
    if gpus_per_worker >= 0:
        out.append(f"ray.use_gpu={'true' if gpus_per_worker > 0 else 'false'}")
        out += [f"ray.gpus_per_worker={gpus_per_worker}"] if gpus_per_worker > 0 else []
    return out + ([f"ray.cpus_per_worker={cpus_per_worker}"] if cpus_per_worker > 0 else [])


def winner_summary(winners: Path) -> dict[str, Any]:
    """Metadata of the tune step's `winners` artifact: who trained, how many winners, the best's scores."""
    outcome = TrainOutcome.read(winners)
    best = (outcome.summary.get("tune") or {}).get("best") or {}
    extra = {"best_trial": best.get("trial_id"), "best_params": best.get("params")} if best else {}
    return {"trainer": outcome.trainer, "winners": len(outcome.winners), **extra,
            "best_eval_metric": outcome.summary.get("best_eval_metric"), "steps": outcome.summary.get("steps")}


def evaluate(config: str | Path, dataset: str | Path, winners: str | Path, artifact_out: str | Path, report_out: str | Path) -> dict[str, Any]:
    """Evaluate the tune step's winners (the best, and the top-k as an ensemble) against the
    baselines; `artifact_out` gets the publishable folder and `report_out` its `report.html`.

    Returns:
        metrics.json's contents (the component logs its scalars and confusion matrix).
    """
    from softprompt import evaluate as evaluate_stage
    from softprompt.job import Models

    ensure_s3_credentials()
    cfg = load_config(config)
    outcome = TrainOutcome.read(winners)
    result = evaluate_stage.run(cfg, Models(outcome.config).get(), Path(dataset), outcome, Path(artifact_out))
    print(result.table())
    print(result.verdict)
    Path(report_out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(artifact_out) / "report.html", report_out)
    return result.metrics


def metric_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars for the KFP Metrics artifact: accuracy and macro-F1 of the tuned prompt and each baseline."""
    out: dict[str, float] = {}
    for method in ("tuned", "zero_shot", "few_shot"):
        block = metrics.get(method) or {}
        for name in ("accuracy", "macro_f1"):
            if isinstance(block.get(name), (int, float)):
                out[f"{method}_{name}"] = float(block[name])
    return out


def publish(config: str | Path, artifact: str | Path) -> dict[str, Any]:
    """Publish the evaluated artifact folder to the config's registry (the registry checks its
    provenance); returns the version's identity and its manifest fields."""
    from softprompt import registry

    ensure_s3_credentials()
    store = registry.open_registry(load_config(config))
    result = registry.publish(store, Path(artifact))
    print(result.message)
    info = registry.show(store, result.task, result.base_model, result.version)
    return {
        "task": result.task, "base_model": result.base_model, "version": result.version, "uri": result.uri,
        "created": result.created, "metric": info.metric, "value": info.value,
        "eval_fingerprint": info.eval_fingerprint, "created_at": info.created_at,
        "weights_sha256": (info.manifest.get("base_model") or {}).get("weights_sha256", ""),
    }


def promote(config: str | Path, task: str, base_model: str, version: str, *, reason: str = "") -> str:
    """Make the version the champion if the registry's gate agrees (same eval set, better
    `evaluate.primary_metric`, and with `publish.require_significance` significantly better than
    every baseline). Returns the outcome (`promoted`, `refused`, `unchanged`); a refusal
    is not an error."""
    from softprompt import registry

    ensure_s3_credentials()
    cfg = load_config(config)
    result = registry.promote(registry.open_registry(cfg), task, base_model, version,
                              gate=registry.Gate(metric=cfg.evaluate.primary_metric, require_significance=cfg.publish.require_significance),
                              reason=reason)
    print(result.message)
    return result.status


def write_config(cfg: JobConfig, path: Path) -> Path:
    """Write a resolved config as YAML that `load_config` reads back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def json_text(value: str) -> str:
    """A string as a quoted YAML scalar (JSON is YAML): `1e3` and `null` stay text."""
    import json

    return json.dumps(value)
