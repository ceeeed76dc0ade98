"""The softprompt pipeline: validate → ingest → tune → evaluate → publish, then promote when the
tuned prompt beats its baselines (significantly, unless `publish.require_significance` is false).

    softprompt pipeline compile --output softprompt_pipeline.yaml
    softprompt pipeline run --local -c configs/demo.yaml

Each task has a display name, explicit resources, and a retry policy with exponential backoff
where failures are usually transient (object store, cluster API). Caching is off for the steps
whose result depends on more than their inputs: validate (it reads the config at run time), tune
(a new search each run), publish and promote (registry state). The GPUs go to the Ray workers
that tune launches (its `num_workers`, `gpus_per_worker`, ... parameters), not to the step pods.

`publish` returns where the version went; the "Registered model" importer turns that into a
Model artifact whose URI is the published location (s3://... or a folder) and whose metadata are
the manifest fields. An importer, not a component output, because KFP's launcher uploads every
output artifact to its own pipeline root and would try to write into the registry.
"""


import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kfp import compiler, dsl

from softprompt.kubeflow import components as c

PIPELINE_NAME = "softprompt"


class PipelineOutputs(NamedTuple):
    """What a run returns (shown on the run's page; `run --local` prints it)."""

    version: str
    """The published registry version."""
    uri: str
    """Where it was published (s3://... or a folder)."""
    beats_baselines: bool
    """Whether the tuned prompt beat every baseline (significantly, with `publish.require_significance`,
    the default) and promotion was attempted."""


S3_SECRET_ENV = "SOFTPROMPT_S3_SECRET"
"""Names the Secret a step reads its S3 key from (`pods.S3_SECRET`; default softprompt-s3)."""
PUBLISH_S3_SECRET = "softprompt-s3-publish"
PROMOTE_S3_SECRET = "softprompt-s3-promote"

_TRANSIENT_RETRY = {"num_retries": 3, "backoff_duration": "30s", "backoff_factor": 2.0, "backoff_max_duration": "10m"}


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Soft-prompt tuning of a frozen LLM: validate, ingest, tune on Ray, evaluate against "
    "baselines, publish to the prompt registry, promote when it beats them.",
)
def softprompt_pipeline(
    config_uri: str,
    base_model: str = "",
    train_data_uri: str = "",
    test_data_uri: str = "",
    registry: str = "",
    s3_endpoint: str = "",
    overrides: list = [],  # noqa: B006 - KFP parameter default, never mutated
    launcher: str = "rayjob",
    ray_address: str = "",
    ray_namespace: str = "",
    num_workers: int = 0,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 0.0,
    memory_per_worker: str = "48Gi",
    max_hours: float = 12.0,
) -> PipelineOutputs:
    """Pipeline parameters (empty strings keep the config's value): see docs/kubeflow.md."""
    validate = c.validate(
        config_uri=config_uri, base_model=base_model, train_data_uri=train_data_uri, test_data_uri=test_data_uri,
        registry=registry, s3_endpoint=s3_endpoint, overrides=overrides,
    )
    validate.set_display_name("Validate").set_caching_options(False)
    validate.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi").set_retry(**_TRANSIENT_RETRY)
    config = validate.outputs["config"]

    ingest = c.ingest(config=config)
    ingest.set_display_name("Ingest")
    ingest.set_cpu_request("1").set_memory_request("4Gi").set_memory_limit("8Gi").set_retry(**_TRANSIENT_RETRY)

    tune = c.tune(
        config=config, dataset=ingest.outputs["dataset"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, launcher=launcher,
        ray_address=ray_address, ray_namespace=ray_namespace, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, memory_per_worker=memory_per_worker, max_hours=max_hours,
    )
    # The pod only launches and watches Ray unless launcher=local; a retry re-attaches to its job.
    tune.set_display_name("Tune (Ray)").set_caching_options(False)
    tune.set_cpu_request("1").set_memory_request("4Gi").set_memory_limit("16Gi")
    tune.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="10m")

    evaluate = c.evaluate(config=config, dataset=ingest.outputs["dataset"], winners=tune.outputs["winners"])
    evaluate.set_display_name("Evaluate")
    evaluate.set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("16Gi")

    publish = c.publish(config=config, artifact=evaluate.outputs["artifact"])
    publish.set_display_name("Publish").set_caching_options(False)
    publish.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi").set_retry(**_TRANSIENT_RETRY)
    # One S3 key per writer (infra/minio/policies/): publish adds versions but cannot move the champion,
    # promote moves only the champion pointer; the other steps' key (softprompt-s3) writes only tmp/.
    publish.set_env_variable(S3_SECRET_ENV, PUBLISH_S3_SECRET)

    registered = dsl.importer(
        artifact_uri=publish.outputs["uri"],
        artifact_class=dsl.Model,
        reimport=False,
        metadata={
            "task": publish.outputs["task"], "base_model": publish.outputs["base_model"],
            "version": publish.outputs["version"], "metric": publish.outputs["metric"],
            "value": publish.outputs["value"], "eval_fingerprint": publish.outputs["eval_fingerprint"],
            "created_at": publish.outputs["created_at"],
        },
    )
    registered.set_display_name("Registered model")

    with dsl.If(evaluate.outputs["Output"] == True, name="beats-baselines"):  # noqa: E712 - a KFP condition, not a Python comparison
        promote = c.promote(
            config=config, task=publish.outputs["task"], base_model=publish.outputs["base_model"],
            version=publish.outputs["version"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        promote.set_display_name("Promote").set_caching_options(False)
        promote.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi").set_retry(**_TRANSIENT_RETRY)
        promote.set_env_variable(S3_SECRET_ENV, PROMOTE_S3_SECRET)

    return PipelineOutputs(publish.outputs["version"], publish.outputs["uri"], evaluate.outputs["Output"])


def compile_pipeline(output: str | Path, *, image: str | None = None) -> Path:
    """Write the pipeline's KFP IR YAML to `output`; `image` replaces the pinned image in every
    step (e.g. your registry's copy of ghcr.io/softprompt/softprompt:<version>)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=softprompt_pipeline, package_path=str(out))
    if image and image != c.IMAGE:
        spec = yaml.safe_load(out.read_text(encoding="utf-8"))
        for executor in spec["deploymentSpec"]["executors"].values():
            if "container" in executor:
                executor["container"]["image"] = image
        out.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return out


def parameter_names() -> list[str]:
    """The pipeline's parameters, in signature order."""
    return list(softprompt_pipeline.component_spec.inputs or {})


def spec_digest(path: str | Path) -> str:
    """A short content hash of a compiled pipeline (names pipeline versions)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def run_local(arguments: dict[str, Any], *, pipeline_root: str | Path) -> dict[str, Any]:
    """Run the whole pipeline on this machine with kfp's SubprocessRunner (each step in a
    subprocess of this interpreter; no Docker, no cluster). Returns the pipeline's outputs."""
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=tempfile.mkdtemp(prefix="softprompt-kfp-"), raise_on_error=True)
    with warnings.catch_warnings():
        # Locally the step image, resources and display names are unused, and the runner says so per step.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
        task = softprompt_pipeline(**arguments)
    return dict(task.outputs)
