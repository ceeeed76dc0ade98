"""The KFP components: one per stage, each a typed interface around one `steps` function.

Component bodies only move artifacts: they hand KFP's artifact paths to `softprompt.kubeflow.steps`
(which runs the stage) and copy what it returns into artifact metadata. They run in one
image pinned to the package version (`IMAGE`), which already holds softprompt, kfp and ray, so
nothing is pip-installed at run time. KFP embeds each function's source in the pipeline spec and
runs it in a fresh interpreter, hence the imports inside the bodies and the inline NamedTuple
(which mypy does not accept as an annotation; KFP needs it there).

`evaluate` returns a single bool (its `Output`) rather than a NamedTuple: kfp's local runner
resolves a `dsl.If` condition only on a task's single output, and the gate must work there too.

Run locally with kfp's SubprocessRunner (see `pipeline.run_local`), the same bodies run in this
machine's interpreter.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from softprompt.kubeflow.rayjob import IMAGE

__all__ = ["IMAGE", "evaluate", "ingest", "promote", "publish", "tune", "validate"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(
    config_uri: str,
    base_model: str,
    train_data_uri: str,
    test_data_uri: str,
    registry: str,
    s3_endpoint: str,
    overrides: list,
    config: Output[Artifact],
) -> None:
    """Validate: fetch the config, apply the run's parameters, check it and its data sources, and
    write the resolved YAML that every later step reads."""
    from softprompt.kubeflow import steps

    config.metadata.update(steps.validate(
        config_uri, config.path, base_model=base_model, train_data_uri=train_data_uri,
        test_data_uri=test_data_uri, registry=registry, s3_endpoint=s3_endpoint, overrides=overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(config: Input[Artifact], dataset: Output[Dataset]) -> None:
    """Ingest: read, check, split and tokenize the data; output the prepared dataset."""
    from softprompt.kubeflow import steps

    dataset.metadata.update(steps.ingest(config.path, dataset.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(
    config: Input[Artifact],
    dataset: Input[Dataset],
    run_id: str,
    launcher: str,
    ray_address: str,
    ray_namespace: str,
    num_workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    memory_per_worker: str,
    max_hours: float,
    winners: Output[Model],
) -> None:
    """Tune: search prompt-tuning settings with Ray Tune over Ray Train workers, locally, on a
    running Ray cluster, or on a RayJob's own cluster; output the winners (the best trials'
    prompts, ranked, with train_result.json)."""
    from softprompt.kubeflow import steps

    winners.metadata.update(steps.tune(
        config.path, dataset.path, winners.path, launcher=launcher, ray_address=ray_address, run_id=run_id,
        ray_namespace=ray_namespace, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, memory_per_worker=memory_per_worker, max_hours=max_hours))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: Input[Artifact],
    dataset: Input[Dataset],
    winners: Input[Model],
    artifact: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
) -> bool:
    """Evaluate: score the winners against zero-shot and few-shot baselines; output the
    publishable artifact folder, the scores, the confusion matrix and the report, and return
    whether the prompt may be promoted: significantly better than every baseline (McNemar's exact
    test, p < 0.05), or only higher-scoring when `publish.require_significance` is false."""
    from softprompt.config import load_config
    from softprompt.evaluate import promotion_condition
    from softprompt.kubeflow import steps

    result = steps.evaluate(config.path, dataset.path, winners.path, artifact.path, report.path)
    for name, value in steps.metric_scalars(result).items():
        metrics.log_metric(name, value)
    confusion.log_confusion_matrix(result["tuned"]["labels"], result["tuned"]["confusion"])
    artifact.metadata.update({key: result[key] for key in ("primary_metric", "split", "beats_baselines", "verdict")})
    return promotion_condition(result, require_significance=load_config(config.path).publish.require_significance)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish(
    config: Input[Artifact],
    artifact: Input[Model],
) -> NamedTuple("Outputs", [("task", str), ("base_model", str), ("version", str), ("uri", str), ("metric", str), ("value", float), ("eval_fingerprint", str), ("created_at", str)]):  # type: ignore[valid-type]
    """Publish: push the evaluated artifact folder to the prompt registry as an immutable version
    (the registry checks its provenance first); output its identity and manifest fields."""
    from softprompt.kubeflow import steps

    r = steps.publish(config.path, artifact.path)
    return (r["task"], r["base_model"], r["version"], r["uri"], r["metric"], r["value"], r["eval_fingerprint"], r["created_at"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(config: Input[Artifact], task: str, base_model: str, version: str, run_id: str) -> str:
    """Promote: make the version the champion if the registry's gate agrees; returns promoted,
    refused or the registry's other outcome."""
    from softprompt.kubeflow import steps

    return steps.promote(config.path, task, base_model, version, reason=f"pipeline run {run_id}")
