"""The compiled Kubeflow pipeline: its tasks, edges, parameters, artifact types, caching, retries
and image, and that kfp's own loaders accept the YAML. Compiling needs no cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from softprompt import __version__
from softprompt.cli import main

IMAGE = f"ghcr.io/softprompt/softprompt:{__version__}"
TASKS = {  # task -> display name
    "validate": "Validate", "ingest": "Ingest", "tune": "Tune (Ray)", "evaluate": "Evaluate",
    "publish": "Publish", "importer": "Registered model", "condition-1": "beats-baselines",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    assert main(["pipeline", "compile", "--output", str(out)]) == 0
    return out, yaml.safe_load(out.read_text())


def _tasks(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["root"]["dag"]["tasks"]


def _component(spec: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    return spec["components"][task["componentRef"]["name"]]


def test_tasks_display_names_and_edges(compiled: tuple[Path, dict[str, Any]]) -> None:
    _, spec = compiled
    tasks = _tasks(spec)
    assert {name: t["taskInfo"]["name"] for name, t in tasks.items()} == TASKS
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps["validate"] == set()
    assert deps["ingest"] == {"validate"}
    assert deps["tune"] == {"validate", "ingest"}
    assert deps["evaluate"] == {"validate", "ingest", "tune"}
    assert deps["publish"] == {"validate", "evaluate"}
    assert deps["importer"] == {"publish"}
    assert deps["condition-1"] == {"validate", "evaluate", "publish"}
    # Artifacts flow along the edges: the resolved config to every stage, data -> tune -> evaluate -> publish.
    art = {name: {k: (v["taskOutputArtifact"]["producerTask"], v["taskOutputArtifact"]["outputArtifactKey"])
                  for k, v in t.get("inputs", {}).get("artifacts", {}).items()} for name, t in tasks.items()}
    assert art["ingest"] == {"config": ("validate", "config")}
    assert art["tune"] == {"config": ("validate", "config"), "dataset": ("ingest", "dataset")}
    assert art["evaluate"] == {"config": ("validate", "config"), "dataset": ("ingest", "dataset"), "winners": ("tune", "winners")}
    assert art["publish"] == {"config": ("validate", "config"), "artifact": ("evaluate", "artifact")}


def test_promotion_is_gated_on_the_evaluation(compiled: tuple[Path, dict[str, Any]]) -> None:
    _, spec = compiled
    gate = _tasks(spec)["condition-1"]
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    assert gate["inputs"]["parameters"]["pipelinechannel--evaluate-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "evaluate"}
    inner = _component(spec, gate)["dag"]["tasks"]
    assert list(inner) == ["promote"]
    assert inner["promote"]["taskInfo"]["name"] == "Promote"
    assert spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"


def test_parameters(compiled: tuple[Path, dict[str, Any]]) -> None:
    _, spec = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: p["parameterType"] for name, p in params.items()} == {
        "config_uri": "STRING", "base_model": "STRING", "train_data_uri": "STRING", "test_data_uri": "STRING",
        "registry": "STRING", "s3_endpoint": "STRING", "overrides": "LIST", "launcher": "STRING",
        "ray_address": "STRING", "ray_namespace": "STRING", "num_workers": "NUMBER_INTEGER",
        "gpus_per_worker": "NUMBER_DOUBLE", "cpus_per_worker": "NUMBER_DOUBLE", "memory_per_worker": "STRING",
        "max_hours": "NUMBER_DOUBLE",
    }
    required = [name for name, p in params.items() if not p.get("isOptional")]
    assert required == ["config_uri"]
    assert params["launcher"]["defaultValue"] == "rayjob"
    # The Ray workers' resources reach the tune task as parameters.
    tune_inputs = _tasks(spec)["tune"]["inputs"]["parameters"]
    for name in ("num_workers", "gpus_per_worker", "cpus_per_worker", "memory_per_worker", "max_hours", "launcher", "ray_address"):
        assert tune_inputs[name] == {"componentInputParameter": name}
    assert tune_inputs["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    outputs = spec["root"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in outputs.items()} == {"version": "STRING", "uri": "STRING", "beats_baselines": "BOOLEAN"}


def test_artifact_types(compiled: tuple[Path, dict[str, Any]]) -> None:
    _, spec = compiled

    def outputs(component: str) -> dict[str, str]:
        arts = spec["components"][component].get("outputDefinitions", {}).get("artifacts", {})
        return {name: a["artifactType"]["schemaTitle"] for name, a in arts.items()}

    assert outputs("comp-validate") == {"config": "system.Artifact"}
    assert outputs("comp-ingest") == {"dataset": "system.Dataset"}
    assert outputs("comp-tune") == {"winners": "system.Model"}
    assert outputs("comp-evaluate") == {"artifact": "system.Model", "metrics": "system.Metrics",
                                        "confusion": "system.ClassificationMetrics", "report": "system.HTML"}
    assert outputs("comp-importer") == {"artifact": "system.Model"}
    importer = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["artifactUri"] == {"runtimeParameter": "uri"}
    assert set(importer["metadata"]) == {"task", "base_model", "version", "metric", "value", "eval_fingerprint", "created_at"}
    publish_out = spec["components"]["comp-publish"]["outputDefinitions"]["parameters"]
    assert {"task", "base_model", "version", "uri"} <= set(publish_out)


def test_caching_retries_and_resources(compiled: tuple[Path, dict[str, Any]]) -> None:
    _, spec = compiled
    tasks = {**_tasks(spec), "promote": _component(spec, _tasks(spec)["condition-1"])["dag"]["tasks"]["promote"]}
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"ingest", "evaluate", "importer"}
    for name in ("validate", "ingest", "tune", "publish", "promote"):
        retry = tasks[name]["retryPolicy"]
        assert retry["maxRetryCount"] >= 2 and retry["backoffFactor"] == 2.0, name
        assert retry["backoffDuration"].endswith("s") and retry["backoffMaxDuration"] == "600s", name
    assert "retryPolicy" not in tasks["evaluate"]
    for executor in ("exec-validate", "exec-ingest", "exec-tune", "exec-evaluate", "exec-publish", "exec-promote"):
        resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryLimit"], executor


def test_steps_run_the_package_in_the_pinned_image(compiled: tuple[Path, dict[str, Any]]) -> None:
    _, spec = compiled
    containers = {name: e["container"] for name, e in spec["deploymentSpec"]["executors"].items() if "container" in e}
    assert len(containers) == 6
    for name, container in containers.items():
        assert container["image"] == IMAGE, name
        source = "\n".join(container["command"])
        assert "pip install" not in source, f"{name} installs packages at run time"
        assert "from softprompt.kubeflow import steps" in source, name


def test_image_override(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "-o", str(out), "--image", "registry.example/softprompt:0.1.0"]) == 0
    spec = yaml.safe_load(out.read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
    assert images == {"registry.example/softprompt:0.1.0"}


def test_kfp_loaders_accept_the_yaml(compiled: tuple[Path, dict[str, Any]]) -> None:
    from google.protobuf import json_format
    from kfp import components
    from kfp.pipeline_spec import pipeline_spec_pb2

    path, spec = compiled
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "softprompt"
    assert set(loaded.component_spec.inputs or {}) == set(spec["root"]["inputDefinitions"]["parameters"])
    proto = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # strict: unknown fields fail
    assert proto.pipeline_info.name == "softprompt"
    assert set(proto.root.dag.tasks) == set(TASKS)


def test_cli_help_works_without_kfp() -> None:
    blocked = "import sys; sys.modules.update(dict.fromkeys(['kfp', 'kfp_server_api'], None)); from softprompt.cli import main; "
    help_run = subprocess.run([sys.executable, "-c", blocked + "raise SystemExit(main(['--help']))"], capture_output=True, text=True)
    assert help_run.returncode == 0, help_run.stderr
    assert "pipeline" in help_run.stdout
    compile_run = subprocess.run([sys.executable, "-c", blocked + "raise SystemExit(main(['pipeline', 'compile']))"],
                                 capture_output=True, text=True)
    assert compile_run.returncode == 2
    assert "pip install 'softprompt[kfp]'" in compile_run.stderr


def test_component_and_pipeline_files_re_export_the_package() -> None:
    import runpy

    from softprompt.kubeflow import components, pipeline

    root = Path(__file__).resolve().parents[2]
    for stage in ("validate", "ingest", "tune", "evaluate", "publish", "promote"):
        assert runpy.run_path(str(root / "components" / f"{stage}.py"))[stage] is getattr(components, stage)
    assert runpy.run_path(str(root / "pipelines" / "softprompt_pipeline.py"))["softprompt_pipeline"] is pipeline.softprompt_pipeline
